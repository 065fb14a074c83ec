"""Weight-only int8: each linear weight stored as int8 with one scale per output channel.

W (in, out) ≈ q.T * scale, q (out, in) int8 in [-127, 127], scale = max|W[:, j]| / 127 rounded to
bfloat16 so that every path (the CPU kernel, the dense fallback, the tied embedding) sees the
same numbers. Activations stay in the model's dtype between layers; on CPU each product runs in
`torch._weight_int8pack_mm` with bfloat16 activations (with float32 activations it measured 10×
slower, see README, Performance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.quant.kernels import int8_kernel


class Int8Linear(nn.Module):
    """y = x @ (q.T * scale) (+ b): a drop-in for `Linear` with int8 weights."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype  # the model's float dtype, for what is read back dense
        self.kernel = int8_kernel(q.device)
        self.n_in = q.shape[1]
        # The int8 kernel crashed (segfault, torch 2.13) on inputs narrower than 16 columns: K is padded
        # with zero columns to whole groups of 32, and x with zeros to match, wherever it is not one already.
        q = F.pad(q, (0, -q.shape[1] % 32))
        self.register_buffer("q", q)  # (out, in') int8, the layout the int8 kernel reads
        self.register_buffer("scale", scale)  # (out,) bfloat16
        self.bias = bias

    @classmethod
    def from_linear(cls, lin: nn.Module) -> "Int8Linear":
        w = lin.weight.detach().t().float()  # (out, in)
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)
        q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        bias = None if lin.bias is None else nn.Parameter(lin.bias.detach(), requires_grad=False)
        return cls(q, scale, bias, lin.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        if x2.shape[1] != self.q.shape[1]:
            x2 = F.pad(x2, (0, self.q.shape[1] - x2.shape[1]))
        if self.kernel == "int8pack":
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.q, self.scale)
        else:  # dequantize on the fly (still reads int8 weights)
            dt = torch.float32 if x.device.type == "cpu" else self.scale.dtype
            y = (x2.to(dt) @ self.q.t().to(dt)) * self.scale.to(dt)
        y = y.to(x.dtype).view(*shape[:-1], -1)
        return y + self.bias if self.bias is not None else y

    def dense_weight(self) -> torch.Tensor:
        """W in the model's float dtype (in, out): the matrix the int8 weights stand for (e.g. W_O for attention analysis)."""
        return (self.q[:, : self.n_in].float() * self.scale.float()[:, None]).t().to(self.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Dense (in, out) weight, for code written against `Linear` (allocates a float copy)."""
        return self.dense_weight()

    def columns(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of q, dequantized: the tied embedding read from the int8 head."""
        return (self.q[ids, : self.n_in].float() * self.scale[ids].float()[..., None]).to(self.dtype)
