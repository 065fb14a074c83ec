"""Speed options shared by `generate` and `bench`: --quantize, --compile, --threads, and applying them."""

from __future__ import annotations

import os
from enum import Enum
from typing import Annotated, Optional

import typer

from cli.common import choice, note
from cli.models import Loaded
from model.errors import AttnError


class Quantize(str, Enum):
    none = "none"
    int8 = "int8"


QuantizeOpt = Annotated[
    Quantize,
    typer.Option("--quantize", **choice(Quantize), help="Weight-only quantization of every linear layer: int8 (per-channel scales) or none."),
]
CompileOpt = Annotated[
    bool,
    typer.Option("--compile/--no-compile", help="Compile the one-token step: inductor on CPU (≈ 45 s the first time, seconds once cached in $ATTN_HOME/inductor), inductor + one CUDA graph on GPU. Falls back to eager if it fails."),
]
ThreadsOpt = Annotated[
    Optional[int], typer.Option("--threads", min=1, help="CPU threads for PyTorch. [default: PyTorch's choice]", show_default=False)
]


def apply_speed_options(m: Loaded, quantize: Quantize, compile_step: bool, max_len: int, quiet: bool = False) -> float | None:
    """Quantize and/or compile the loaded model in place; the compile time in seconds (None when not compiled)."""
    if quantize is Quantize.int8:
        from model.quant import quantize_int8

        if m.dtype.is_floating_point and m.dtype.itemsize < 2:
            raise AttnError(f"--quantize int8 needs float weights (got {m.dtype})")
        quantize_int8(m.model)
    if not compile_step:
        return None
    from model.compile import CompileFailed, compile_decode_step
    from weights.files import attn_home

    # inductor's cache makes a second compile of the same model take seconds instead of ≈ 45 s;
    # beside the models it outlives the /tmp default.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(attn_home() / "inductor"))

    note("compiling the one-token step (≈ 45 s on CPU the first time, seconds once cached)", quiet)
    try:
        return compile_decode_step(m.model, max_len)
    except CompileFailed as e:
        note(f"warning: --compile failed, running eager ({e})", quiet)
        return None


def set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
