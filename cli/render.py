"""What `attn inspect` shows, as plain data, and its text forms: the terminal table, JSON and CSV.

The pictures (HTML, SVG) live in cli/pictures.py and read the same `View`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field

from rich.console import Console
from rich.text import Text

from cli.tokens import show

BARS = "▁▂▃▄▅▆▇█"
SINK_ONLY = 0.01  # --skip-first marks a head with less than this share of its weight off the first token
# Heat colours for the 8 bar levels (only used when colour is on; the bar heights carry it without).
HEAT = ["grey35", "grey50", "steel_blue", "dodger_blue2", "green3", "yellow3", "dark_orange", "red1"]


@dataclass
class HeadRow:
    """One (layer, head): its values over `View.positions` and its raw share on the first token."""

    layer: int
    head: int
    kv_head: int
    values: list[float | None]  # None: a position the layer's sliding window masks
    first_share: float
    match: float | None = None  # --find: what the chosen token gives to the matched tokens
    sink_only: bool = False  # --skip-first: under 1% of its weight is off the first token (values renormalised from ≈ nothing)


@dataclass
class View:
    """Everything a rendering needs, in plain Python values."""

    model: str
    ids: list[int]
    labels: list[str]  # token texts (cli/tokens.py's rule: UTF-8, a piece of a character as <0xE6>)
    query: int
    direction: str  # "from" | "to"
    values: str  # "weights" | "scores" | "value-norms"
    positions: list[int]
    rows: list[HeadRow]
    skip_first: bool = False
    renormalized: bool = False
    find: str | None = None
    find_positions: list[int] = field(default_factory=list)
    prompt_tokens: int = 0  # tokens before any generated ones
    generated: dict | None = None  # --generate: {"tokens", "text", "seed"}
    raw: list[bytes] = field(default_factory=list)  # each token's bytes, for JSON
    top: int | None = None  # --top as given: every format lists the same K (0: all); None: the table's defaults, all elsewhere
    quantize: str = "none"  # the weights' quantization (--quantize), when not none


# --- values -----------------------------------------------------------------------------------


def fmt(value: float, view: str) -> str:
    """A value as the table prints it: weights .85, scores 4.21, value norms 3 significant digits."""
    if view == "weights":
        s = f"{value:.2f}"
        return s[1:] if s.startswith("0.") else s
    if view == "scores":
        return f"{value:.2f}"
    return f"{value:.3g}"


def plain(x: float | None) -> float | None:
    """A float32 value as the shortest decimal that round-trips it (JSON and CSV); None (masked) stays None."""
    return None if x is None else float(f"{x:.9g}")


def describe(v: View) -> str:
    """One line saying what the numbers are."""
    q = f'"{show(v.labels[v.query])}" ({v.query})'
    what = {"weights": "attention weights", "scores": "scores QKᵀ/√d (pre-softmax)", "value-norms": "value norms ‖α·v·W_O‖"}[v.values]
    head = f"{what} from {q} to the tokens before it" if v.direction == "from" else f"{what} of later tokens on {q}"
    if v.skip_first:
        head += "; first token left out" + (", the rest renormalised" if v.renormalized else "")
    if v.quantize != "none":
        head += f" ({v.quantize} weights)"
    return head


# --- JSON and CSV ------------------------------------------------------------------------------


def to_json(v: View) -> str:
    """The contract's one JSON object (docs/cli.md), with the first-token share per head."""
    out = {
        "model": v.model,
        **({"quantize": v.quantize} if v.quantize != "none" else {}),
        "tokens": [{"index": i, "id": t, "text": s, "bytes": list(b)} for i, (t, s, b) in enumerate(zip(v.ids, v.labels, v.raw))],
        "query": {"index": v.query, "text": v.labels[v.query]},
        "direction": v.direction,
        "values": v.values,
        "positions": v.positions,
        "skip_first": v.skip_first,
        "renormalized": v.renormalized,
        "heads": [],
    }
    if v.find is not None:
        out["find"] = {"text": v.find, "positions": v.find_positions}
    if v.generated is not None:
        out["generated"] = v.generated
    for r in listed(v):
        head = {"layer": r.layer, "head": r.head, "kv_head": r.kv_head, "values": [plain(x) for x in r.values], "first_token_share": plain(r.first_share)}
        if v.top is not None and v.find is None:  # --top K: each head's K strongest positions, strongest first
            head["top"] = [v.positions[j] for j in strongest(r, v.top)]
        if v.renormalized:
            head["sink_only"] = r.sink_only
        if v.find is not None:
            head["match"] = plain(r.match)  # null: the layer's sliding window masks every match
        out["heads"].append(head)
    return json.dumps(out, ensure_ascii=False) + "\n"


