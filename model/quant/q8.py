"""8-bit blocks: 8-bit codes with a float16 scale (and offset) per group of 32 along the input dimension.

Two kinds (model/quant/blocks.py): GGUF's Q8_0, w = d·q with q int8 (the default model's token
embedding, its tied head, which `--quantize int4` keeps as the file has it), and "u8", w = d·q + m
with q 0..255 (what `--quantize int8` makes of every layer, round-to-nearest). Either is w = a·u + b
per group with u = 0..255 (Q8_0: u = q + 128, a = d, b = −128·d; u8: u = q, a = d, b = m).

No ATen kernel takes 8-bit codes with per-group scales, but its 4-bit one does: u = 16·hi + lo, so
x·w = x·((hi − 8)·16a + 0) + x·((lo − 8)·a + b + 136a) — two `_weight_int4pack_mm_for_cpu` products
over the codes' two halves, in eager and compiled steps alike (measured on a 2-core Zen4, 49152 × 576:
both together 20 GB/s, against 11–17 for inductor's fused int8 reduction). The codes are kept exactly;
the kernels read a, b in bfloat16, as int4.py's do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.quant.blocks import GROUP, Blocks, u8_rtn
from model.quant.int4 import Packed4, pad_input
from model.quant.kernels import int4_kernel

CHUNK = 2048  # rows dequantized at once for the generic path


class Q8Linear(nn.Module):
    """y = x @ Wᵀ (+ b) with W (out, in) in 8-bit blocks: a drop-in for `Linear`."""

    def __init__(self, blocks: Blocks, bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        if blocks.kind not in ("q8_0", "u8"):
            raise ValueError(f"Q8Linear takes 8-bit blocks, not {blocks.kind}")
        N, K = blocks.shape
        self.n_out, self.n_in = N, K
        self.dtype = dtype
        self.kind = blocks.kind
        self.kernel = int4_kernel(device)
        self.register_buffer("scale16", blocks.scale.to(device))  # (N, K/32) float16: d, as stored
        self.register_buffer("offset16", None if blocks.offset is None else blocks.offset.to(device))  # (N, K/32): m
        u = blocks.codes.to(torch.int16) + (128 if blocks.kind == "q8_0" else 0)  # (N, K) 0..255
        a = blocks.scale.float()
        b = -128 * a if blocks.offset is None else blocks.offset.float()
        self.hi = Packed4(u >> 4, 16 * a, torch.zeros_like(a), device)
        self.lo = Packed4(u & 15, a, b + 136 * a, device)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, lin: nn.Module) -> "Q8Linear":
        """Round-to-nearest u8 blocks from a float `Linear` (W stored (in, out)); K padded with zeros to whole groups."""
        w = lin.dense_weight().detach().t().float()  # (out, in)
        w = F.pad(w, (0, -w.shape[1] % GROUP))
        layer = cls(u8_rtn(w), lin.bias, lin.weight.dtype, lin.weight.device)
        layer.n_in = lin.weight.shape[0]
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = pad_input(x.reshape(-1, shape[-1]), self.scale16.shape[1] * GROUP)  # (M, K')
        if self.kernel == "int4pack":
            y = self.hi(x2).float() + self.lo(x2).float()
        else:  # dequantize a chunk of rows at a time, then a dense float32 product
            xf = x2.float()
            y = torch.cat([xf @ self._dense_rows(torch.arange(a, min(a + CHUNK, self.n_out), device=x.device)).t() for a in range(0, self.n_out, CHUNK)], dim=1)
        y = y[:, : self.n_out].to(x.dtype).view(*shape[:-1], self.n_out)
        return y + self.bias if self.bias is not None else y

    def _dense_rows(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of W (out, in') as float32, from the codes and the stored float16 d (and m): exactly the blocks' weight."""
        if rows is None:
            rows = torch.arange(self.n_out, device=self.scale16.device)
        u = (self.hi.codes(rows).float() * 16 + self.lo.codes(rows).float())  # (n, K') 0..255
        d = self.scale16[rows].float().repeat_interleave(GROUP, dim=1)
        if self.offset16 is None:
            return d * (u - 128)
        return d * u + self.offset16[rows].float().repeat_interleave(GROUP, dim=1)

    def dense_weight(self) -> torch.Tensor:
        """W (in, out) in the model's dtype, exactly as the blocks define it."""
        return self._dense_rows()[:, : self.n_in].t().to(self.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Dense (in, out) weight, for code written against `Linear` (allocates a float copy)."""
        return self.dense_weight()

    def columns(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of W (out, in), dequantized: the tied embedding read from the 8-bit head."""
        return self._dense_rows(ids.reshape(-1))[:, : self.n_in].view(*ids.shape, -1).to(self.dtype)
