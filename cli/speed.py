"""Speed options shared by `generate` and `bench` (and --quantize by inspect and explain): the option
definitions, and compiling. Quantizing happens as the model is opened (cli/models.py)."""

from __future__ import annotations

import os
import time
from enum import Enum
from typing import Annotated, Optional

import typer

from cli.common import Dtype, choice, note
from cli.models import Loaded, open_model
from model.quant import layer_kernels, pack
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
            "Store the linear layers' weights in 8 or 4 bits (CPU): less memory, faster, slightly less exact "
            "(quality: README, Performance). In detail: int8 (8-bit groups of 32 with a scale and an offset, "
            "round-to-nearest), or int4 "
            "(groups of 32 with a scale and an offset: a GGUF model's own Q4_0/Q4_1 codes, else round-to-nearest; "
            "the head stays 8-bit; eagerly the kernel reads scales and activations in bfloat16; on CPUs whose best vector "
            "ISA is AVX2 (every layer), or AVX-512 without AMX (8-bit layers), the compiled step (--compile) reads the exact "
            "float16 scales and float32 activations instead, through codes laid out for its loops, ATTN_LANES=0|1 to force), "
            "or none."
        ),
    ),
]
CompileOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--compile/--no-compile",
        envvar="ATTN_COMPILE",
        show_default=False,
        help=(
            "Compile the one-token step for this machine, once (then kept): ≈ 1.6–2× faster decoding on CPU. In detail: on CPU each distinct block, with the final norm and a float head, ahead of time by "
            "AOTInductor (the first time for a model and mode ≈ 7–15 s once `attn pull` has compiled the C++ every package "
            "shares, 11–20 s before; kept in $ATTN_HOME/aoti, later runs load it in well under a second), inductor + one CUDA graph on GPU. Falls back to torch.compile, then eager, if it fails. On the "
            "CPU it decodes ≈ 1.6–2× faster than eager in float32 and with --quantize (README, Performance). With --quantize on a CPU "
            "with AMX tiles it also builds, beside the step (≈ 4 s more the first time), one package for the blocks' work between their "
            "attentions at 8 rows and more (the prompt) with the products through inductor's AMX template, ≈ 3.6–4.5× faster prefill; it rounds the dequantized weights to bfloat16 "
            "(ATTN_PREFILL=eager: not built or used). "
            "[default: on the CPU, load the step when an earlier run (or `attn pull`, or the run that pulled the model) built it "
            "for this model and mode, else eager; --no-compile: always eager]"
        ),
    ),
]
ThreadsOpt = Annotated[
    Optional[int], typer.Option("--threads", min=1, help="CPU threads for PyTorch. [default: PyTorch's choice]", show_default=False)
]


def apply_speed_options(m: Loaded, compile_step: bool | None, max_len: int, quiet: bool = False) -> float | None:
    """Compile the loaded (and maybe quantized: open_model's `quantize`) model's step in place; the compile
    time in seconds, None when not compiled. `compile_step` None (the default): on the CPU, load the step
    where it was built before for this model and mode, or build it where this run pulled the model; else eager.
    A model opened with `defer_packing` is packed here where it runs eagerly (the time counted in its load)."""
    seconds = _compiled_step(m, compile_step, max_len, quiet)
    if seconds is None and m.packing_deferred:
        t0 = time.perf_counter()
        pack(m.model)
        m.load_ms += (time.perf_counter() - t0) * 1e3
        m.kernels = dict(layer_kernels(m.model))
    m.packing_deferred = False
    return seconds


