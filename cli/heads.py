"""`attn heads`: a map of what every head does — attention measures and head-detector scores."""

from __future__ import annotations

import csv
import html
import io
import json
import math
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from cli.common import (
    epilog,
    choice,
    one_of,
    Color,
    ColorOpt,
    DeviceOpt,
    Dtype,
    DtypeOpt,
    FileOpt,
    InvalidUtf8Opt,
    ModelOpt,
    NoStdinOpt,
    PromptArg,
    PromptOpt,
    QuietOpt,
    RawChatOpt,
    SystemOpt,
    VerboseOpt,
    note,
    use_color,
    stdout_console,
    write_file,
    write_out,
)
from cli.main import app
from cli.models import Loaded, open_model
from cli.parallel import TpOpt, release, start
from cli.prompt import encode_messages, encode_prompt, read_prompt
from cli.requests import parse_jsonl, parse_lines
from cli.tokens import tokens_json
from model.errors import AttnError, UsageError
from model.heads import DETECTORS, MEASURES, HeadStats, head_stats, induction_sequence

EPILOG = """\
Examples:

  attn heads                                   # the induction probe: random tokens, repeated

  attn heads "a fluffy blue creature roamed the verdant forest" --sort previous --top 10

  attn heads "the cat sat on the mat" --probe induction --format csv > heads.csv

  attn heads --sort induction -o heads.html

  attn heads -f prompts.txt --lines --sort first     # pooled over every token of every prompt

Columns, over the rows i of each head's attention α (row 0 sees only itself and is left out):
  kv        the key/value head it reads (grouped-query attention: query heads share them)
  entropy   mean of −Σ_j α_ij log2 α_ij (bits)     dist  mean of Σ_j α_ij (i − j) (tokens)
  first     mean of α_i0 (the attention sink)      self  mean of α_ii
  prev      mean of α_i,i−1 over rows i ≥ 2 (in row 1 the previous token is the first)
  prev-tok  Σ_{i≥2} α_i,i−1 / Σ_{i≥2} Σ_{j≥1} α_ij: the share of what is not on the first token
            that goes to the previous one; — when under 1% is off the first token
  dup-tok   weight on earlier copies of token i; induct: on the tokens that followed them
            (TransformerLens's detectors, averaged over the rows that have any; induct only from the probe)
Measures are taken on the prompt; detectors on the induction probe when it runs, else on the prompt.
With --lines/--jsonl each is the mean over every row of every prompt, with its spread (± sd) and row count.
"""

INDICES = ("layer", "head", "kv_head")  # sorted smallest first always
COLUMNS = (*INDICES, *MEASURES, *DETECTORS)
HEADERS = {"kv_head": "kv", "previous": "prev", "previous_token": "prev-tok", "duplicate_token": "dup-tok", "distance": "dist", "induction": "induct"}


class HeadsFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


class ProbeKind(str, Enum):
    induction = "induction"
    none = "none"


# --sort and --measure take a column by its table header or its JSON name (prev-tok or previous_token).
Column = Enum("Column", {c: c for c in COLUMNS}, type=str)  # type: ignore[misc]
Measure = Enum("Measure", {c: c for c in (*MEASURES, *DETECTORS)}, type=str)  # type: ignore[misc]  # the grid's: no indices
ALIASES = {h: c for c, h in HEADERS.items()} | {c.replace("_", "-"): c for c in COLUMNS}
SORT = choice(Column, ALIASES, "COLUMN", "a column, by its header or JSON name: " + one_of([HEADERS.get(c, c) for c in COLUMNS]))
MEASURE = choice(Measure, ALIASES, "COLUMN", "a measure or detector, by its header or JSON name: " + one_of([HEADERS.get(c, c) for c in (*MEASURES, *DETECTORS)]))


