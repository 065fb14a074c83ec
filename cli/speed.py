"""Speed options shared by `generate` and `bench` (and --quantize by inspect and explain): the option
definitions, and compiling. Quantizing happens as the model is opened (cli/models.py)."""

from __future__ import annotations

import os
from enum import Enum
from typing import Annotated, Optional

import typer

from cli.common import choice, note
from cli.models import Loaded
from model.quant import layer_kernels
from model.errors import AttnError


class Quantize(str, Enum):
    none = "none"
    int8 = "int8"
    int4 = "int4"


QuantizeOpt = Annotated[
    Quantize,
    typer.Option(
        "--quantize",
        **choice(Quantize),
        help=(
            "Weight-only quantization of every linear layer (CPU): int8 (8-bit groups of 32 with a scale and an offset, "
            "round-to-nearest), or int4 "
            "(groups of 32 with a scale and an offset: a GGUF model's own Q4_0/Q4_1 codes, else round-to-nearest; "
            "the head stays 8-bit; the kernel reads scales and activations in bfloat16), or none."
        ),
    ),
]
CompileOpt = Annotated[
    bool,
    typer.Option("--compile/--no-compile", help="Compile the one-token step: on CPU each distinct block, with the final norm and a float head, ahead of time by AOTInductor (≈ 12–16 s the first time for a model and mode; kept in $ATTN_HOME/aoti, later runs load it in well under a second), inductor + one CUDA graph on GPU. Falls back to torch.compile, then eager, if it fails. On the CPU it decodes ≈ 1.6–2× faster than eager in float32 and with --quantize (README, Performance)."),
]
ThreadsOpt = Annotated[
    Optional[int], typer.Option("--threads", min=1, help="CPU threads for PyTorch. [default: PyTorch's choice]", show_default=False)
]


def apply_speed_options(m: Loaded, compile_step: bool, max_len: int, quiet: bool = False) -> float | None:
    """Compile the loaded (and maybe quantized: open_model's `quantize`) model's step in place; the compile
    time in seconds, None when not compiled."""
    if not compile_step:
        return None
    from model.compile import CompileFailed, compile_decode_step
    from weights.files import attn_home

    # inductor's own cache (kernels, the torch.compile fallback) beside the models outlives the /tmp default.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(attn_home() / "inductor"))

    note("compiling the one-token step (CPU: ≈ 12–16 s the first time for a model and mode, then loaded from $ATTN_HOME/aoti)", quiet)
    try:
        seconds = compile_decode_step(m.model, max_len, cache_dir=attn_home() / "aoti")
    except CompileFailed as e:
        note(f"warning: --compile failed, running eager ({e})", quiet)
        return None
    m.kernels = dict(layer_kernels(m.model))  # the compiled step multiplies plain weights where packed ones were
    return seconds


def set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
