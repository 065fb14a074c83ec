"""`attn explain`: one head's attention for one token, stage by stage, with the model's real numbers."""

from __future__ import annotations

import json
import math
import sys
from enum import Enum
from typing import Annotated, Optional

import torch
import typer
from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from cli.common import (
    stdout_console,
    epilog,
    choice,
    Color,
    ColorOpt,
    DeviceOpt,
    Dtype,
    DtypeOpt,
    FileOpt,
    InvalidUtf8Opt,
    ModelOpt,
    NoStdinOpt,
    OccurrenceOpt,
    PromptArg,
    PromptOpt,
    QuietOpt,
    RawChatOpt,
    SystemOpt,
    TokenOpt,
    VerboseOpt,
    note,
    use_color,
    write_out,
)
from cli.main import app
from cli.models import Loaded, open_model
from cli.parallel import TpOpt, release, start
from cli.prompt import encode_prompt, prompt_or_demo
from cli.speed import Quantize, QuantizeOpt
from cli.tokens import is_index, pick_indices, pick_token, show, token_raw, tokens_json
from model.errors import UsageError
from model.explain import Explanation, explain, query_rows

EPILOG = """\
Examples:

  attn explain "a fluffy blue creature roamed the verdant forest" --token creature --layer 16 --head 0

  attn explain --token creature                # demo sentence; picks the head with the sharpest attention

  attn explain --token -1 -l 3 --head 2 --format json | jq '.weights'
"""


class ExplainFormat(str, Enum):
    table = "table"
    json = "json"