@app.command("heads", short_help='Measure what every head does: sink, previous token, induction, …', epilog=epilog(EPILOG))
def heads_cmd(
    prompt: PromptArg = None,
    model: ModelOpt = None,
    prompt_opt: PromptOpt = None,
    file: FileOpt = None,
    probe: Annotated[Optional[ProbeKind], typer.Option("--probe", **choice(ProbeKind), help="Also run the induction probe: a random token sequence, repeated; detectors are scored on it. [default: induction with no prompt, else none]", show_default=False)] = None,
    probe_length: Annotated[int, typer.Option("--probe-length", min=4, max=1024, help="Random tokens in each half of the probe sequence.")] = 50,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the probe's random tokens (not a sampling seed: ATTN_SEED is not read).")] = 0,
    sort: Annotated[Optional[Column], typer.Option("--sort", **SORT, help="Column to sort by, strongest first, by its table header or JSON name: layer, head, kv, entropy, dist, first, prev, self, prev-tok, dup-tok, induct. [default: induct when the probe ran, else prev]", show_default=False)] = None,
    ascending: Annotated[bool, typer.Option("--ascending", help="Sort smallest first (e.g. the sharpest heads by entropy); layer, head and kv always are.")] = False,
    top: Annotated[Optional[int], typer.Option("--top", min=0, help="Show the first K rows after sorting (0 = all). [default: 20 in the table, all in JSON/CSV]", show_default=False)] = None,
    fmt: Annotated[Optional[HeadsFormat], typer.Option("--format", **choice(HeadsFormat), help="table (to read), json or csv (for scripts). [default: table on a terminal, else json]", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write a layers × heads grid coloured by --measure: FILE.svg or FILE.html (self-contained); stdout then stays empty unless --format is given.", show_default=False)] = None,
    measure: Annotated[Optional[Measure], typer.Option("--measure", **MEASURE, help="The column the -o grid shows: entropy, dist, first, prev, self, prev-tok, dup-tok or induct. [default: the sort column]", show_default=False)] = None,
    lines: Annotated[bool, typer.Option("--lines", help="The input (-f FILE or stdin) is many prompts, one a line: every measure pooled over all their tokens, with its spread.")] = False,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="As --lines, the input being requests as `attn batch` reads them ({\"prompt\": …} or {\"messages\": …} a line).")] = False,
    parallel: Annotated[int, typer.Option("--parallel", min=1, help="With --lines/--jsonl: prompts measured in one pass.")] = 16,
    chat: RawChatOpt = False,
    system: SystemOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    tp: TpOpt = None,
    no_stdin: NoStdinOpt = False,
    invalid_utf8: InvalidUtf8Opt = "error",
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    color: ColorOpt = Color.auto,
) -> None:
    """Measure what every (layer, head) attends to: entropy, distance, sink/previous/self shares, head detectors."""
    start(tp, model, device, quiet)
    if output is not None and output.suffix.lower() not in (".svg", ".html", ".htm"):
        raise UsageError(f"-o {output}: the picture must be a .svg or .html file")
    if lines and jsonl:
        raise UsageError("--lines and --jsonl are alternatives: choose one")
    text = read_prompt(prompt, prompt_opt, file, no_stdin, invalid_utf8, quiet)
    if text == "":
        raise UsageError("empty prompt")
    many = lines or jsonl
    if many and text is None:
        raise UsageError(f"{'--lines' if lines else '--jsonl'} reads prompts from -f FILE or stdin: give one")
    if text is None and probe is ProbeKind.none:
        raise UsageError("--probe none with no prompt leaves nothing to measure: give a prompt, or drop --probe none")
    probe = probe or (ProbeKind.induction if text is None else ProbeKind.none)
    if fmt is None and output is None:  # with -o the picture is the product (as inspect's); stdout only if --format asks
        fmt = HeadsFormat.table if sys.stdout.isatty() else HeadsFormat.json
    m = open_model(model, device, dtype, quiet)
    ids = prompts = None
    if many:
        prompts = dataset_ids(m, text, jsonl, chat, system, quiet)
    elif text is not None:
        ids = encode_prompt(m, text, chat, system)[0]
        if len(ids) < 3:
            raise UsageError(f"the prompt has {len(ids)} token{'s' if len(ids) > 1 else ''}: head measures need at least three (with two, the previous token is the first)")
        prompts = [ids]
    probe_ids = None
    if probe is ProbeKind.induction:
        probe_ids = induction_probe(m, probe_length, seed)
        if text is None:
            note(f"no prompt: measuring on the induction probe ({probe_length} random tokens, repeated; seed {seed})", quiet)
            ids = probe_ids
    stats = head_stats(m.model, prompts, probe_ids, parallel)
    release()
    rows = head_rows(m, stats, spread=many)
    by = (sort.value if sort else None) or ("induction" if probe_ids is not None else "previous")
    rows = sort_rows(rows, by, ascending)
    if output is not None:
        by_measure = measure.value if measure else by
        if by_measure in ("layer", "head", "kv_head"):
            raise UsageError(f"-o draws a measure: --sort {HEADERS.get(by_measure, by_measure)} is not one; add --measure COLUMN")
        write_grid(output, m, stats, by_measure, spread=many)
        note(f"wrote {output}", quiet)
    if fmt is HeadsFormat.json:
        shown = rows[:top] if top else rows
        doc = {"model": m.name}
        if many:
            doc["dataset"] = {"prompts": stats.prompts, "tokens": stats.tokens, "rows": {k: v.tolist() for k, v in stats.n.items()}}
        else:
            doc["tokens"] = tokens_json(m.tokenizer, ids)
        doc["heads"] = shown
        doc["probe"] = {"kind": "induction", "length": probe_length, "seed": seed, "ids": probe_ids} if probe_ids else None
        write_out(json.dumps(doc, ensure_ascii=False) + "\n")
    elif fmt is HeadsFormat.csv:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        for r in rows[:top] if top else rows:
            w.writerow({k: "" if v is None else v for k, v in r.items()})
        write_out(buf.getvalue())
    elif fmt is HeadsFormat.table:
        k = 20 if top is None else top
        over = f"over {stats.prompts} prompts ({stats.tokens} tokens)" if many else None
        render_table(rows[:k] if k else rows, len(rows), by, ascending, probe_ids is not None, use_color(color, sys.stdout), over)


