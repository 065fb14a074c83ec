"""`attn pull`, `attn models`, `attn convert`: getting weights onto this machine and seeing what is there."""

from __future__ import annotations

import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.table import Table

from cli.common import ColorOpt, Color, choice, epilog, note, size_text, stdout_console, use_color, write_out
from cli.main import app
from cli.models import StderrProgress, dir_size
from cli.speed import prepare_step
from model.errors import UsageError
from weights.gguf import convert_gguf
from weights.files import is_model_dir, list_models, models_dir
from weights.pull import find_local, pull
from weights.registry import DEFAULT_MODEL


class OutDtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


DtypeOpt = Annotated[
    Optional[OutDtype],
    typer.Option("--dtype", **choice(OutDtype), help="dtype of the converted weights. [default: float32, which holds dequantized values exactly]", show_default=False),
]


# --- commands ----------------------------------------------------------------------------


@app.command("pull", short_help='Download and convert a model into $ATTN_HOME/models.', epilog=epilog("Examples:\n  attn pull\n  attn pull model.Q8_0.gguf\n  attn pull HuggingFaceTB/SmolLM2-135M-Instruct"))
def pull_cmd(
    model: Annotated[
        Optional[str],
        typer.Argument(help=f"Registry name, FILE.gguf, or ORG/NAME (hub id). [default: {DEFAULT_MODEL}]", show_default=False),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Download and convert again even when present.")] = False,
    dtype: DtypeOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes on stderr.")] = False,
    compile_step: Annotated[
        Optional[bool],
        typer.Option(
            "--compile/--no-compile",
            envvar="ATTN_COMPILE",
            show_default=False,
            help="Also build the model's float32 one-token step for this CPU ahead of time, which later `generate` and `bench` "
            "runs load by default, after the C++ that every step build shares (≈ 18–25 s for both on a machine's first pull, once). [default: on where there is no CUDA device]",
        ),
    ] = None,
) -> None:
    """Make a model available locally under $ATTN_HOME/models (atomic; a second pull downloads nothing), with its
    compiled one-token step for this CPU (built where it is missing)."""
    name = model if model is not None else DEFAULT_MODEL
    existing = None if force else find_local(name)
    if existing is not None:
        if not quiet:
            note(f"{name} is already pulled: {existing} (--force redoes it)")
    else:
        start = time.monotonic()
        with StderrProgress(quiet=quiet) as progress:
            path = pull(name, force=force, progress=progress, dtype=dtype.value if dtype else None)
        if not quiet:
            note(f"{name} ready: {path} ({size_text(dir_size(path))}, {time.monotonic() - start:.1f} s)")
    if compile_step or (compile_step is None and not torch.cuda.is_available()):
        prepare_step(name, quiet)


@app.command("models", short_help='List the local models.', epilog=epilog("Examples:\n  attn models\n  attn models | cut -f1,5"))
def models_cmd(color: ColorOpt = Color.auto) -> None:
    """List local models: name, path, parameters, dtype, size (tab-separated, the size in bytes, when stdout is not a terminal)."""
    found = list_models()
    if not found:
        note(f"no models in {models_dir()} yet; `attn pull` fetches {DEFAULT_MODEL}")
        return
    for m in found:
        if m.problem:
            note(f"warning: {m.name} is broken: {m.problem} (`attn generate -m {m.name}` says more)")
    if sys.stdout.isatty():
        table = Table(box=None, header_style="bold" if use_color(color, sys.stdout) else None)
        for column, justify in (("name", "left"), ("path", "left"), ("parameters", "right"), ("dtype", "left"), ("size", "right")):
            table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
        for m in found:
            table.add_row(m.name, str(m.path), f"{m.parameters / 1e6:,.1f} M", m.dtype, size_text(m.size_bytes))
        stdout_console(no_color=not use_color(color, sys.stdout), highlight=False).print(table)
    else:
        # Plain integers so scripts can sort and sum them.
        write_out("".join(f"{m.name}\t{m.path}\t{m.parameters}\t{m.dtype}\t{m.size_bytes}\n" for m in found))


@app.command("convert", short_help='Convert a GGUF file to a safetensors model directory.', epilog=epilog("Examples:\n  attn convert model.Q8_0.gguf smollm2-q8\n  attn convert model.Q4_1.gguf out --dtype bfloat16 --force\n  attn generate -m smollm2-q8 \"Hello\""))
def convert_cmd(
    gguf: Annotated[Path, typer.Argument(help="The GGUF file.", show_default=False)],
    out_dir: Annotated[Path, typer.Argument(help="The model directory to write (must not exist, or be empty).", show_default=False)],
    dtype: DtypeOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT_DIR when it is a model directory already (any other non-empty folder is refused).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes on stderr.")] = False,
) -> None:
    """Convert a GGUF file to a safetensors model directory (config, tokenizer, chat template)."""
    if force and out_dir.exists() and not is_model_dir(out_dir) and any(out_dir.iterdir()):
        # --force replaces models, never an arbitrary directory full of other things
        raise UsageError(f"{out_dir} holds something other than a model; --force only replaces models")
    start = time.monotonic()
    with StderrProgress(quiet=quiet) as progress:
        convert_gguf(gguf, out_dir, dtype.value if dtype else "float32", progress, overwrite=force)
    if not quiet:
        note(f"wrote {out_dir} ({size_text(dir_size(out_dir))}, {time.monotonic() - start:.1f} s)")
