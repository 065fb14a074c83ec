"""Speed options shared by `generate` and `bench`: --quantize, --compile, --threads, and applying them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Optional

import typer

from cli.common import choice, note
from cli.models import Loaded
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
            "Weight-only quantization of every linear layer (CPU): int8 (one scale per output channel), or int4 "
            "(groups of 32 with a scale and an offset: a GGUF model's own Q4_0/Q4_1 codes, else round-to-nearest; "
            "the head stays 8-bit; the kernel reads scales and activations in bfloat16), or none."
        ),
    ),
]
CompileOpt = Annotated[
    bool,
    typer.Option("--compile/--no-compile", help="Compile the one-token step: inductor on CPU (≈ 45 s the first time, seconds once cached in $ATTN_HOME/inductor), inductor + one CUDA graph on GPU. Falls back to eager if it fails."),
]
ThreadsOpt = Annotated[
    Optional[int], typer.Option("--threads", min=1, help="CPU threads for PyTorch. [default: PyTorch's choice]", show_default=False)
]


@dataclass
class Speed:
    """What the speed options did: compile seconds (None: not compiled), and which kernels the quantized layers run."""

    compile_s: float | None = None
    kernels: dict[str, int] = field(default_factory=dict)  # "Class:kernel" → layers
    source: str = ""  # int4: where the 4-bit codes came from


def apply_speed_options(m: Loaded, quantize: Quantize, compile_step: bool, max_len: int, quiet: bool = False) -> Speed:
    """Quantize and/or compile the loaded model in place."""
    speed = Speed()
    if quantize is not Quantize.none:
        from model.quant import forced_generic
        from model.quant import quantize as quantize_model

        if m.device.type != "cpu":
            # Measured on an H200: int8 decoded at 200 tok/s against bfloat16's 908 (compiled); no int4 kernel here beats it.
            raise AttnError(f"--quantize {quantize.value} runs on the CPU only; on {m.device.type} use --dtype bfloat16 (faster there)")
        if m.dtype.itemsize < 2 or not m.dtype.is_floating_point:
            raise AttnError(f"--quantize {quantize.value} needs float weights (got {m.dtype})")
        blocks = None
        if quantize is Quantize.int4:
            from model.quant.blocks import load_blocks
            from weights.gguf import blocks_file

            found = blocks_file(m.path)
            blocks = load_blocks(found) if found is not None else None
        speed.kernels = dict(quantize_model(m.model, quantize.value, blocks))
        m.quantize = quantize.value
        if quantize is Quantize.int4:
            kept = sum(n for k, n in speed.kernels.items() if k.startswith("Int4"))
            speed.source = "the GGUF's own 4-bit codes" if blocks else "round-to-nearest from the float weights"
            note(f"int4: {kept} layers from {speed.source}; the head 8-bit", quiet)
        if forced_generic():
            note("ATTN_KERNELS=generic: quantized layers dequantize on every call (slow; for testing)", quiet)
    if not compile_step:
        return speed
    from model.compile import CompileFailed, compile_decode_step
    from weights.files import attn_home

    # inductor's cache makes a second compile of the same model take seconds instead of ≈ 45 s;
    # beside the models it outlives the /tmp default.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(attn_home() / "inductor"))

    note("compiling the one-token step (≈ 45 s on CPU the first time, seconds once cached)", quiet)
    try:
        speed.compile_s = compile_decode_step(m.model, max_len)
    except CompileFailed as e:
        note(f"warning: --compile failed, running eager ({e})", quiet)
    return speed


def set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
