"""Pictures of an inspect `View`: a self-contained HTML page and a standalone SVG, both a heatmap
of heads × tokens with the chosen token marked. Nothing is fetched: no fonts, scripts or CDNs."""

from __future__ import annotations

import html
from dataclasses import replace
from pathlib import Path

from cli.common import write_file
from cli.render import View, bins, describe, fmt, levels, listed, strongest
from cli.tokens import show

MAX_COLUMNS = 400  # longer rows are shown as runs of tokens (max per run), so files stay small
STOPS = [(0.0, (247, 251, 255)), (0.5, (107, 174, 214)), (1.0, (8, 48, 107))]  # ColorBrewer "Blues"


def color(t: float) -> str:
    """A 0..1 level as a hex colour on the white → blue scale."""
    t = min(max(t, 0.0), 1.0)
    for (a, ca), (b, cb) in zip(STOPS, STOPS[1:]):
        if t <= b:
            f = (t - a) / (b - a)
            return "#" + "".join(f"{round(x + (y - x) * f):02x}" for x, y in zip(ca, cb))
    return "#08306b"


def columns(v: View) -> list[tuple[str, list[int]]]:
    """The heatmap's columns: (label, indices into `positions`), one per token or per run of tokens."""
    n = len(v.positions)
    if n <= MAX_COLUMNS:
        return [(show(v.labels[p], 14), [j]) for j, p in enumerate(v.positions)]
    return [(f"{v.positions[g[0]]}–{v.positions[g[-1]]}", list(g)) for g in bins(n, MAX_COLUMNS)]


def chosen_column(v: View, cols: list[tuple[str, list[int]]]) -> int | None:
    for c, (_, idx) in enumerate(cols):
        if any(v.positions[j] == v.query for j in idx):
            return c
    return None


def cell_levels(v: View, cols) -> list[list[tuple[float, float]]]:
    """Per row and column: (level 0..1 for the colour, the value shown: the max over a run)."""
    out = []
    for r in v.rows:
        lv = levels(r.values, v.values)
        # A run the sliding window masks entirely: (None, None), drawn as masked.
        out.append([_run_max([lv[j] for j in idx], [r.values[j] for j in idx]) for _, idx in cols])
    return out


def _run_max(lv: list[float | None], vals: list[float | None]) -> tuple[float | None, float | None]:
    seen = [(a, b) for a, b in zip(lv, vals) if a is not None]
    return (max(a for a, _ in seen), max(b for _, b in seen)) if seen else (None, None)


def subtitle(v: View) -> str:
    parts = [v.model, f"{len(v.rows)} heads × {len(v.positions)} tokens"]
    if len(v.positions) > MAX_COLUMNS:
        parts.append(f"columns are runs of {bins(len(v.positions), MAX_COLUMNS)[0].stop} tokens (max)")
    if v.values == "weights":
        parts.append("colour: weight 0 → 1")
    else:
        parts.append("colour: each row's own range")
    parts.append("1st: raw weight on the first token" + ("" if v.direction == "from" else " (mean over the later tokens)"))
    if v.find is not None:
        parts.append(f'rows ranked by what goes to "{v.find}"')
    if any(r.sink_only for r in v.rows):
        parts.append("* under 1% of the head's weight off the first token" + (", ranked last" if v.find is not None else ""))
    return " · ".join(parts)


def write_picture(v: View, path: Path) -> None:
    """Write the HTML or SVG picture (by suffix) atomically."""
    v = replace(v, rows=listed(v))  # --find with --top K: the K best heads, as in the table and JSON
    text = svg(v) if path.suffix.lower() == ".svg" else page(v)
    write_file(path, text.encode("utf-8"))