def dataset_ids(m: Loaded, text: str, jsonl: bool, chat: bool, system: str | None, quiet: bool) -> list[list[int]]:
    """The token ids of every prompt of the input (a line each, or JSONL requests); prompts under three tokens left out."""
    items = parse_jsonl(text) if jsonl else parse_lines(text)
    out, short = [], 0
    for item in items:
        if item.error is not None:
            raise UsageError(f"line {item.line}: {item.error}")
        f = item.fields
        try:
            ids = encode_messages(m, f["messages"]) if "messages" in f else encode_prompt(m, f["prompt"], chat, system)[0]
        except AttnError as e:
            raise type(e)(f"line {item.line}: {e}") from None
        if len(ids) > m.cfg.max_len:
            raise AttnError(f"line {item.line}: prompt of {len(ids)} tokens exceeds the model's {m.cfg.max_len} positions")
        if len(ids) < 3:
            short += 1
            continue
        out.append(ids)
    if short:
        note(f"{short} prompt(s) under three tokens left out: head measures need at least three", quiet)
    if not out:
        raise UsageError("no prompt of three tokens or more in the input")
    return out


def induction_probe(m: Loaded, length: int, seed: int) -> list[int]:
    """Random ordinary tokens (no special ones), repeated, after whatever the tokenizer puts at the start."""
    prefix = m.tokenizer.encode("")  # e.g. Llama's <s>: prompts start this way, so the probe does too
    vocab = min(m.tokenizer.vocab_size, m.cfg.vocab_size)
    candidates = [i for i in range(vocab) if i not in m.tokenizer.special_ids]
    if len(prefix) + 2 * length > m.cfg.max_len:
        raise UsageError(f"--probe-length {length}: the probe of {len(prefix) + 2 * length} tokens exceeds the model's {m.cfg.max_len} positions")
    try:
        return induction_sequence(candidates, length, seed, prefix)
    except ValueError as e:
        raise UsageError(f"--probe-length {length}: {e}") from None


def head_rows(m: Loaded, stats: HeadStats, spread: bool = False) -> list[dict]:
    """One plain dict per (layer, head), every measure a float or None (detector not run, or prev-tok of a head
    that only sinks); with `spread`, each measure's standard deviation over its rows (`NAME_sd`) and their count (`NAME_n`) too."""
    L, H = stats.entropy.shape
    names = (*MEASURES, *DETECTORS)
    cols = {name: stats.get(name) for name in names}
    if spread:
        cols |= {f"{name}_sd": stats.sd.get(name) for name in names}
        cols |= {f"{name}_n": None if name not in stats.n else stats.n[name][:, None].expand(L, H) for name in names}
    rows = []
    for layer in range(L):
        for head in range(H):
            r = {"layer": layer, "head": head, "kv_head": m.cfg.kv_head(head)}
            for name, t in cols.items():
                if name.endswith("_n"):
                    r[name] = None if t is None else int(t[layer, head])
                    continue
                x = None if t is None else float(t[layer, head])
                r[name] = None if x is None or math.isnan(x) else x  # NaN: too little weight off the first token to say
            if spread and r.get("previous_token") is None:
                r["previous_token_sd"] = None
            rows.append(r)
    return rows


