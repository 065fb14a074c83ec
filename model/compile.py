"""Compiling the one-token decode step (opt-in: `--compile`), with a fallback to eager.

Only the step generation repeats hundreds of times is compiled: `Decoder.step`, the one-token
`Decoder.forward(..., last_only=True)`.

- CPU: torch.compile (inductor). The position is a dynamic integer, so the cache length S is a
  symbolic size and one compiled graph serves every step (no recompiling per token). Inductor
  fuses the element-wise work between the matrix products (norms, RoPE, SiLU·up, residual adds)
  into a few C++ loops and leaves the products to the same BLAS calls as eager.
- CUDA: one token's work is ≈ 600 small kernels, and launching them costs more than running
  them. The step runs in its static-shape form (the position is a device tensor, the whole cache
  is read with a mask: `Decoder.step`), is compiled by inductor with static shapes, and is
  captured once as a CUDA graph; each token is then one graph replay. If inductor fails, the
  eager step is captured instead.
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

    Generation reuses a cache that is long enough, so the step built here serves it; a longer
    generation sets up a new cache, which costs one recompilation (CPU) or a new capture (CUDA).
    Raises CompileFailed (model left eager).
    """
    model.setup_cache(max(max_len, 3))
    t0 = time.perf_counter()
    if model.device.type == "cuda":
        model.decode_step = GraphStep(model)
        return time.perf_counter() - t0

    def step(ids: torch.Tensor, start: int) -> torch.Tensor:
        return model.step(ids, start)

    # inductor's C++ wrapper calls the kernels from C++ instead of generated Python: measured
    # 46 against 43 tok/s (float32, SmolLM2-135M, 2 cores), for a first compile of ≈ 47 s instead of
    # ≈ 21 s (seconds once inductor's cache holds the graph).
    compiled = torch.compile(step, dynamic=True, options={"cpp_wrapper": True})
    try:
        with torch.inference_mode():
            ids = torch.zeros(1, 1, dtype=torch.long, device=model.device)
            compiled(ids, 1)
            compiled(ids, 2)  # a second position: proves the graph is not specialised to one
    except Exception as e:  # inductor raises many types; any of them means "stay eager"
        model.decode_step = None
        raise CompileFailed(_first_line(e)) from e
    model.decode_step = compiled
    return time.perf_counter() - t0


class GraphStep:
    """`Decoder.step` captured as a CUDA graph over static input buffers: one replay per token.

    The graph reads and writes the cache tensors that existed when it was captured; when the
    model sets up a new cache (a longer generation), the step is captured again.
    """

    def __init__(self, model: Decoder) -> None:
        self.model = model
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=model.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=model.device)
        self.inductor = True
        self.capture()

    def _cache_id(self) -> int:
        return self.model.layers[0].attn.cache.k.data_ptr()

    def capture(self) -> None:
        model = self.model
        fn = model.step
        if self.inductor:
            try:
                fn = torch.compile(model.step, dynamic=False, fullgraph=True)
                self._warm(fn)
            except Exception:  # inductor failed: capture the eager step (most of the gain is the graph)
                self.inductor, fn = False, model.step
        try:
            self._warm(fn)
            self.graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(self.graph):
                self.out = fn(self.ids, self.pos)
        except Exception as e:
            model.decode_step = None
            raise CompileFailed(_first_line(e)) from e
        self.captured_for = self._cache_id()

    def _warm(self, fn: Callable) -> None:
        """Run on a side stream before capture, as CUDA graphs require (and inductor compiles here)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(2):
                fn(self.ids, self.pos)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()

    def __call__(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        if start + 1 > self.model.cache_len:
            raise ValueError(f"positions up to {start + 1} exceed the cache of {self.model.cache_len}")
        if self._cache_id() != self.captured_for:
            self.capture()
        self.ids.copy_(ids)
        self.pos.fill_(start)
        self.graph.replay()
        return self.out  # overwritten by the next replay


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def decode_step(model: Decoder) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """The function generation calls for one token: the compiled step when there is one."""
    step = getattr(model, "decode_step", None)
    return step if step is not None else model.step