# --- HTML -----------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#1b1b1b;background:#fff}
h1{font-size:18px;margin:0 0 4px}
.meta{color:#555;margin:0 0 10px}
.text{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;margin:0 0 14px;max-height:8em;overflow:auto;line-height:1.9}
.text span{border:1px solid #e4e4e4;border-radius:3px;padding:1px 2px;margin-right:1px;white-space:pre}
.text span.q{background:#d62728;color:#fff;border-color:#d62728}
.text span.f{background:#fde0a0}
.text span.out{color:#aaa}
.wrap{overflow:auto;max-height:85vh;border:1px solid #ddd;display:inline-block;max-width:100%}
table{border-collapse:collapse;font-size:11px}
thead th{position:sticky;top:0;background:#fff;z-index:1;font-weight:600}
th.tok{vertical-align:bottom;min-width:24px;max-width:24px;padding:0}
th.tok div{writing-mode:vertical-rl;transform:rotate(180deg);white-space:pre;font-family:ui-monospace,Menlo,Consolas,monospace;
  font-weight:400;max-height:110px;overflow:hidden;text-overflow:ellipsis;margin:0 auto;padding:3px 0}
th.tok.q div{color:#d62728;font-weight:700}
th.tok.f div{background:#fde0a0}
td{padding:0}
td.c{width:24px;height:18px;text-align:center;font-size:9px;border:1px solid #fff}
td.c.m{background:#d9d9d9;color:#888}
td.c.q{box-shadow:inset 2px 0 #d62728,inset -2px 0 #d62728}
td.n{font-family:ui-monospace,Menlo,Consolas,monospace;padding:0 6px;text-align:right;white-space:nowrap;color:#333}
td.top{font-family:ui-monospace,Menlo,Consolas,monospace;padding:0 8px;white-space:nowrap;color:#333}
tr.layer td{border-top:2px solid #999}
tr.kv td.n,tr.kv td.top{border-top:1px solid #ddd}
.legend{margin-top:10px;color:#555;font-size:12px;display:flex;align-items:center;gap:8px}
.legend .bar{width:180px;height:12px;background:linear-gradient(to right,#f7fbff,#6baed6,#08306b);border:1px solid #ccc}
"""


def page(v: View) -> str:
    """A self-contained HTML page: title, the text with the chosen token, the heatmap, a legend."""
    e = html.escape
    cols = columns(v)
    qcol = chosen_column(v, cols)
    cells = cell_levels(v, cols)
    fset = set(v.find_positions)
    find_cols = {c for c, (_, idx) in enumerate(cols) if any(v.positions[j] in fset for j in idx)}
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>attn inspect: {e(show(v.labels[v.query]))} ({v.query})</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{e(describe(v))}</h1>",
        f'<p class="meta">{e(subtitle(v))}</p>',
        '<p class="text">',
    ]
    seen = set(v.positions) | ({0} if v.skip_first else set())
    for i, s in enumerate(v.labels):
        cls = "q" if i == v.query else "f" if i in fset else "" if i in seen else "out"
        out.append(f'<span class="{cls}" title="{i} (id {v.ids[i]})">{e(s)}</span>')
    out.append("</p>")
    head = ["<tr>"]
    if v.find is not None:
        head.append('<th title="rank">#</th><th>match</th>')
    head.append("<th>layer</th><th>kv</th><th>head</th><th>1st</th>")
    for c, (label, idx) in enumerate(cols):
        cls = "tok" + (" q" if c == qcol else "") + (" f" if c in find_cols else "")
        title = ", ".join(str(v.positions[j]) for j in idx[:1]) + (f"–{v.positions[idx[-1]]}" if len(idx) > 1 else "")
        head.append(f'<th class="{cls}" title="token {title}"><div>{e(label)}</div></th>')
    head.append("<th>strongest</th></tr>")
    out += ['<div class="wrap"><table><thead>', "".join(head), "</thead><tbody>"]
    prev = None
    for n, (r, row) in enumerate(zip(v.rows, cells), 1):
        cls = "layer" if prev is not None and r.layer != prev[0] else "kv" if prev is not None and r.kv_head != prev[1] else ""
        prev = (r.layer, r.kv_head)
        tds = [f'<tr class="{cls}">']
        if v.find is not None:
            tds.append(f'<td class="n">{n}</td><td class="n">{fmt(r.match or 0.0, v.values)}</td>')
        tds.append(f'<td class="n">{r.layer}</td><td class="n">{r.kv_head}</td><td class="n">{r.head}</td><td class="n">{fmt(r.first_share, "weights")}{"*" if r.sink_only else ""}</td>')
        for c, ((lv, val), (label, idx)) in enumerate(zip(row, cols)):
            qc = " q" if c == qcol else ""
            if val is None:  # outside the layer's sliding window
                tip = f"layer {r.layer} head {r.head} → {label}: masked (outside the sliding window)"
                tds.append(f'<td class="c m{qc}" title="{e(tip)}">·</td>')
                continue
            text = fmt(val, v.values) if v.values == "weights" and val >= 0.1 and len(idx) == 1 else ""
            ink = "#fff" if lv > 0.55 else "#1b1b1b"
            tip = f"layer {r.layer} head {r.head} → {label}: {val:.6g}"
            tds.append(f'<td class="c{qc}" style="background:{color(lv)};color:{ink}" title="{e(tip)}">{text}</td>')
        order = strongest(r, 3 if v.top is None else v.top)  # --top K: the same K sources as the table
        top = "  ".join(f"{v.positions[j]}:{show(v.labels[v.positions[j]], 12)} {fmt(r.values[j], v.values)}" for j in order)
        tds.append(f'<td class="top">{e(top)}</td></tr>')
        out.append("".join(tds))
    scale = ("0", "1") if v.values == "weights" else ("row min" if v.values == "scores" else "0", "row max")
    out += [
        "</tbody></table></div>",
        f'<div class="legend"><span>{scale[0]}</span><span class="bar"></span><span>{scale[1]}</span>'
        '<span>· the chosen token\'s column is framed in red · hover a cell for its exact value</span></div>',
        "</body></html>",
    ]
    return "\n".join(out) + "\n"


# --- SVG ------------------------------------------------------------------------------------------


def svg(v: View) -> str:
    """A standalone SVG heatmap: rows (layer, head), columns tokens, the chosen token framed."""
    e = lambda s: html.escape(s, quote=True)  # noqa: E731
    cols = columns(v)
    qcol = chosen_column(v, cols)
    cells = cell_levels(v, cols)
    cw = max(6, min(26, 1100 // max(len(cols), 1)))
    ch = 16
    label_h = min(120, 8 + 7 * max((len(label) for label, _ in cols), default=1)) if cw >= 9 else 40
    ranked = v.find is not None
    left, first_w = (150 if ranked else 92), 36
    x0, y0 = left + first_w, 58 + label_h
    width = max(x0 + cw * len(cols) + 20, 24 + 7 * max(len(subtitle(v)), len(describe(v))))
    height = y0 + ch * len(v.rows) + 56
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" font-size="11">',
        f"<title>attn inspect: {e(show(v.labels[v.query]))} ({v.query})</title>",
        '<defs><linearGradient id="scale"><stop offset="0" stop-color="#f7fbff"/><stop offset="0.5" stop-color="#6baed6"/>'
        '<stop offset="1" stop-color="#08306b"/></linearGradient></defs>',
        f'<rect width="{width}" height="{height}" fill="#fff"/>',
        f'<text x="12" y="22" font-size="14" font-weight="bold" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">{e(describe(v))}</text>',
        f'<text x="12" y="40" fill="#555" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">{e(subtitle(v))}</text>',
        f'<text x="{left - 6}" y="{y0 - 6}" text-anchor="end" font-weight="bold">{"  # match " if ranked else ""}L kv  h</text>',
        f'<text x="{x0 - 4}" y="{y0 - 6}" text-anchor="end" font-weight="bold">1st</text>',
    ]
    step = 1 if cw >= 9 else max(1, round(10 / cw))
    for c, (label, idx) in enumerate(cols):
        if c % step and c != qcol:
            continue
        text = label if cw >= 9 else str(v.positions[idx[0]])
        x, y = x0 + c * cw + cw / 2 + 4, y0 - 4
        style = ' fill="#d62728" font-weight="bold"' if c == qcol else ""
        out.append(f'<text transform="translate({x:.1f},{y}) rotate(-90)"{style} xml:space="preserve">{e(text)}</text>')
    prev = None
    for n, (r, row) in enumerate(zip(v.rows, cells)):
        y = y0 + n * ch
        if prev is not None and r.layer != prev and not ranked:
            out.append(f'<line x1="8" x2="{x0 + cw * len(cols)}" y1="{y}" y2="{y}" stroke="#999"/>')
        prev = r.layer
        rank = f"{n + 1:>3} {fmt(r.match or 0.0, v.values):>5} " if ranked else ""
        out.append(f'<text x="{left - 6}" y="{y + ch - 4}" text-anchor="end" xml:space="preserve">{rank}{r.layer:>2} {r.kv_head:>2} {r.head:>2}</text>')
        out.append(f'<text x="{x0 - 4}" y="{y + ch - 4}" text-anchor="end" fill="#555">{fmt(r.first_share, "weights")}{"*" if r.sink_only else ""}</text>')
        for c, (lv, val) in enumerate(row):
            masked = val is None  # outside the layer's sliding window: grey, not the colour of 0
            tip = f"layer {r.layer} head {r.head} → {cols[c][0]}: " + ("masked (outside the sliding window)" if masked else f"{val:.6g}")
            fill = "#d9d9d9" if masked else color(lv)
            out.append(f'<rect x="{x0 + c * cw}" y="{y}" width="{cw - 1}" height="{ch - 1}" fill="{fill}"><title>{e(tip)}</title></rect>')
    if qcol is not None:
        out.append(f'<rect x="{x0 + qcol * cw - 1}" y="{y0 - 1}" width="{cw + 1}" height="{ch * len(v.rows) + 1}" fill="none" stroke="#d62728" stroke-width="2"/>')
    ly = y0 + ch * len(v.rows) + 20
    lo, hi = ("0", "1") if v.values == "weights" else ("row min" if v.values == "scores" else "0", "row max")
    out += [
        f'<text x="{x0 - 4}" y="{ly + 10}" text-anchor="end" fill="#555">{lo}</text>',
        f'<rect x="{x0}" y="{ly}" width="180" height="12" fill="url(#scale)" stroke="#ccc"/>',
        f'<text x="{x0 + 186}" y="{ly + 10}" fill="#555">{hi} · the chosen token is framed in red</text>',
        "</svg>",
    ]
    return "\n".join(out) + "\n"