CSV_HEADER = ["layer", "head", "kv_head", "query", "position", "token", "value"]


def to_csv(v: View) -> str:
    """One row per (layer, head, position); `query` is the chosen token, `position` the other one.
    With --top K: the K best heads (--find), or each head's K strongest positions."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEADER)
    for r in listed(v):
        keep = set(strongest(r, v.top)) if v.top and v.find is None else None  # --top K: each head's K strongest
        for j, (p, x) in enumerate(zip(v.positions, r.values)):
            if keep is not None and j not in keep:
                continue
            w.writerow([r.layer, r.head, r.kv_head, v.query, p, v.labels[p], "" if x is None else plain(x)])
    return buf.getvalue()


# --- the terminal table ------------------------------------------------------------------------


def levels(values: list[float | None], view: str) -> list[float | None]:
    """Values scaled to 0..1 for the heat strip: weights as they are, other views by the row's own range.
    Masked positions (None) stay None."""
    seen = [x for x in values if x is not None]
    if not seen:
        return list(values)
    if view == "weights":
        return [None if x is None else min(max(x, 0.0), 1.0) for x in values]
    lo = min(seen) if view == "scores" else 0.0
    hi = max(seen)
    span = hi - lo
    return [None if x is None else (x - lo) / span if span > 0 else 1.0 for x in values]


def bins(n: int, cells: int) -> list[range]:
    """Split n positions into at most `cells` consecutive runs of equal size (the last may be short)."""
    size = max(1, math.ceil(n / max(cells, 1)))
    return [range(a, min(a + size, n)) for a in range(0, n, size)]


def strip(scaled: list[float | None], cells: int, width: int, color: bool) -> Text:
    """The heat strip: one bar per position (`width` chars each), or the max over runs when too long;
    `·` where a sliding window masks every position of the cell."""
    t = Text()
    groups = bins(len(scaled), cells) if len(scaled) > cells else [range(i, i + 1) for i in range(len(scaled))]
    for g in groups:
        seen = [scaled[i] for i in g if scaled[i] is not None]
        if not seen:
            t.append("·" * width, style="dim" if color else None)
            continue
        x = max(seen)
        lv = min(len(BARS) - 1, int(x * len(BARS)))
        t.append(BARS[lv] * width, style=HEAT[lv] if color else None)
    return t


def strongest(r: HeadRow, k: int) -> list[int]:
    """Indices into the row's values of its k strongest (k = 0: all), strongest first; masked ones left out."""
    order = sorted((j for j, x in enumerate(r.values) if x is not None), key=lambda j: -r.values[j])
    return order[:k] if k else order


def listed(v: View) -> list[HeadRow]:
    """The rows every format lists: with --find and --top K, the K best heads; else all."""
    return v.rows[: v.top] if v.find is not None and v.top else v.rows


def top_sources(v: View, r: HeadRow, k: int, limit: int = 12, room: int = 0) -> Text:
    """The k strongest positions of a row (k = 0: all) as `index:token value`, as many as fit in `room` (0: all k)."""
    order = strongest(r, k)
    t = Text()
    for n, j in enumerate(order):
        p = v.positions[j]
        entry = Text("  " if n else "")
        entry.append(f"{p}:", style="dim")
        entry.append(show(v.labels[p], limit), style="bold" if p in v.find_positions else None)
        entry.append(f" {fmt(r.values[j], v.values)}")
        if room and n and t.cell_len + entry.cell_len > room:
            break
        t.append_text(entry)
    return t


