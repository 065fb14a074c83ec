"""`attn explore`: one self-contained HTML page with the attention of every token, layer and head."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import (
    epilog,
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
    size_text,
)
from cli.continuation import run_generation
from cli.explorer_page import ENTRY_BUDGET, ENTRY_LIMIT, PageStore, triangle, write_page
from cli.main import app
from cli.models import open_model
from cli.prompt import encode_prompt, prompt_or_demo
from cli.tokens import is_index, pick_indices, pick_token, show, token_labels, token_raw
from model.errors import AttnError, UsageError
from model.loading import load_generation_config
from model.matrices import capture_matrices

EPILOG = """\
Examples:

  attn explore "a fluffy blue creature roamed the verdant forest" -o forest.html

  attn explore -f notes.txt -l 16 -l 17 -o notes.html     # a long text: the layers to keep

  attn explore "Once upon a time" --generate 20 --temp 0 -t -1

Open the page in a browser (no network needed): click or hover a token, click a head; arrows move
the token (←/→), the layer (↑/↓) and the head (shift+←/→); the URL fragment keeps the view.
"""


@app.command("explore", short_help='Write one offline HTML page of every token, layer and head.', epilog=epilog(EPILOG))
def explore_cmd(
    prompt: PromptArg = None,
    model: ModelOpt = None,
    prompt_opt: PromptOpt = None,
    file: FileOpt = None,
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE.html", help="The page to write.")] = Path("attention.html"),
    layer: Annotated[
        Optional[list[int]],
        typer.Option("--layer", "-l", metavar="N", help="Layers to store, repeatable; negative from the end. [default: all, while the page stays ≈ 17 MiB or less (the default model: up to 256 tokens); past that, choose the layers]", show_default=False),
    ] = None,
    token: TokenOpt = None,
    occurrence: OccurrenceOpt = None,
    generate_n: Annotated[int, typer.Option("--generate", min=0, help="Generate N tokens first (sampling flags as in generate); the page marks them apart.")] = 0,
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
    no_stdin: NoStdinOpt = False,
    invalid_utf8: InvalidUtf8Opt = "error",
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Write an interactive page of every token, layer and head's attention (weights, scores, value norms)."""
    if output.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--output must end in .html (got {output.name!r})")
    if occurrence == 0:
        raise UsageError("--occurrence counts from 1 (or from -1 at the end); 0 is not a position")
    if occurrence is not None and (token is None or is_index(token)):
        raise UsageError("--occurrence goes with --token TEXT")
    text = prompt_or_demo(prompt, prompt_opt, file, no_stdin, invalid_utf8, quiet)
    m = open_model(model, device, dtype, quiet)
    ids, labels = encode_prompt(m, text, chat, system)
    prompt_len = len(ids)
    generated = None
    if generate_n:
        settings = sampling_settings(m.path, load_generation_config(m.path), temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n)
        if seed is None:
            seed = secrets.randbelow(2**31)
            if verbose:
                note(f"seed {seed}")
        new = run_generation(m, ids, generate_n, settings, seed, ignore_eos)
        if not new:
            raise AttnError("the model ended the text at once (end-of-sequence); nothing generated (try --ignore-eos)")
        gen_text = m.tokenizer.decode(new)
        ids, labels = ids + new, labels + token_labels(m.tokenizer, new)
        generated = {"tokens": len(new), "text": gen_text, "seed": seed}
        note(f"generated {len(new)} tokens: {gen_text!r}", quiet)

    raw = token_raw(m.tokenizer, ids)
    query, token_note = pick_token(raw, token, occurrence)
    cfg = m.cfg
    T = len(ids)
    layers = stored_layers(layer, cfg.n_layers, cfg.n_heads, T)
    if token_note:
        note(token_note, quiet)
    store = PageStore(layers, cfg.n_heads, T)
    capture_matrices(m.model, ids, layers, store)

    meta = {
        "title": f"attn explore · {m.name} · {T} tokens",
        "model": m.name,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "layers": layers,
        "stored": stored_note(layers, cfg.n_layers, cfg.n_heads),
        "ids": ids,
        "labels": [show(s) for s in labels],  # the tokens as every command shows them (cli/tokens.py)
        "texts": labels,  # …and as --find matches them, with their bytes
        "bytes": [b.hex() for b in raw],
        "prompt_tokens": prompt_len,
        "generated": generated,
        "query": query,
    }
    size = write_page(output, meta, store)
    note(f"wrote {output} ({size_text(size)}: {T} tokens, {len(layers)} of {cfg.n_layers} layers × {cfg.n_heads} heads)", quiet)


def max_tokens(n_layers: int, n_heads: int) -> int:
    """The longest prompt whose every layer fits the page's budget."""
    T = 1
    while n_layers * n_heads * triangle(T + 1) <= ENTRY_BUDGET:
        T += 1
    return T


def stored_note(layers: list[int], n_layers: int, n_heads: int) -> str:
    """What the page says about the layers it holds."""
    if len(layers) == n_layers:
        return "every layer"
    which = ("layer " if len(layers) == 1 else "layers ") + ", ".join(map(str, layers))
    return f"{which} of {n_layers} only: the layers asked for with --layer (every layer is kept up to {max_tokens(n_layers, n_heads)} tokens)"


def stored_layers(given: list[int] | None, n_layers: int, n_heads: int, T: int) -> list[int]:
    """The layers the page keeps: those asked for, else every one while the page stays within budget."""
    if not given:
        if n_layers * n_heads * triangle(T) > ENTRY_BUDGET:
            raise UsageError(
                f"{T} tokens: a page keeps every layer of this model up to {max_tokens(n_layers, n_heads)} tokens; "
                f"choose the layers to keep with --layer (e.g. -l {n_layers // 2})"
            )
        return list(range(n_layers))
    layers = pick_indices(given, n_layers, "layer", "layers")
    pairs = len(layers) * n_heads * triangle(T)
    if pairs > ENTRY_LIMIT:
        raise UsageError(f"{len(layers)} layer(s) × {n_heads} heads at {T} tokens is {pairs / 1e6:.0f} M attention pairs, too many for a browser page; keep fewer layers")
    return layers