def no_values(column: str) -> str:
    """Why a column has no value in any row."""
    if column == "previous_token":  # always computed: null only for heads that park ≥ 99% on the first token
        return "no head has 1% of its attention off the first token"
    return "that detector was not run (add --probe induction)"


def sort_rows(rows: list[dict], by: str, ascending: bool) -> list[dict]:
    """Strongest first (smallest with `ascending`); rows without the value (detector not run) last."""
    if all(r[by] is None for r in rows):
        raise UsageError(f"--sort {by}: {no_values(by)}")
    if by in INDICES:
        ascending = True  # indices read smallest first, --ascending or not
    sign = 1 if ascending else -1
    return sorted(rows, key=lambda r: (r[by] is None, sign * (r[by] or 0), r["layer"], r["head"]))


def cell(c: str, v) -> str:
    """A value as the table prints it."""
    if v is None:
        return "—"
    if isinstance(v, int):
        return str(v)
    return f"{v:.1f}" if c in ("distance", "distance_sd") else f"{v:.3f}"


def fitting_columns(rows: list[dict], by: str, width: int, columns: tuple[str, ...] = COLUMNS, spread: str | None = None) -> list[str]:
    """The columns that fit `width` whole: layer, head, the sort column (and its spread) always, then the others in order.

    A column is never cut or wrapped (a number or a header in pieces says nothing); a narrow terminal
    leaves whole columns out instead, and the footer names them.
    """
    sep = 2  # the space between two columns; the table's edges take one more on each side
    need = {c: max(len(header(c, spread)), *(len(cell(c, r[c])) for r in rows)) for c in columns}
    keep = ["layer", "head"] + ([by] if by not in ("layer", "head") else []) + ([spread] if spread else [])
    used = 2 + sum(need[c] for c in keep) + sep * (len(keep) - 1)
    for c in columns:
        if c not in keep and used + sep + need[c] <= width:
            keep.append(c)
            used += sep + need[c]
    return [c for c in columns if c in keep]


def header(c: str, spread: str | None = None) -> str:
    return "±" if c == spread else HEADERS.get(c, c)


def render_table(rows: list[dict], total: int, by: str, ascending: bool, probed: bool, color: bool, over: str | None = None) -> None:
    """The table; `over` names the dataset the measures are means over (the sort column's spread then follows it, as ±)."""
    console = stdout_console(color_system="auto" if color else None, force_terminal=color or None, highlight=False)
    spread = f"{by}_sd" if over and f"{by}_sd" in rows[0] else None
    order = COLUMNS if spread is None else tuple(x for c in COLUMNS for x in ((c, spread) if c == by else (c,)))
    columns = fitting_columns(rows, by, console.width, order, spread)
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left", collapse_padding=True)
    t.title = f"sorted by {by}{' (smallest first)' if ascending and by not in INDICES else ''}" + (f"; means {over}" if over else "")
    t.title += "" if probed else f"; detectors on the prompt{'s' if over else ''} (induction: --probe induction)"
    for c in columns:
        t.add_column(header(c, spread), justify="right", no_wrap=True, style="underline" if c == by else None, header_style="bold underline" if c == by else "bold")
    for r in rows:
        cells = []
        for c in columns:
            v = r[c]
            strong = isinstance(v, float) and c not in ("entropy", "distance", spread) and v >= 0.5
            cells.append(Text(cell(c, v), style="dim" if v is None else "bold" if strong else ""))
        t.add_row(*cells)
    console.print(t)
    more = total - len(rows)
    foot = f"{more} more row(s): --top 0 shows all; " if more else ""
    foot += "± is the standard deviation over the tokens; " if spread else ""
    left_out = [HEADERS.get(c, c) for c in COLUMNS if c not in columns]
    if left_out:
        foot += f"too narrow for {', '.join(left_out)} (--format csv has every column); "
    console.print(Text(foot + "entropy in bits; dist in tokens; --format json|csv for pipelines", style="dim"))