def token_header(v: View, width: int, color: bool, max_lines: int = 3) -> list[Text]:
    """The tokens with their indices, the chosen one in brackets; a window around it when too long."""
    chunks = [f"[{i} {show(s, 24)}]" if i == v.query else f"{i} {show(s, 24)}" for i, s in enumerate(v.labels)]
    keep = list(range(len(chunks)))
    budget = width * max_lines
    if sum(len(c) + 2 for c in chunks) > budget:
        # The first tokens, then a window around the chosen one: grow it while it fits.
        head = list(range(min(3, len(chunks))))
        lo = hi = v.query
        used = sum(len(chunks[i]) + 2 for i in head) + len(chunks[v.query]) + 24
        while True:
            grew = False
            for j in (lo - 1, hi + 1):
                if head[-1] < j < len(chunks) and j not in range(lo, hi + 1) and used + len(chunks[j]) + 2 <= budget:
                    used += len(chunks[j]) + 2
                    lo, hi = min(lo, j), max(hi, j)
                    grew = True
            if not grew:
                break
        keep = head + list(range(lo, hi + 1))
    lines, line, prev = [], Text(), -1
    for i in keep:
        piece = Text()
        if i != prev + 1:
            piece.append(f"… {i - prev - 1} tokens …", style="dim")
            piece.append("  ")
        style = "bold reverse" if i == v.query and color else ("dim" if v.direction == "from" and i > v.query else None)
        piece.append(chunks[i], style=style)
        if line.cell_len and line.cell_len + 2 + piece.cell_len > width:
            lines.append(line)
            line = Text()
        elif line.cell_len:
            line.append("  ")
        line.append_text(piece)
        prev = i
    if hi_tail := len(chunks) - 1 - prev:
        line.append(f"  … {hi_tail} more", style="dim")
    lines.append(line)
    return lines


def table(v: View, width: int, color: bool, top: int) -> str:
    """The terminal view: header, one row per (layer, head) grouped by shared KV head, footer."""
    con = Console(file=io.StringIO(), width=width, force_terminal=color, no_color=not color, color_system="256" if color else None, highlight=False, emoji=False)
    con.print(Text(describe(v), style="bold"), overflow="fold")
    for line in token_header(v, width, color):
        con.print(line, overflow="ellipsis", no_wrap=True)
    if v.find is not None:
        _find_rows(con, v, width, color, top)
    else:
        _head_rows(con, v, width, color, top)
    if marked := sum(r.sink_only for r in v.rows):
        con.print(Text(f"* {marked} head{'s' if marked > 1 else ''} put under {SINK_ONLY:.0%} of their weight off the first token: "
                       "renormalised from almost nothing" + (", ranked last" if v.find is not None else ""), style="dim"), overflow="fold")
    foot = "JSON: --format json · CSV: --format csv · picture: -o attention.html"
    if not v.skip_first:
        foot += " · --skip-first hides the first token"
    con.print(Text(foot, style="dim"), overflow="fold")
    return con.file.getvalue()