@app.command("explain", short_help="Walk through one head's attention for one token, stage by stage.", epilog=epilog(EPILOG))
def explain_cmd(
    prompt: PromptArg = None,
    model: ModelOpt = None,
    prompt_opt: PromptOpt = None,
    file: FileOpt = None,
    token: TokenOpt = None,
    occurrence: OccurrenceOpt = None,
    layer: Annotated[Optional[int], typer.Option("--layer", "-l", metavar="N", help="Layer (negative from the end). [default: the layer, with --head's head or any, where a head puts the most weight on one earlier token other than the first]", show_default=False)] = None,
    head: Annotated[Optional[int], typer.Option("--head", metavar="N", help="Query head. [default: the head, in --layer's layer or any, that puts the most weight on one earlier token other than the first]", show_default=False)] = None,
    top: Annotated[int, typer.Option("--top", min=0, help="Highlight the K strongest sources (0 = all).")] = 3,
    rows: Annotated[int, typer.Option("--rows", min=4, help="Sources listed per table before the rest is summarised.")] = 24,
    preview: Annotated[int, typer.Option("--preview", min=1, max=64, help="Vector components shown in previews.")] = 6,
    fmt: Annotated[Optional[ExplainFormat], typer.Option("--format", **choice(ExplainFormat), help="table (panels to read) or json (for scripts). [default: table on a terminal, else json]", show_default=False)] = None,
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
    """Walk through one attention head's computation for one token, with the model's own numbers."""
    start(tp, model, device, quiet, {"--quantize": quantize is not Quantize.none})
    if occurrence == 0:
        raise UsageError("--occurrence counts from 1 (or from -1 at the end); 0 is not a position")
    if occurrence is not None and (token is None or is_index(token)):
        raise UsageError("--occurrence goes with --token TEXT")
    text = prompt_or_demo(prompt, prompt_opt, file, no_stdin, invalid_utf8, quiet)
    fmt = fmt or (ExplainFormat.table if sys.stdout.isatty() else ExplainFormat.json)
    m = open_model(model, device, dtype, quiet, quantize.value)
    if quantize is not Quantize.none:
        note(f"weights quantized ({quantize.value}): the numbers shown are the quantized model's", quiet)
    ids, labels = encode_prompt(m, text, chat, system)
    q, token_note = pick_token(token_raw(m.tokenizer, ids), token, occurrence)
    # The same selection rules, messages and labels as `attn inspect`, so both name the same token and head.
    if layer is not None:
        layer = pick_indices([layer], m.cfg.n_layers, "layer", "layers")[0]
    if head is not None:
        head = pick_indices([head], m.cfg.n_heads, "head", "query heads")[0]
    if token_note:
        note(token_note, quiet)
    if layer is None or head is None:
        layer, head = sharpest_head(m, ids, q, layer, head)
        note(f'explaining layer {layer} head {head}: where "{show(labels[q])}" ({q}) attends most sharply (choose with --layer/--head)', quiet)
    ex = explain(m.model, ids, q, layer, head)
    release()
    if fmt is ExplainFormat.json:
        write_out(json.dumps(explanation_json(m, ids, labels, ex), ensure_ascii=False) + "\n")
        return
    console = stdout_console(color_system="auto" if use_color(color, sys.stdout) else None, highlight=False, force_terminal=use_color(color, sys.stdout) or None)
    for panel in explanation_panels(m, labels, ex, top, rows, preview, console.width):
        console.print(panel)
    console.print(Text(f"same numbers as JSON: attn explain … --token {q} --layer {layer} --head {head} --format json", style="dim"))


# --- the head to explain --------------------------------------------------------------------------


def sharpest_head(m: Loaded, ids: list[int], q: int, layer: int | None, head: int | None) -> tuple[int, int]:
    """The (layer, head) whose weight on one source other than the first token and itself is largest."""
    rows = query_rows(m.model, ids, q).float()  # (L, H, q + 1)
    inner = rows[:, :, 1:q] if q >= 2 else rows  # sinks and self-attention say little about the token
    best = inner.max(-1).values  # (L, H)
    L, H = best.shape
    allowed = torch.ones(L, H, dtype=torch.bool)
    if layer is not None:
        allowed &= (torch.arange(L) == layer)[:, None]
    if head is not None:
        allowed &= (torch.arange(H) == head)[None, :]
    flat = int(best.masked_fill(~allowed, -1).flatten().argmax())
    return flat // H, flat % H


# --- formatting ------------------------------------------------------------------------------------


def _floats(t) -> list[float]:
    return [float(x) for x in t.tolist()]


def explanation_json(m: Loaded, ids: list[int], labels: list[str], ex: Explanation) -> dict:
    """The same numbers as the panels; arrays are aligned with `positions` (masked future positions left out)."""
    return {
        "model": m.name,
        **({"quantize": m.quantize} if m.quantize != "none" else {}),
        "tokens": tokens_json(m.tokenizer, ids),
        "query": {"index": ex.query, "text": labels[ex.query]},
        "layer": ex.layer,
        "head": ex.head,
        "kv_head": ex.kv_head,
        "shared_kv_with": ex.shared_with,
        "d_k": ex.d_k,
        "scale": ex.scale,
        "query_pre_attn_scalar": ex.query_pre_attn_scalar,  # Gemma: scale = 1/√ of this (else 1/√d_k)
        "rope": ex.rope,
        "rotary_dim": ex.rotary_dim,  # how many leading dims of each head RoPE turns (< d_k: partial rotary)
        "qk_norm": ex.qk_norm,
        "input": {"residual_norm": float(ex.resid.norm()), "norm": float(ex.x.norm()), "dim": ex.x.numel(), "vector": _floats(ex.x)},
        "q": {
            "norm": float(ex.q.norm()),
            "vector": _floats(ex.q),
            "rotated": _floats(ex.q_rot),
            "projected": _floats(ex.q_proj) if ex.q_proj is not None else None,  # before the q norm
        },
        "positions": list(range(ex.query + 1)),
        "masked": list(range(ex.query + 1, ex.n_tokens)),
        "key_norms": _floats(ex.keys.norm(dim=-1)),
        "key_norms_projected": _floats(ex.keys_proj.norm(dim=-1)) if ex.keys_proj is not None else None,
        "dots": _floats(ex.dots),
        "scores_raw": _floats(ex.raw_scores),
        "softcap": ex.softcap,
        "scores_capped": _floats(ex.capped) if ex.capped is not None else None,
        "window": ex.window,
        "window_masked": [j for j in range(ex.query + 1) if ex.masked[j]],  # outside the sliding window: score null, weight 0
        "scores": [None if ex.masked[j] else x for j, x in enumerate(_floats(ex.scores))],
        "scores_unrotated": _floats(ex.scores_unrotated) if ex.scores_unrotated is not None else None,
        "weights": _floats(ex.weights),
        "entropy_bits": ex.entropy,
        "value_vector_norms": _floats(ex.values.norm(dim=-1)),
        "value_norms": _floats(ex.value_norms),
        "output": {
            "mixed_norm": float(ex.mixed.norm()),
            "update_norm": float(ex.update.norm()),
            "residual_norm": float(ex.resid.norm()),
            "ratio": ex.update_ratio,
            "cosine": ex.update_cosine,
            "update": _floats(ex.update),
            # Gemma 2/3, OLMo 2: the head's share after the post-attention norm (what reaches the residual)
            "post_norm": ex.update_normed is not None,
            "update_normed": _floats(ex.update_normed) if ex.update_normed is not None else None,
        },
    }


def _vec(t, n: int) -> str:
    head = ", ".join(f"{x:+.3f}" for x in t[:n].tolist())
    return f"[{head}{', …' if t.numel() > n else ''}]  ({t.numel()} numbers)"


def _shown(ex: Explanation, rows: int) -> list[int | None]:
    """Positions to list: all when few; else the first, the strongest, the last few, None marking gaps."""
    S = ex.query + 1
    if S <= rows:
        return list(range(S))
    strongest = max(1, rows - 5)
    last = min(3, max(0, rows - 1 - strongest))
    keep = {0, *range(S - last, S), *ex.weights.topk(strongest).indices.tolist()}
    out: list[int | None] = []
    for j in sorted(keep):
        if out and out[-1] is not None and j != out[-1] + 1:
            out.append(None)
        out.append(j)
    return out


def explanation_panels(m: Loaded, labels: list[str], ex: Explanation, top: int, rows: int, preview: int, width: int = 80) -> list[Panel | Text]:
    """The six stages as rich panels; marks (★, ✗) carry the meaning so NO_COLOR loses nothing.

    Nothing that says which token, layer or head, and no number, is ever cut: when the first panel's
    title would not fit, the token, layer and head go on a line of their own above the panels.
    """
    tok = lambda j: show(labels[j], 16)  # noqa: E731
    q = ex.query
    top_set = set(ex.weights.topk(min(top or q + 1, q + 1)).indices.tolist())  # --top 0: all, as everywhere
    shown = _shown(ex, rows)
    norm_kind = "LayerNorm" if m.cfg.norm == "layer" else "RMSNorm"
    title = f'"{show(labels[q])}" (token {q}) · layer {ex.layer} · head {ex.head}'

    def table(cols: list[str], body: list[list | None]) -> Table:
        """Rows under headers, None for a gap; numbers keep their full width, a long token or the bar gives way."""
        t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for n, c in enumerate(cols):
            cells = [len(str(r[n])) for r in body if r is not None]
            if c in ("token", ""):
                t.add_column(c, justify="left", no_wrap=True, overflow="crop" if c == "" else "ellipsis", max_width=16 if c else None)
            else:
                t.add_column(c, justify="right", no_wrap=True, min_width=max([len(c), *cells]))
        for r in body:
            t.add_row(*(["…"] + [""] * (len(cols) - 1) if r is None else r))
        return t

    p1 = Text.assemble(
        f"residual stream entering layer {ex.layer}: ‖r‖ = {ex.resid.norm():.3f}\n",
        (f"after the layer's {norm_kind}: x = {_vec(ex.x, preview)}\n" if m.cfg.pre_norm
         else f"no norm before attention (this family norms each sublayer's output): x = r = {_vec(ex.x, preview)}\n"),
        f"‖x‖ = {ex.x.norm():.3f}   — x is what Wq, Wk and Wv read",
    )
    if ex.keys_proj is not None:
        k_tab = table(
            ["j", "token", "‖x_j·Wk‖", "‖K_j‖"],
            [None if j is None else [str(j), tok(j), f"{ex.keys_proj[j].norm():.3f}", f"{ex.keys[j].norm():.3f}"] for j in shown],
        )
    else:
        k_tab = table(["j", "token", "‖K_j‖"], [None if j is None else [str(j), tok(j), f"{ex.keys[j].norm():.3f}"] for j in shown])
    bias = " + b_q" if m.cfg.qkv_bias else ""
    if ex.q_proj is not None:
        over = f"each head's {ex.d_k} numbers" if ex.qk_norm == "head" else f"all {m.cfg.n_heads} heads' {m.cfg.n_heads * ex.d_k} numbers at once"
        lines = [
            f"x·Wq{bias} = {_vec(ex.q_proj, preview)}   ‖·‖ = {ex.q_proj.norm():.3f}",
            f"RMSNorm on Q and on K (over {over}), before RoPE: Q = {_vec(ex.q, preview)}   ‖Q‖ = {ex.q.norm():.3f}   (d_k = {ex.d_k})",
        ]
    else:
        lines = [f"Q = x·Wq{bias} = {_vec(ex.q, preview)}   ‖Q‖ = {ex.q.norm():.3f}   (d_k = {ex.d_k})"]
    if ex.rope:
        part = f"the first {ex.rotary_dim} of {ex.d_k} dims of " if ex.rotary_dim is not None and ex.rotary_dim < ex.d_k else ""
        lines.append(f"RoPE rotates {part}Q by position {q} and each K_j by position j: Q_rot = {_vec(ex.q_rot, preview)}")
        lines.append("rotation keeps lengths and turns the angles, so scores come to depend on the distance i − j (stage 3)")
    lines.append(f"keys K_j = x_j·Wk{' + b_k' if m.cfg.qkv_bias else ''} of the {q + 1} visible tokens (KV head {ex.kv_head}):")
    p2 = Group(Text("\n".join(lines)), k_tab)

    # On a narrow terminal the RoPE comparison gives way (it is in the JSON); the stages stay whole.
    rope_cols = ex.rope and width >= 50
    wide = width >= 64
    capped = ex.capped is not None
    cols = ["j", "token", "Q·K_j"] + (["raw"] if capped else []) + ["score"] + (["no RoPE"] if rope_cols else []) + (["RoPE adds"] if rope_cols and wide else [])
    body: list[list | None] = []
    for j in shown:
        if j is None:
            body.append(None)
            continue
        row = [str(j), tok(j), f"{ex.dots[j]:+.3f}", *([f"{ex.raw_scores[j]:+.3f}"] if capped else []), "−∞ ✗" if ex.masked[j] else f"{ex.scores[j]:+.3f}"]
        if rope_cols:
            row.append(f"{ex.scores_unrotated[j]:+.3f}")
            if wide:
                row.append(f"{ex.scores[j] - ex.scores_unrotated[j]:+.3f}")
        body.append(row)
    s_tab = table(cols, body)
    masked = ex.n_tokens - q - 1
    mask_line = (
        f"positions {q + 1}..{ex.n_tokens - 1} ({masked} later token{'s' if masked > 1 else ''}) are masked: score −∞ ✗, weight 0"
        if masked
        else "no later tokens: nothing to mask"
    )
    of = ("query_pre_attn_scalar", ex.query_pre_attn_scalar) if ex.query_pre_attn_scalar is not None else ("d_k", ex.d_k)
    scale_line = f"{'raw' if capped else 'score'} = Q·K_j × 1/√{of[0]} = Q·K_j × 1/√{of[1]:g} = Q·K_j × {ex.scale:.4f}" + (
        "; 'no RoPE': the score of the unrotated Q and K_j" if rope_cols else ""
    )
    if capped:
        scale_line += f"\nsoft-cap: score = {ex.softcap:g}·tanh(raw / {ex.softcap:g}), never beyond ±{ex.softcap:g}; then the mask"
    n_out = int(ex.masked.sum())
    if n_out:  # a sliding window hides the oldest keys, as it hides the future ones
        mask_line += (
            f"\nsliding window of {ex.window} tokens in layer {ex.layer}: positions 0..{n_out - 1} "
            f"({n_out} earlier token{'s' if n_out > 1 else ''}) are masked too: score −∞ ✗, weight 0"
        )
    p3 = Group(Text(scale_line), s_tab, Text(mask_line))

    # The weight bar: 30 cells for weight 1 where there is room, fewer on a narrow terminal, so the
    # j, token and weight columns keep their width.
    bar = max(4, min(30, width - 44))
    body = []
    for j in shown:
        if j is None:
            body.append(None)
            continue
        w, star = float(ex.weights[j]), j in top_set
        body.append([str(j), tok(j), Text(f"{'★' if star else ' '} {w:.3f}", style="bold yellow" if star else ""), Text("█" * round(w * bar), style="yellow" if star else "dim")])
    w_tab = table(["j", "token", "weight", ""], body)
    p4 = Group(
        Text(f"weights = softmax(scores): each exp(score_j) / Σ exp(score); ★ marks the {len(top_set)} strongest"),
        w_tab,
        Text(f"entropy {ex.entropy:.3f} bits (0 = all on one token; {math.log2(q + 1):.3f} = spread evenly over {q + 1})"),
    )

    alpha = width >= 50  # α_j repeats stage 4: it gives way on a narrow terminal
    v_tab = table(
        ["j", "token", "‖V_j‖", *(["α_j"] if alpha else []), "‖α·V·W_O‖"],
        [
            None if j is None else [str(j), tok(j), f"{ex.values[j].norm():.3f}", *([f"{ex.weights[j]:.3f}"] if alpha else []), f"{ex.value_norms[j]:.3f}"]
            for j in shown
        ],
    )
    cos = ex.update_cosine
    post = ex.update_normed is not None
    out_lines = [
        f"Σ α_j·V_j = {_vec(ex.mixed, preview)}   ‖·‖ = {ex.mixed.norm():.3f}\n",
        f"through head {ex.head}'s rows of W_O ({ex.d_k} × {ex.update.numel()}): update = {_vec(ex.update, preview)}\n",
    ]
    if post:
        out_lines.append(
            f"a norm follows W_O (RMSNorm of the layer's whole attention output y): this head's share of it is "
            f"update · w / rms(y) = {_vec(ex.update_normed, preview)}\n"
        )
    name = "its share" if post else "update"
    out_lines += [
        f"‖{name}‖ = {ex.added.norm():.3f} = {ex.update_ratio:.1%} of ‖residual‖ {ex.resid.norm():.3f}; ",
        f"cosine with the residual {cos:+.3f} ({'adds along' if cos > 0.1 else 'pushes against' if cos < -0.1 else 'nearly orthogonal to'} it)",
    ]
    p5 = Group(
        Text(
            f"‖α·V·W_O‖: the size of what each source sends through head {ex.head} (inspect's --values value-norms)"
            + (", measured before the post-attention norm" if post else "")
        ),
        v_tab,
        Text.assemble(*out_lines),
    )
    G, H = m.cfg.n_kv_heads, m.cfg.n_heads
    if G < H:
        p6 = Text(
            f"grouped-query attention: {H} query heads share {G} KV heads ({H // G} each).\n"
            f"head {ex.head} reads KV head {ex.kv_head}, with query heads {', '.join(map(str, ex.shared_with))}: "
            "same K_j and V_j, their own Q and their own rows of W_O."
        )
    else:
        p6 = Text(f"multi-head attention: each of the {H} heads has its own K and V (no sharing).")
    stages = [
        ("1 · input to the layer", p1),
        ("2 · query and keys", p2),
        ("3 · scores, soft-cap and the mask" if capped else "3 · scores and the mask", p3),
        ("4 · softmax", p4),
        ("5 · values and output", p5),
        ("6 · KV heads", p6),
    ]
    first = f"{stages[0][0]} — {title}"
    if len(first) + 6 <= width:  # "╭─ " … " ─╮" around it
        return [Panel(body, title=first if i == 0 else name, title_align="left", box=box.ROUNDED) for i, (name, body) in enumerate(stages)]
    lines: list[str] = []  # the parts on as many lines as it takes, never a word split from its number
    for part in (f'"{show(labels[q])}" (token {q})', f"layer {ex.layer}", f"head {ex.head}"):
        if lines and len(lines[-1]) + 3 + len(part) <= width:
            lines[-1] += " · " + part
        else:
            lines.append(part)
    heading = Text("\n".join(lines), style="bold")
    return [heading, *(Panel(body, title=name, title_align="left", box=box.ROUNDED) for name, body in stages)]