# --- the layers × heads picture -------------------------------------------------------------------


SVG_NS = ' xmlns="http://www.w3.org/2000/svg"'  # a namespace name, never fetched; inline SVG in HTML needs none


def _heat(v: float | None, lo: float, hi: float) -> str:
    """White → deep blue over [lo, hi]; grey for no value."""
    if v is None:
        return "#dddddd"
    f = 0.0 if hi <= lo else min(1.0, max(0.0, (v - lo) / (hi - lo)))
    r, g, b = (round(255 + (c - 255) * f) for c in (8, 48, 107))
    return f"#{r:02x}{g:02x}{b:02x}"


def grid_svg(values: list[list[float | None]], title: str, lo: float, hi: float, standalone: bool = True, hover: list[list[str]] | None = None) -> str:
    """A standalone SVG: one cell per (layer, head), layers down, heads across, value written in each cell
    (`hover`: each cell's tooltip beyond its value)."""
    L, H = len(values), len(values[0])
    cw, ch, left, top = 46, 20, 64, 48
    w, h = left + H * cw + 20, top + L * ch + 44
    out = [
        f'<svg{SVG_NS if standalone else ""} width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{left}" y="18" font-size="14">{html.escape(title)}</text>',
    ]
    for j in range(H):
        out.append(f'<text x="{left + j * cw + cw / 2}" y="{top - 8}" text-anchor="middle">h{j}</text>')
    for i in range(L):
        y = top + i * ch
        out.append(f'<text x="{left - 6}" y="{y + ch * 0.7}" text-anchor="end">layer {i}</text>')
        for j in range(H):
            v = values[i][j]
            fill = _heat(v, lo, hi)
            dark = v is not None and hi > lo and (v - lo) / (hi - lo) > 0.55
            label = "—" if v is None else f"{v:.2f}"
            tip = html.escape(label + (hover[i][j] if hover and v is not None else ""))
            out.append(
                f'<rect x="{left + j * cw}" y="{y}" width="{cw - 1}" height="{ch - 1}" fill="{fill}"><title>layer {i} head {j}: {tip}</title></rect>'
                f'<text x="{left + j * cw + cw / 2}" y="{y + ch * 0.7}" text-anchor="middle" fill="{"white" if dark else "#222"}">{label}</text>'
            )
    out.append(f'<text x="{left}" y="{top + L * ch + 24}" fill="#555">colour: {lo:.2f} (white) → {hi:.2f} (blue); made by attn heads</text>')
    out.append("</svg>")
    return "\n".join(out)


def write_grid(path: Path, m: Loaded, stats: HeadStats, name: str, spread: bool = False) -> None:
    """The -o picture of one measure; with `spread` (a dataset), each mean's standard deviation and row count on hover."""
    t = stats.get(name)
    if t is None:
        raise UsageError(f"--measure {name}: {no_values(name)}")
    values = [[None if math.isnan(x) else x for x in row] for row in t.tolist()]
    flat = [v for row in values for v in row if v is not None]
    lo, hi = (0.0, 1.0) if name not in ("entropy", "distance") else (min(flat), max(flat))
    title = f"{m.name}: {name} per layer × head"
    hover = None
    if spread and name in stats.sd:
        title += f", mean over {stats.prompts} prompts ({stats.tokens} tokens)"
        sd, n = stats.sd[name].tolist(), stats.n[name].tolist()
        hover = [[f" ± {s:.3f} (sd over {n[i]} rows)" for s in row] for i, row in enumerate(sd)]
    svg = grid_svg(values, title, lo, hi, standalone=path.suffix.lower() == ".svg", hover=hover)
    if path.suffix.lower() == ".svg":
        doc = '<?xml version="1.0" encoding="UTF-8"?>\n' + svg + "\n"
    else:
        doc = (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            "<style>body{font-family:sans-serif;margin:16px}</style></head><body>\n"
            f"{svg}\n"
            "<p style='color:#555;font-size:12px'>Hover a cell for its value. Rows are layers, columns query heads.</p>"
            "</body></html>\n"
        )
    write_file(path, doc.encode("utf-8"))
