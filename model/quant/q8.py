"""8-bit blocks: 8-bit codes with a float16 scale (and offset) per group of 32 along the input dimension.

Two kinds (model/quant/blocks.py): GGUF's Q8_0, w = d·q with q int8 (the default model's token
embedding, its tied head, which `--quantize int4` keeps as the file has it), and "u8", w = d·q + m
with q 0..255 (what `--quantize int8` makes of every layer, round-to-nearest). Either is w = a·u + b
per group with u = 0..255 (Q8_0: u = q + 128, a = d, b = −128·d; u8: u = q, a = d, b = m).

No ATen kernel takes 8-bit codes with per-group scales, but its 4-bit one does: u = 16·hi + lo, so
x·w = x·((hi − 8)·16a + 0) + x·((lo − 8)·a + b + 136a) — one `_weight_int4pack_mm_for_cpu` product of
[x | x] with the codes' two halves side by side along the input, [hi | lo] (N, 2K), each half with its
own scale and offset, in eager and compiled steps alike. One product instead of two (as before) sums
inside the kernel and saves a call: measured on a 2-core Zen4 at one row, 576×960 58 → 38 µs, 576×3072
124 → 103, 1536×576 67 → 61; the 49152×576 head the same (1.8 ms, 16 GB/s). The codes are kept
exactly; the kernel reads a, b in bfloat16, as int4.py's does.
"""

from __future__ import annotations

import torch

from model.quant.blocks import Blocks, u8_rtn
from model.quant.int4 import BlockLinear, Packed4
from model.quant.kernels import PACKED

CHUNK = 2048  # rows dequantized at once for the generic path


class Q8Linear(BlockLinear):
    """y = x @ Wᵀ (+ b) with W (out, in) in 8-bit blocks: a drop-in for `Linear`."""

    KINDS = ("q8_0", "u8")
    BITS, ZERO = 8, 128
    rtn = staticmethod(u8_rtn)

    def __init__(self, blocks: Blocks, bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(blocks, bias, dtype, device)
        u = blocks.codes.to(torch.int16) + (128 if blocks.kind == "q8_0" else 0)  # (N, K) 0..255
        self.q = self._packed(u, blocks.scale, blocks.offset, device)

    def _packed(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, device: torch.device) -> Packed4:
        u = codes.to(torch.int16)
        a = scale.float()
        b = -128 * a if offset is None else offset.float()
        halves = torch.cat([u >> 4, u & 15], dim=1)  # (N, 2K): [hi | lo]
        return Packed4(halves, torch.cat([16 * a, a], dim=1), torch.cat([torch.zeros_like(a), b + 136 * a], dim=1), device)

    def product(self, x2: torch.Tensor) -> torch.Tensor:
        if self.kernel in PACKED:
            return self.q.forward(torch.cat([x2, x2], dim=1))
        # generic: dequantize a chunk of rows at a time, then a dense float32 product
        xf = x2.float()
        return torch.cat([xf @ self._dense_rows(torch.arange(a, min(a + CHUNK, self.n_out), device=x2.device)).t() for a in range(0, self.n_out, CHUNK)], dim=1)

    def _dense_rows(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self._dequantize(self.codes() if rows is None else self._codes(rows), rows, 128)

    def _packed_codes(self, rows: torch.Tensor | None) -> torch.Tensor:
        halves = self.q.codes(rows)  # (n, 2K') uint8: [hi | lo] (all rows: unpacked whole, ≈ 30× faster than by ids)
        K = halves.shape[1] // 2
        return halves[:, :K] * 16 + halves[:, K:]  # (n, K') 0..255 (uint8: 16·hi + lo does not overflow)
