"""torch.compile of the one-token decode step (opt-in: `--compile`), with a fallback to eager.

Only the step generation repeats hundreds of times is compiled: `Decoder.step`, the
one-token `Decoder.forward(..., last_only=True)`. The position is a dynamic integer, so the cache length S is a
symbolic size and one compiled graph serves every step (no recompiling per token). On CPU
inductor fuses the element-wise work between the matrix products (norms, RoPE, SiLU·up,
residual adds) into a few C++ loops and leaves the products to the same BLAS calls as eager.
On CUDA it uses the default mode: CUDA graphs ("reduce-overhead") need static shapes, which
a cache read as its filled prefix does not have.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from model.decoder import Decoder


class CompileFailed(RuntimeError):
    """torch.compile could not build the step (no C++ compiler, unsupported platform, …)."""


def compile_decode_step(model: Decoder, max_len: int) -> float:
    """Compile `model`'s one-token step for a cache of `max_len` positions (set up here); seconds taken.

    Generation reuses a cache that is long enough, so the graph built here serves it; a longer
    generation sets up a new cache, which costs one recompilation. Raises CompileFailed (model left eager).
    """

    def step(ids: torch.Tensor, start: int) -> torch.Tensor:
        return model.step(ids, start)

    # On CPU, inductor's C++ wrapper calls the kernels from C++ instead of generated Python: measured
    # 46 against 43 tok/s (float32, SmolLM2-135M, 2 cores), for a first compile of ≈ 47 s instead of
    # ≈ 21 s (seconds once inductor's cache holds the graph). CUDA keeps the default wrapper.
    options = {"cpp_wrapper": True} if model.device.type == "cpu" else None
    compiled = torch.compile(step, dynamic=True, options=options)
    model.setup_cache(max(max_len, 3))
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            ids = torch.zeros(1, 1, dtype=torch.long, device=model.device)
            compiled(ids, 1)
            compiled(ids, 2)  # a second position: proves the graph is not specialised to one
    except Exception as e:  # inductor raises many types; any of them means "stay eager"
        model.decode_step = None
        raise CompileFailed(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    model.decode_step = compiled
    return time.perf_counter() - t0


def decode_step(model: Decoder) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """The function generation calls for one token: the compiled step when there is one."""
    step = getattr(model, "decode_step", None)
    return step if step is not None else model.step
