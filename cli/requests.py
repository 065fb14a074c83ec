"""Requests read from JSONL (one object a line) or plain lines (one prompt a line), and checked."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_SEED = 2**63 - 1  # torch.Generator takes a 64-bit seed; the signed range keeps it one in JSON readers too
REQUEST_KEYS = {"id", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop"}


@dataclass
class Item:
    """One request of the input: where it was, what it asks, or why it cannot run."""

    index: int  # among the requests, in input order
    line: int  # 1-based line of the input
    id: Any
    fields: dict | None = None
    error: str | None = None


def parse_lines(text: str) -> list[Item]:
    """Each non-empty line a prompt; its id and line are its line number."""
    items = []
    for n, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if line.strip():
            items.append(Item(len(items), n, n, fields={"prompt": line}))
    return items


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def lone_surrogate(v: Any) -> bool:
    """Whether a string (or a decoded JSON value) holds half of a UTF-16 pair: a JSON "\\ud800" alone, or a byte that
    is not UTF-8 in a command-line argument (Python keeps it as one, U+DC80–U+DCFF). No text: no tokenizer or JSON
    writer takes it."""
    if isinstance(v, str):
        return any("\ud800" <= c <= "\udfff" for c in v)
    if isinstance(v, dict):
        return any(lone_surrogate(k) or lone_surrogate(x) for k, x in v.items())
    return isinstance(v, list) and any(lone_surrogate(x) for x in v)


def parse_jsonl(text: str) -> list[Item]:
    """One request per non-blank line; a line that is not a valid request becomes an error item."""
    items = []
    for n, line in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):  # (a byte-order mark is no part of line 1)
        if not line.strip():
            continue
        item = Item(len(items), n, n)
        items.append(item)
        try:
            obj = json.loads(line, parse_constant=_no_constant)  # NaN, Infinity: not JSON, and not written back
        except json.JSONDecodeError as e:
            item.error = f"not valid JSON: {e.msg} (column {e.colno})"
            continue
        except ValueError as e:
            item.error = f"not valid JSON: {e}"
            continue
        if lone_surrogate(obj):
            item.error = "not valid text: a string holds half of a UTF-16 surrogate pair (a \\ud800–\\udfff escape alone)"
            continue
        if not isinstance(obj, dict):
            item.error = "a request must be a JSON object"
            continue
        item.id = obj.get("id", n)
        item.error = check_request(obj)
        item.fields = obj if item.error is None else None
    return items


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and abs(v) < float("inf")  # (1e400 reads as inf)


def check_request(obj: dict) -> str | None:
    """Why this request cannot run (the first problem found), or None."""
    unknown = sorted(set(obj) - REQUEST_KEYS)
    if unknown:
        return f"unknown key {unknown[0]!r} (known: {', '.join(sorted(REQUEST_KEYS))})"
    if ("prompt" in obj) == ("messages" in obj):
        return "give either 'prompt' or 'messages'"
    if "prompt" in obj and not (isinstance(obj["prompt"], str) and obj["prompt"]):
        return "'prompt' must be a non-empty string"
    if "messages" in obj:
        msgs = obj["messages"]
        if not (isinstance(msgs, list) and msgs and all(isinstance(x, dict) and isinstance(x.get("role"), str) and isinstance(x.get("content"), str) for x in msgs)):
            return "'messages' must be a non-empty list of {\"role\": …, \"content\": …} with string values"
    checks = {
        "max_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "temperature": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
        "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        "min_p": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
        "seed": (lambda v: _is_int(v) and 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]"),
        "stop": (lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)), "a string or a list of strings"),
    }
    for key, (ok, what) in checks.items():
        if key in obj and not ok(obj[key]):
            return f"'{key}' must be {what} (got {json.dumps(obj[key])})"
    return None