def _compiled_step(m: Loaded, compile_step: bool | None, max_len: int, quiet: bool) -> float | None:
    if compile_step is False:
        return None
    build = compile_step is True
    if compile_step is None:
        if m.device.type != "cpu" or m.model.shard is not None:
            return None
        build = m.pulled
    from model.compile import BuiltByAnother, CompileFailed, compile_decode_step
    import torch

    from model.decoder import Linear
    from model.quant.kernels import one_row_kernel
    from weights.files import attn_home

    # inductor's own cache (kernels, the torch.compile fallback) beside the models outlives the /tmp default.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(attn_home() / "inductor"))

    if build and m.device.type == "cuda":  # (measured on an H200: 25.5–26.5 s, 9.9 s with inductor's cache: README, CUDA)
        note("compiling the one-token step (CUDA: inductor, then one CUDA graph; ≈ 25 s the first time, ≈ 10 s once inductor's cache in $ATTN_HOME holds it)", quiet)
    elif build:
        from model import prefill

        amx = prefill.available(m.model)
        what = " and, beside it, the prompt's products for AMX" if amx else ""
        took = "9–20" if amx else "6–20"  # (measured: README, Performance)
        note(f"compiling the one-token step{what} (CPU: ≈ {took} s the first time for a model and mode, then loaded from $ATTN_HOME/aoti)", quiet)
    try:
        seconds = compile_decode_step(m.model, max_len, cache_dir=attn_home() / "aoti", build=build)
    except BuiltByAnother:  # (attn updated since the step was built: each such run says so, until it is built again)
        note("the compiled step for this model and mode was built by another version of attn: this run is eager, slower (`attn pull` or --compile builds it again, once)", quiet)
        return None
    except CompileFailed as e:
        if build:
            note(f"warning: compiling failed, running eager ({e})", quiet)
        return None
    if getattr(m.model.decode_step, "inductor", True) is False:  # CUDA: the eager step captured as one graph instead
        note(f"warning: inductor could not compile the step ({m.model.decode_step.why}): its eager ops run as one CUDA graph instead, slower", quiet)
    missing = getattr(m.model.decode_step, "prefill_missing", None)
    if missing:  # (a later run after an update of attn, or a build that failed for them)
        how = "it could not be built" if build else "--compile builds it, once"
        note(f"the prompt's package for AMX is not built for this model and mode: the prompt runs eagerly, ≈ 3.6–4.5× slower ({how})", quiet)
    m.kernels = dict(layer_kernels(m.model))  # the compiled step multiplies plain weights where packed ones were
    if m.model.prompt_run is not None:  # 8 rows or more (the prefill) through inductor's AMX template (model/prefill.py)
        m.kernels["Block:amx-template"] = len(m.model.layers)
    plain = sum(isinstance(x, Linear) and x.weight.dtype == torch.float32 for x in m.model.modules())
    if plain and m.device.type == "cpu":  # how the compiled step multiplies one row by them (kernels.one_row_kernel)
        m.kernels[f"Linear:{one_row_kernel()}"] = plain
    return seconds


def prepare_step(spec: str, quiet: bool = False) -> None:
    """`attn pull`'s last stage: the model's float32 step for this CPU (the default mode of `generate` and `bench`)
    built ahead of time, so that later runs load it; nothing when it is built already."""
    from model.compile import CompileFailed, compile_decode_step
    from model.cxx import prepare_headers, sharing_first
    from weights.files import attn_home

    try:
        m = open_model(spec, "cpu", Dtype.auto, quiet=True, defer_packing=True)
    except AttnError as e:  # the pull itself succeeded: the model is there, only its step is not
        note(f"warning: the one-token step was not built ({e})", quiet)
        return
    m.packing_deferred = False  # this model only builds the step; it never runs eagerly
    try:
        compile_decode_step(m.model, 8, cache_dir=attn_home() / "aoti", build=False)
    except CompileFailed:  # not built yet (nothing was changed)
        with sharing_first():  # the C++ later builds share is compiled below anyway: first, and this build uses it
            seconds = apply_speed_options(m, True, 8, quiet)
        if seconds is not None:
            note(f"one-token step built for this CPU in {seconds:.1f} s (with, once per machine, the C++ later builds share); later runs load it from $ATTN_HOME/aoti (--no-compile: eager)", quiet)
    t0 = time.perf_counter()
    if prepare_headers(attn_home() / "aoti" / "cxx"):  # once per machine (and torch): later builds compile less
        note(f"compiled the C++ that later step builds share (headers, AOTInductor's interface) in {time.perf_counter() - t0:.1f} s", quiet)
    prepare_prompts(quiet)


def prepare_prompts(quiet: bool = False) -> None:
    """Where quantized steps read lanes codes (model/quant/lanes.py: AVX2 CPUs, 8-bit ones with AVX-512), the packages that multiply a prompt's
    rows by them, for any model: built here once per machine, so that a first `--quantize ... --compile` need not."""
    import torch

    from model.compile import prompt_package
    from model.quant.kernels import lanes_wanted
    from weights.files import attn_home

    wanted = [bits for bits in (4, 8) if lanes_wanted(torch.device("cpu"), bits)]
    t0, built = time.perf_counter(), False
    for bits in wanted:
        try:
            built |= prompt_package(attn_home() / "aoti", bits)[1]
        except Exception as e:  # inductor raises many types; a quantized step's first build tries again
            note(f"warning: the prompt's {bits}-bit package was not built ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})", quiet)
            return
    if built:
        note(f"built the packages that multiply a prompt by {' and '.join(map(str, wanted))}-bit codes (--quantize, compiled) in {time.perf_counter() - t0:.1f} s", quiet)


def set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
