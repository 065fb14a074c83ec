"""`attn inspect`: the attention of one chosen token, per layer and head, as a table, JSON, CSV or picture."""

from __future__ import annotations

import secrets
import shutil
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from cli.common import (
    epilog,
    choice,
    Color,
    ColorOpt,
    DeviceOpt,
    Dtype,
    DtypeOpt,
    FileOpt,
    InvalidUtf8Opt,
    MinPOpt,
    ModelOpt,
    NoStdinOpt,
    OccurrenceOpt,
    PromptArg,
    PromptOpt,
    QuietOpt,
    RawChatOpt,
    RepeatLastNOpt,
    RepeatPenaltyOpt,
    SeedOpt,
    SystemOpt,
    TempOpt,
    TokenOpt,
    TopKOpt,
    TopPOpt,
    VerboseOpt,
    note,
    sampling_settings,
    use_color,
    write_out,
)
from cli.continuation import run_generation
from cli.main import app
from cli.models import Loaded, open_model
from cli.parallel import TpOpt, rank0, release, start
from cli.prompt import encode_prompt, prompt_or_demo
from cli.render import SINK_ONLY, HeadRow, View, table, to_csv, to_json
from cli.speed import Quantize, QuantizeOpt
from cli.tokens import find_positions, is_index, pick_indices, pick_token, token_labels, token_raw
from model.errors import AttnError, UsageError
from model.loading import load_generation_config
from model.probe import Capture, capture

EPILOG = """\
Examples:

  attn inspect --head 3                       # the demo sentence, every layer

  attn inspect "a fluffy blue creature roamed the verdant forest" --token creature --find blue

  attn inspect "The cat sat on the mat" -t -1 -l -1 --format json | jq '.heads[0]'

  attn inspect "Once upon a time" --generate 8 --temp 0 -o attention.html
"""


class Direction(str, Enum):
    from_ = "from"
    to = "to"


class Values(str, Enum):
    weights = "weights"
    scores = "scores"
    value_norms = "value-norms"


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


@app.command("inspect", short_help='Show where one token looks, per layer and head.', epilog=epilog(EPILOG))
def inspect_cmd(
    prompt: PromptArg = None,
    model: ModelOpt = None,
    prompt_opt: PromptOpt = None,
    file: FileOpt = None,
    token: TokenOpt = None,
    occurrence: OccurrenceOpt = None,
    layer: Annotated[Optional[list[int]], typer.Option("--layer", "-l", metavar="N", help="Layer index, repeatable; negative from the end. [default: all]", show_default=False)] = None,
    head: Annotated[Optional[list[int]], typer.Option("--head", metavar="N", help="Query head, repeatable; negative from the end (with grouped-query attention several query heads share one key/value head, the table's kv). [default: all]", show_default=False)] = None,
    direction: Annotated[Direction, typer.Option("--direction", **choice(Direction), help="from: the chosen token as query (a row); to: how much each later token attends to it (a column).")] = Direction.from_,
    values: Annotated[Values, typer.Option("--values", **choice(Values), help="weights (softmax), scores (QKᵀ/√d before softmax) or value-norms (‖α·v·W_O‖: how far each source moves the head's output, W_O its output projection).")] = Values.weights,
    skip_first: Annotated[bool, typer.Option("--skip-first", help="Leave the first token (often an attention sink) out and renormalise the rest by the sum of the others; its raw share is still shown. A head with under 1% off the first token is marked * and ranked last by --find.")] = False,
    find: Annotated[Optional[str], typer.Option("--find", help="Rank every (layer, head) by what the chosen token gives to tokens matching TEXT.", show_default=False)] = None,
    top: Annotated[Optional[int], typer.Option("--top", min=0, help="The K strongest sources per head; with --find, the K best heads; 0 = all. Given, every format lists the same K (JSON: each head's top positions). [default: 3 sources / 10 heads in the table, all elsewhere]", show_default=False)] = None,
    fmt: Annotated[Optional[Format], typer.Option("--format", **choice(Format), help="table (to read), json or csv (for scripts). [default: table on a terminal, else json]", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write a self-contained picture: FILE.html or FILE.svg; stdout then stays empty unless --format is given.", show_default=False)] = None,
    generate_n: Annotated[int, typer.Option("--generate", min=0, help="Generate N tokens first (sampling flags as in generate), then inspect prompt + generated.")] = 0,
    temp: TempOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatPenaltyOpt = None,
    repeat_last_n: RepeatLastNOpt = 64,
    seed: SeedOpt = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="With --generate: keep going past end-of-sequence tokens.")] = False,
    chat: RawChatOpt = False,
    system: SystemOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    quantize: QuantizeOpt = Quantize.none,
    tp: TpOpt = None,
    no_stdin: NoStdinOpt = False,
    invalid_utf8: InvalidUtf8Opt = "error",
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    color: ColorOpt = Color.auto,
) -> None:
    """Show the attention of one token, per layer and head: where it looks, how strongly, and why."""
    start(tp, model, device, quiet, {"--quantize": quantize is not Quantize.none})
    if output is not None and output.suffix.lower() not in (".html", ".htm", ".svg"):
        raise UsageError(f"--output must end in .html or .svg (got {output.name!r})")
    if occurrence == 0:
        raise UsageError("--occurrence counts from 1 (or from -1 at the end); 0 is not a position")
    if occurrence is not None and (token is None or is_index(token)):
        raise UsageError("--occurrence goes with --token TEXT")
    text = prompt_or_demo(prompt, prompt_opt, file, no_stdin, invalid_utf8, quiet)
    m = open_model(model, device, dtype, quiet, quantize.value)
    if quantize is not Quantize.none:
        note(f"weights quantized ({quantize.value}): the attention shown is the quantized model's", quiet)
    ids, labels = encode_prompt(m, text, chat, system)
    prompt_len = len(ids)
    generated, cached = None, 0
    if generate_n:
        settings = sampling_settings(m.path, load_generation_config(m.path), temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n)
        if seed is None:
            seed = rank0(secrets.randbelow, 2**31)
            if verbose:
                note(f"seed {seed}")
        new = run_generation(m, ids, generate_n, settings, seed, ignore_eos, chat)
        cached = len(ids) + len(new) - 1  # generation fed every token but the last one: their K, V are cached
        gen_text = m.tokenizer.decode(new)
        ids = ids + new
        labels = labels + token_labels(m.tokenizer, new)
        generated = {"tokens": len(new), "text": gen_text, "seed": seed}
        note(f"generated {len(new)} tokens: {gen_text!r}", quiet)
        if not new:
            raise AttnError("the model ended the text at once (end-of-sequence); nothing generated (try --ignore-eos)")

    raw = token_raw(m.tokenizer, ids)
    query, token_note = pick_token(raw, token, occurrence)
    layers = pick_indices(layer, m.cfg.n_layers, "layer", "layers")
    heads = pick_indices(head, m.cfg.n_heads, "head", "query heads")
    if skip_first and query == 0:
        raise UsageError("--skip-first leaves out token 0, which is the chosen token: choose a later one")
    find_pos, find_note = find_positions(raw, find, query, direction.value) if find is not None else ([], None)
    for said in (token_note, find_note):
        if said:
            note(said, quiet)

    cap = capture(m.model, ids, query, layers, heads, direction.value, values.value, cached=cached)
    release()
    view = build_view(m, ids, labels, cap, skip_first, find, find_pos, prompt_len, generated)
    view.raw = raw
    view.top = top

    if fmt is None and output is None:  # with -o the picture is the product; stdout only if --format asks
        fmt = Format.table if sys.stdout.isatty() else Format.json
    if output is not None:
        from cli.pictures import write_picture

        write_picture(view, output)
        note(f"wrote {output} ({len(view.rows)} heads × {len(view.positions)} tokens)", quiet)
    if fmt is Format.json:
        write_out(to_json(view))
    elif fmt is Format.csv:
        write_out(to_csv(view))
    elif fmt is Format.table:
        width = shutil.get_terminal_size((80, 24)).columns
        k = top if top is not None else (10 if find is not None else 3)
        write_out(table(view, max(width, 20), use_color(color, sys.stdout), k))


