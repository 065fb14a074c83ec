"""Tokens as the commands show and pick them: each token's label, and choosing tokens, layers and heads by what the user typed."""

from __future__ import annotations

import re

from model.errors import UsageError
from model.tokenizer import Tokenizer

# --- labels ------------------------------------------------------------------------------


def token_labels(tokenizer: Tokenizer, ids: list[int], pieces: list[str] | None = None) -> list[str]:
    """Each token's own text: its exact bytes when they are whole UTF-8, else the text it covers."""
    out = []
    for n, i in enumerate(ids):
        try:
            out.append(tokenizer.token_bytes(i).decode("utf-8"))
        except UnicodeDecodeError:  # part of a multi-byte character
            out.append(pieces[n] if pieces and pieces[n] else tokenizer.token_bytes(i).decode("utf-8", errors="replace"))
    return out


def show(label: str, limit: int = 0) -> str:
    """A token's text with whitespace made visible (␣ space, ↵ newline, ⇥ tab), cut to `limit` chars."""
    out = label.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
    out = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in out) or "∅"
    if limit and len(out) > limit:
        out = out[: limit - 1] + "…"
    return out


# --- picking -----------------------------------------------------------------------------


def is_index(token: str) -> bool:
    return re.fullmatch(r"[+-]?\d+", token.strip()) is not None


def match_spans(labels: list[str], text: str) -> list[list[int]]:
    """Tokens matching `text`: equal text, then equal ignoring surrounding space, then ignoring case,
    then every run of tokens that spells it out (a word split into pieces)."""
    for same in (lambda s: s == text, lambda s: s.strip() == text.strip(), lambda s: s.strip().casefold() == text.strip().casefold()):
        hits = [[i] for i, s in enumerate(labels) if s and same(s)]
        if hits:
            return hits
    needle = text.strip() or text
    joined, starts, at = "", [], 0
    for s in labels:
        starts.append(at)
        joined += s
        at += len(s)
    spans, k = [], joined.find(needle)
    while k >= 0 and needle:
        end = k + len(needle)
        spans.append([i for i, s in enumerate(labels) if starts[i] < end and starts[i] + len(s) > k])
        k = joined.find(needle, end)
    return spans


def token_list(labels: list[str], limit: int = 40) -> str:
    shown = " ".join(f"{i}:{show(s, 16)}" for i, s in enumerate(labels[:limit]))
    return shown + (f" … ({len(labels)} tokens; give an index)" if len(labels) > limit else "")


def pick_token(labels: list[str], token: str | None, occurrence: int | None) -> int:
    """The chosen token's index: last by default, an index (negative from the end), or matching text."""
    N = len(labels)
    if token is None:
        return N - 1
    if is_index(token):
        i = int(token)
        if not -N <= i < N:
            raise UsageError(f"--token {i} is out of range: {N} tokens (0..{N - 1}, or -{N}..-1)")
        return i % N
    spans = match_spans(labels, token)
    if not spans:
        raise UsageError(f"no token matches {token!r}; the tokens are {token_list(labels)}")
    n = occurrence or 1
    if not -len(spans) <= n <= len(spans):
        raise UsageError(f"{token!r} occurs {len(spans)} time(s): --occurrence must be 1..{len(spans)} (or -{len(spans)}..-1)")
    span = spans[n - 1 if n > 0 else n]
    return span[-1]  # a word in pieces: its last piece is where the whole word has been read


def pick_indices(given: list[int] | None, n: int, what: str, plural: str) -> list[int]:
    """Layer or head indices (negative from the end), checked, in order, without repeats."""
    if not given:
        return list(range(n))
    out = []
    for i in given:
        if not -n <= i < n:
            raise UsageError(f"--{what} {i} is out of range: this model has {n} {plural} (0..{n - 1}, or -{n}..-1)")
        if i % n not in out:
            out.append(i % n)
    return sorted(out)


def find_positions(labels: list[str], text: str, query: int, direction: str) -> list[int]:
    """Token positions matching --find that the chosen token can see (from) or that can see it (to)."""
    spans = match_spans(labels, text)
    if not spans:
        raise UsageError(f"--find {text!r}: no token matches; the tokens are {token_list(labels)}")
    allowed = (lambda p: p <= query) if direction == "from" else (lambda p: p >= query)
    pos = sorted({p for s in spans for p in s if allowed(p)})
    if not pos:
        where = "after" if direction == "from" else "before"
        raise UsageError(
            f"--find {text!r} matches only tokens {where} the chosen token {query} "
            f"({', '.join(str(p) for s in spans for p in s)}): attention never reaches them in --direction {direction}"
        )
    return pos
