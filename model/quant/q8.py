"""8-bit blocks (GGUF Q8_0): int8 codes with a float16 scale per group of 32 along the input dimension.

The default model's token embedding (its tied head) is Q8_0 in the GGUF; with `--quantize int4` it
stays 8-bit, with the file's own codes and scales. No ATen kernel takes per-group int8 scales, so:
- one row (decode), compiled: the product written as one reduction (codes × activations, summed per
  group, × scale, summed) that inductor fuses into a single pass over the int8 codes;
- one row, eager: one `_weight_int8pack_mm` per group of 32 columns (unit scales), each group's
  partial sums then scaled and added in float32;
- several rows (prefill): the codes dequantized in chunks of rows, then a dense product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.quant.blocks import GROUP, Blocks, q8_0_rtn
from model.quant.kernels import int8_kernel

CHUNK = 2048  # rows dequantized at once for a several-row product


class Q8Linear(nn.Module):
    """y = x @ Wᵀ (+ b) with W (out, in) = d·q in Q8_0 blocks: a drop-in for `Linear`."""

    def __init__(self, blocks: Blocks, bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        if blocks.kind != "q8_0":
            raise ValueError(f"Q8Linear takes q8_0 blocks, not {blocks.kind}")
        N, K = blocks.shape
        self.n_out, self.n_in = N, K
        self.dtype = dtype
        self.kernel = int8_kernel(device)
        # Per group of 32 columns, its (N, 32) codes as one contiguous matrix: what the eager one-row path hands
        # `_weight_int8pack_mm` group by group; the (N, K) view of the same bytes serves everything else.
        self.register_buffer("groups", blocks.codes.view(N, K // GROUP, GROUP).transpose(0, 1).contiguous().to(device))  # (K/32, N, 32)
        self.register_buffer("scale16", blocks.scale.to(device))  # (N, K/32) float16: the file's d
        self.register_buffer("scale_t", blocks.scale.float().t().contiguous().to(device))  # (K/32, N) float32
        self.register_buffer("unit", torch.ones(N, dtype=torch.bfloat16, device=device))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, lin: nn.Module) -> "Q8Linear":
        """Round-to-nearest Q8_0 from a float `Linear` (W stored (in, out)); K padded with zeros to whole groups."""
        w = lin.dense_weight().detach().t().float()  # (out, in)
        w = F.pad(w, (0, -w.shape[1] % GROUP))
        layer = cls(q8_0_rtn(w), lin.bias, lin.weight.dtype, lin.weight.device)
        layer.n_in = lin.weight.shape[0]
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (M, K)
        K = self.groups.shape[0] * GROUP
        if K != x2.shape[1]:
            x2 = F.pad(x2, (0, K - x2.shape[1]))
        if x2.shape[0] == 1 and torch.compiler.is_compiling():
            y = self._fused_row(x2)
        elif x2.shape[0] == 1 and self.kernel == "int8pack":
            y = self._grouped_row(x2)
        else:
            y = self._chunked(x2)
        y = y.to(x.dtype).view(*shape[:-1], self.n_out)
        return y + self.bias if self.bias is not None else y

    def _fused_row(self, x: torch.Tensor) -> torch.Tensor:
        G, N, _ = self.groups.shape
        dots = (x.float().view(G, 1, GROUP) * self.groups).sum(-1)  # (K/32, N): each group's dot product
        return (dots * self.scale_t).sum(0, keepdim=True)  # (1, N)

    def _grouped_row(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(torch.bfloat16).view(1, -1, GROUP)  # (1, K/32, 32)
        y = torch.zeros(1, self.n_out, dtype=torch.float32, device=x.device)
        for g in range(xb.shape[1]):
            y.addcmul_(torch._weight_int8pack_mm(xb[:, g], self.groups[g], self.unit), self.scale_t[g])
        return y

    def _chunked(self, x: torch.Tensor) -> torch.Tensor:
        dt = torch.float32 if x.device.type == "cpu" else self.dtype  # CPU half-precision GEMMs are slow
        xd = x.to(dt)
        return torch.cat([xd @ self._dense_rows(slice(a, a + CHUNK)).to(dt).t() for a in range(0, self.n_out, CHUNK)], dim=1)

    def _dense_rows(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """Rows of W (out, in) as float32: d·q."""
        codes = self.groups[:, rows].transpose(0, 1)  # (n, K/32, 32)
        return (codes.float() * self.scale16[rows].float()[..., None]).reshape(codes.shape[0], -1)

    def dense_weight(self) -> torch.Tensor:
        """W (in, out) in the model's dtype: exactly d·q."""
        return self._dense_rows(slice(None))[:, : self.n_in].t().to(self.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Dense (in, out) weight, for code written against `Linear` (allocates a float copy)."""
        return self.dense_weight()

    def columns(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of W (out, in), dequantized: the tied embedding read from the 8-bit head."""
        rows = self._dense_rows(ids.reshape(-1))[:, : self.n_in]  # (n, in)
        return rows.view(*ids.shape, -1).to(self.dtype)