# --- steps ------------------------------------------------------------------------------------


def build_view(m: Loaded, ids, labels, cap: Capture, skip_first: bool, find: str | None, find_pos: list[int], prompt_len: int, generated) -> View:
    """The capture as plain rows: renormalised without the first token if asked, ranked for --find."""
    positions = list(cap.positions)
    keep = slice(1, None) if skip_first and cap.direction == "from" else slice(None)
    renorm = skip_first and cap.view != "scores"  # scores are pre-softmax: leaving one out changes nothing else
    rows = []
    for layer, lc in cap.layers.items():
        vals = lc.values
        if renorm:
            # Divided by the sum of the other weights of the same row (float64), so a renormalised row
            # sums to 1 and no weight exceeds 1 even when the first token takes all but 1e-7.
            vals = torch.where(lc.rest > 0, vals.double() / lc.rest.clamp_min(1e-300), torch.zeros_like(lc.rest))
        vals = vals[:, keep]
        masked = lc.masked[keep].tolist()  # outside the layer's sliding window: shown as masked, not as 0
        # (h,): the query row's share for `from`; for `to`, the mean over the later rows
        first = lc.sink[:, 0] if cap.direction == "from" else lc.sink.double().mean(dim=-1)
        off_first = lc.rest[:, 0] if cap.direction == "from" else lc.rest.mean(dim=-1)
        for n, (h, g) in enumerate(zip(cap.heads, cap.kv_heads)):
            sink_only = renorm and float(off_first[n]) < SINK_ONLY
            row = [None if out else x for x, out in zip(vals[n].tolist(), masked)]
            rows.append(HeadRow(layer, h, g, row, float(first[n]), sink_only=sink_only))
    positions = positions[keep]
    if find is not None:
        idx = [positions.index(p) for p in find_pos if p in positions]
        if not idx:
            raise UsageError(f"--find {find!r}: its only match is the first token, which --skip-first leaves out")
        find_pos = [positions[j] for j in idx]
        for r in rows:
            picked = [r.values[j] for j in idx if r.values[j] is not None]  # masked matches are left out
            if picked:
                r.match = max(picked) if cap.view == "scores" else sum(picked)  # summed scores mean nothing: take the best
        # Heads whose window masks every match rank last (match None); before them, a head that puts almost
        # nothing off the first token (SINK_ONLY) cannot top the ranking on what is left.
        rows.sort(key=lambda r: (r.match is None, r.sink_only, -(r.match or 0.0), r.layer, r.head))
    else:
        rows.sort(key=lambda r: (r.layer, r.kv_head, r.head))
    return View(
        model=m.name,
        quantize=m.quantize,
        ids=list(ids),
        labels=labels,
        query=cap.query,
        direction=cap.direction,
        values=cap.view,
        positions=positions,
        rows=rows,
        skip_first=skip_first,
        renormalized=renorm,
        find=find,
        find_positions=find_pos,
        prompt_tokens=prompt_len,
        generated=generated,
    )