def _strip_geometry(v: View, room: int) -> tuple[int, int]:
    """(cells, chars per cell) for a strip of the positions in `room` columns."""
    n = len(v.positions)
    if n <= room:
        return n, max(1, min(3, room // max(n, 1)))
    return max(1, room), 1


def ruler(positions: list[int], cells: int, cw: int, strip_w: int) -> str:
    """Token indices over the strip, each followed by a space so that none runs into the next:
    every cell's when they fit, else every 2nd, 5th, 10th, … cell's."""
    groups = bins(len(positions), cells) if len(positions) > cells else [range(i, i + 1) for i in range(len(positions))]
    widest = max((len(str(positions[g[0]])) for g in groups), default=1)
    step = next(s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 10**9) if s * cw >= widest + 1)
    out = [" "] * strip_w
    for n, g in enumerate(groups):
        label, at = str(positions[g[0]]), n * cw
        if n % step == 0 and at + len(label) <= strip_w and (at == 0 or out[at - 1] == " "):
            out[at : at + len(label)] = label
    return "".join(out)


def _head_rows(con: Console, v: View, width: int, color: bool, top: int) -> None:
    lw = max(len(str(max(r.layer for r in v.rows))), 1) if v.rows else 1
    label_w = lw + 8  # "L  kv  h " columns
    room = max(8, min(width - label_w - 6 - 30, 96)) if width >= 70 else max(8, width - label_w - 6)
    cells, cw = _strip_geometry(v, room)
    strip_w = min(cells, len(v.positions)) * cw if len(v.positions) <= cells else len(bins(len(v.positions), cells))
    inline = width - label_w - strip_w - 6 >= 28
    first, last = v.positions[0], v.positions[-1]
    span = f"{first}‥{last}" + (f" (max per {bins(len(v.positions), cells)[0].stop} tokens)" if len(v.positions) > cells else "")
    first_note = "raw weight on the first token" if v.direction == "from" else "mean raw weight the later tokens put on the first token"
    con.print(Text(f"strip: {v.values} over tokens {span}; 1st: {first_note}", style="dim"), overflow="fold")
    head = Text(f"{'L':>{lw}} {'kv':>2} {'h':>3} ", style="bold")
    head.append(ruler(v.positions, cells, cw, strip_w), style="dim")
    head.append(" ")
    head.append(f"{'1st':>4} ", style="bold")
    if inline:
        head.append(f"top {top}" if top else "all sources", style="bold")
    con.print(head, overflow="ellipsis", no_wrap=True)
    # A rule between layers, where a layer has several rows to keep apart (not with one head per layer).
    rules = len({r.layer for r in v.rows}) < len(v.rows)
    prev = None
    for r in v.rows:
        group = (r.layer, r.kv_head)
        lab = f"{r.layer:>{lw}} {r.kv_head:>2} " if group != prev else f"{'':>{lw}} {'':>2} "
        if rules and prev is not None and r.layer != prev[0]:
            con.print(Text("─" * min(width, label_w + strip_w + 5), style="dim"), no_wrap=True, overflow="crop")
        prev = group
        line = Text(lab)
        line.append(f"{r.head:>3} ")
        line.append_text(strip(levels(r.values, v.values), cells, cw, color))
        line.append(f" {fmt(r.first_share, 'weights'):>4}{'*' if r.sink_only else ' '}")
        srcs = top_sources(v, r, top, 12, room=width - (label_w + strip_w + 6 if inline else 3))
        if inline:
            line.append_text(srcs)
            con.print(line, overflow="ellipsis", no_wrap=True)
        else:
            con.print(line, overflow="ellipsis", no_wrap=True)
            con.print(Text(" " * 3).append_text(srcs), overflow="ellipsis", no_wrap=True)


def _find_rows(con: Console, v: View, width: int, color: bool, top: int) -> None:
    targets = ", ".join(f'{p}:{show(v.labels[p], 16)}' for p in v.find_positions[:8]) + (" …" if len(v.find_positions) > 8 else "")
    verb = "gives to" if v.direction == "from" else "receives from"
    con.print(Text(f'heads ranked by the {v.values} "{show(v.labels[v.query])}" {verb} "{v.find}" (tokens {targets})', style="dim"), overflow="fold")
    rows = v.rows[:top] if top else v.rows
    lw = max(len(str(r.layer)) for r in rows) if rows else 1
    bar_w = 10 if width >= 60 else 5
    head = Text(f"{'#':>3} {'L':>{lw}} {'h':>2} {'kv':>2} {'match':>6} {'':<{bar_w}} {'1st':>4} ", style="bold")
    inline = width - (3 + lw + 3 + 3 + 7 + bar_w + 6) >= 28
    if inline:
        head.append("top 3", style="bold")
    con.print(head, overflow="ellipsis", no_wrap=True)
    best = max((abs(r.match or 0.0) for r in rows), default=0.0) or 1.0
    for n, r in enumerate(rows, 1):
        frac = (r.match or 0.0) / best if v.values != "weights" else (r.match or 0.0)
        eighths = round(max(0.0, min(1.0, frac)) * bar_w * 8)
        bar = "█" * (eighths // 8) + ("▏▎▍▌▋▊▉"[eighths % 8 - 1] if eighths % 8 else "")
        line = Text(f"{n:>3} {r.layer:>{lw}} {r.head:>2} {r.kv_head:>2} {fmt(r.match or 0.0, v.values):>6} ")
        line.append(f"{bar:<{bar_w}}", style="green3" if color else None)
        line.append(f" {fmt(r.first_share, 'weights'):>4}{'*' if r.sink_only else ' '}")
        srcs = top_sources(v, r, 3, 12, room=width - (3 + lw + 3 + 3 + 7 + bar_w + 6 if inline else 4))
        if inline:
            con.print(line.append_text(srcs), overflow="ellipsis", no_wrap=True)
        else:
            con.print(line, overflow="ellipsis", no_wrap=True)
            con.print(Text(" " * 4).append_text(srcs), overflow="ellipsis", no_wrap=True)
    if len(v.rows) > len(rows):
        con.print(Text(f"{len(v.rows) - len(rows)} more heads: --top N shows more, --format json lists all", style="dim"), overflow="fold")
