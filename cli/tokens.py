"""Tokens as the commands show and pick them: each token's label, and choosing tokens, layers and heads by what the user typed."""

from __future__ import annotations

import re
from dataclasses import dataclass

from model.errors import UsageError
from model.tokenizer import Tokenizer

# --- labels ------------------------------------------------------------------------------
#
# One rule for every command that shows tokens (inspect, explain, heads, the pictures): a token is
# its own bytes; as text they are UTF-8, and a byte that is only part of a character (byte-level
# BPE splits multi-byte characters) is written as <0xE6>, never U+FFFD, so every token stays
# distinct and its bytes can be read back. JSON carries that text and the raw bytes; tables show it
# with whitespace made visible (`show`).


def token_raw(tokenizer: Tokenizer, ids: list[int]) -> list[bytes]:
    """The exact bytes of each token."""
    return [tokenizer.token_bytes(i) for i in ids]


def text_of(raw: bytes) -> str:
    """A token's bytes as text: UTF-8, with each byte of an incomplete character as <0xHH>."""
    out, at = [], 0
    while at < len(raw):
        try:
            out.append(raw[at:].decode("utf-8"))
            break
        except UnicodeDecodeError as e:
            out.append(raw[at : at + e.start].decode("utf-8"))
            out.extend(f"<0x{b:02X}>" for b in raw[at + e.start : at + e.end])
            at += e.end
    return "".join(out)


def token_labels(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Each token's text by the rule above."""
    return [text_of(b) for b in token_raw(tokenizer, ids)]


def tokens_json(tokenizer: Tokenizer, ids: list[int]) -> list[dict]:
    """The `tokens` list of the JSON outputs: index, id, text (the rule above) and the raw bytes."""
    return [{"index": n, "id": i, "text": text_of(b), "bytes": list(b)} for n, (i, b) in enumerate(zip(ids, token_raw(tokenizer, ids)))]


def show(label: str, limit: int = 0) -> str:
    """A token's text for a table: ␣ for a space, ↵ newline, ⇥ tab, other control characters as \\xNN; cut to `limit` chars."""
    out = label.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
    out = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in out) or "∅"
    if limit and len(out) > limit:
        out = out[: limit - 1] + "…"
    return out


# --- picking -----------------------------------------------------------------------------


def is_index(token: str) -> bool:
    return re.fullmatch(r"[+-]?\d+", token.strip()) is not None


@dataclass
class Matches:
    """Where a --token / --find text occurs: one list of token indices per occurrence, in order."""

    spans: list[list[int]]
    how: str  # "word": whole tokens; "case": whole tokens, ignoring case; "part": pieces of a word, or part of a token


def match_text(raw: list[bytes], text: str) -> Matches:
    """One rule for --token, --occurrence and --find.

    A token matches when its text, surrounding whitespace ignored, equals `text` (so `the` finds
    both `the` and ` the`); failing that, ignoring case; failing that, every place the text's
    bytes occur in the token sequence, as the run of tokens that covers them (`verdant` in
    ` ver|d|ant`, `fluff` in ` fluffy`). A text that is only whitespace is compared as it is.
    """
    needle = text.strip() or text
    words = [text_of(b) for b in raw]
    key = (lambda s: s.strip()) if text.strip() else (lambda s: s)
    for how, same in (("word", lambda s: key(s) == needle), ("case", lambda s: key(s).casefold() == needle.casefold())):
        hits = [[i] for i, s in enumerate(words) if s and same(s)]
        if hits:
            return Matches(hits, how)
    target = needle.encode("utf-8")
    joined = b"".join(raw)
    starts, at = [], 0
    for b in raw:
        starts.append(at)
        at += len(b)
    spans, k = [], joined.find(target) if target else -1
    while k >= 0:
        end = k + len(target)
        spans.append([i for i, b in enumerate(raw) if starts[i] < end and starts[i] + len(b) > k])
        k = joined.find(target, end)
    return Matches(spans, "part")


def token_list(raw: list[bytes], limit: int = 40) -> str:
    shown = " ".join(f"{i}:{show(text_of(b), 16)}" for i, b in enumerate(raw[:limit]))
    return shown + (f" … ({len(raw)} tokens; give an index)" if len(raw) > limit else "")


def _listed(raw: list[bytes], positions: list[int], limit: int = 8) -> str:
    shown = " ".join(f"{p}:{show(text_of(raw[p]), 16)}" for p in positions[:limit])
    return shown + (f" … ({len(positions)})" if len(positions) > limit else "")


def pick_token(raw: list[bytes], token: str | None, occurrence: int | None) -> tuple[int, str | None]:
    """The chosen token's index: last by default, an index (negative from the end), or matching text;
    and a note for stderr saying which token that is when the text was not one whole token or occurs
    more than once (the command prints it once every choice is known to be valid)."""
    N = len(raw)
    if token is None:
        return N - 1, None
    if is_index(token):
        i = int(token)
        if not -N <= i < N:
            raise UsageError(f"--token {i} is out of range: {N} tokens (0..{N - 1}, or -{N}..-1)")
        return i % N, None
    m = match_text(raw, token)
    spans = m.spans
    if not spans:
        raise UsageError(f"no token matches {token!r}; the tokens are {token_list(raw)}")
    n = occurrence or 1
    if not -len(spans) <= n <= len(spans):
        raise UsageError(f"{token!r} occurs {len(spans)} time(s): --occurrence must be 1..{len(spans)} (or -{len(spans)}..-1)")
    span = spans[n - 1 if n > 0 else n]
    q = span[-1]  # a word in pieces: its last piece is where the whole word has been read
    said = f"{q}:{show(text_of(raw[q]))}"
    notes = []
    if m.how == "part":
        notes.append(f"is split into {_listed(raw, span)}: using its last piece, {said}" if len(span) > 1 else f"is part of token {said}")
    elif m.how == "case":
        notes.append(f"matches {said} ignoring case")
    if len(spans) > 1 and occurrence is None:
        notes.append(f"occurs {len(spans)} times ({_listed(raw, [s[-1] for s in spans])}): using the first; --occurrence N picks another")
    return q, f"--token {token!r} " + "; ".join(notes) if notes else None


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


def find_positions(raw: list[bytes], text: str, query: int, direction: str) -> tuple[list[int], str | None]:
    """Token positions matching --find that the chosen token can see (from) or that can see it (to);
    and a note for stderr listing them when the text was not one whole token or occurs more than once."""
    m = match_text(raw, text)
    spans = m.spans
    if not spans:
        raise UsageError(f"--find {text!r}: no token matches; the tokens are {token_list(raw)}")
    allowed = (lambda p: p <= query) if direction == "from" else (lambda p: p >= query)
    pos = sorted({p for s in spans for p in s if allowed(p)})
    if not pos:
        where = "after" if direction == "from" else "before"
        raise UsageError(
            f"--find {text!r} matches only tokens {where} the chosen token {query} "
            f"({', '.join(str(p) for s in spans for p in s)}): attention never reaches them in --direction {direction}"
        )
    said = None
    if m.how != "word" or len(pos) > 1:
        what = {"word": "matches", "case": "matches (ignoring case)", "part": "is found in"}[m.how]
        said = f"--find {text!r} {what} {len(pos)} token{'s' if len(pos) > 1 else ''}: {_listed(raw, pos)}"
    return pos, said
