"""8-bit blocks: int8 codes with a float16 scale (and offset) per group of 32 along the input dimension.

Two kinds (model/quant/blocks.py): GGUF's Q8_0, w = d·q (the default model's token embedding, its tied
head, which `--quantize int4` keeps as the file has it), and "u8", w = d·q + m with codes 0..255 (what
`--quantize int8` makes: every layer, round-to-nearest). Both run as int8 codes c with a scale s and an
offset o per group — u8 as c = q − 128, o = m + 128·d — so that y = Σ_g s_g·(c_g·x_g) + Σ_g o_g·Σ x_g.
No ATen kernel takes per-group scales, so:
- one row (decode) in a compiled step: that sum written as one reduction over the int8 codes, which
  inductor fuses into a single pass (kernel "fused");
- otherwise (several rows, or eager): the codes dequantized in chunks of rows, then a dense float32
  product — the same numbers as the fused reduction up to float32 summation order, so cached decoding
  and a full recompute agree; slow for decoding, which is what the compiled step is for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.quant.blocks import GROUP, Blocks, u8_rtn
from model.quant.kernels import q8_kernel

CHUNK = 2048  # rows dequantized at once for a several-row product


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
        self.kernel = q8_kernel(device)
        codes = blocks.codes if blocks.kind == "q8_0" else (blocks.codes.to(torch.int16) - 128).to(torch.int8)
        # Per group of 32 columns, its (N, 32) codes as one contiguous matrix: the fused reduction reads
        # them group by group, and the (N, K) view of the same bytes serves everything else.
        self.register_buffer("groups", codes.view(N, K // GROUP, GROUP).transpose(0, 1).contiguous().to(device))  # (K/32, N, 32)
        self.register_buffer("scale16", blocks.scale.to(device))  # (N, K/32) float16: d, as stored
        self.register_buffer("offset16", None if blocks.offset is None else blocks.offset.to(device))  # (N, K/32): m
        s = blocks.scale.float()
        self.register_buffer("scale_t", s.t().contiguous().to(device))  # (K/32, N) float32: s per group
        offset = None if blocks.offset is None else (blocks.offset.float() + 128 * s).t().contiguous().to(device)
        self.register_buffer("offset_t", offset)  # (K/32, N) float32: o = m + 128·d per group
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
        x2 = x.reshape(-1, shape[-1])  # (M, K)
        K = self.groups.shape[0] * GROUP
        if K != x2.shape[1]:
            x2 = F.pad(x2, (0, K - x2.shape[1]))
        if x2.shape[0] == 1 and self.kernel == "fused" and torch.compiler.is_compiling():
            y = self._fused_row(x2)
        else:
            y = self._chunked(x2)
        y = y.to(x.dtype).view(*shape[:-1], self.n_out)
        return y + self.bias if self.bias is not None else y

    def _fused_row(self, x: torch.Tensor) -> torch.Tensor:
        G = self.groups.shape[0]
        xg = x.float().view(G, 1, GROUP)
        dots = (xg * self.groups).sum(-1)  # (K/32, N): each group's dot product with the codes
        y = dots * self.scale_t
        if self.offset_t is not None:
            y = y + self.offset_t * xg.sum(-1)  # o_g · Σ x_g
        return y.sum(0, keepdim=True)  # (1, N)

    def _chunked(self, x: torch.Tensor) -> torch.Tensor:
        dt = torch.float32 if x.device.type == "cpu" else self.dtype  # CPU half-precision GEMMs are slow
        xd = x.to(dt)
        return torch.cat([xd @ self._dense_rows(slice(a, a + CHUNK)).to(dt).t() for a in range(0, self.n_out, CHUNK)], dim=1)

    def _dense_rows(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """Rows of W (out, in) as float32, from the stored d (and m): d·q (+ m)."""
        codes = self.groups[:, rows].transpose(0, 1).float()  # (n, K/32, 32)
        d = self.scale16[rows].float()[..., None]
        if self.offset16 is None:
            w = codes * d
        else:  # the u8 codes were stored shifted by −128
            w = (codes + 128) * d + self.offset16[rows].float()[..., None]
        return w.reshape(codes.shape[0], -1)

    def dense_weight(self) -> torch.Tensor:
        """W (in, out) in the model's dtype, exactly as the blocks define it."""
        return self._dense_rows(slice(None))[:, : self.n_in].t().to(self.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Dense (in, out) weight, for code written against `Linear` (allocates a float copy)."""
        return self.dense_weight()

    def columns(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of W (out, in), dequantized: the tied embedding read from the 8-bit head."""
        rows = self._dense_rows(ids.reshape(-1))[:, : self.n_in]  # (n, in)
        return rows.view(*ids.shape, -1).to(self.dtype)
