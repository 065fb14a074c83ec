"""Weight-only int8: each linear weight stored as int8 with one scale per output channel.

W (in, out) ≈ q.T * scale, q (out, in) int8 in [-127, 127], scale = max|W[:, j]| / 127 rounded to
bfloat16 so that every path (the CPU kernel, the dense fallback, the tied embedding) sees the
same numbers. Activations stay in the model's dtype between layers; on CPU each product runs in
`torch._weight_int8pack_mm` with bfloat16 activations (the kernel PyTorch provides for int8
weights: with float32 activations it measured 10× slower, see README, Performance).

Documented tolerance (tests/test_fastpaths.py, README): greedy tokens equal to float32 on the
tiny random test models; on SmolLM2-135M ≥ 95% top-1 agreement with float32 over a fixed text.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from model.decoder import Decoder, Linear


class Int8Linear(nn.Module):
    """y = x @ (q.T * scale) (+ b): a drop-in for `Linear` with int8 weights."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype  # the model's float dtype, for what is read back dense
        self.register_buffer("q", q)  # (out, in) int8, the layout the int8 kernel reads
        self.register_buffer("scale", scale)  # (out,) bfloat16
        self.bias = bias

    @classmethod
    def from_linear(cls, lin: Linear) -> "Int8Linear":
        w = lin.weight.detach().t().float()  # (out, in)
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)
        q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        bias = None if lin.bias is None else nn.Parameter(lin.bias.detach(), requires_grad=False)
        return cls(q, scale, bias, lin.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (N, in)
        if x.device.type == "cpu":
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.q, self.scale)
        else:  # no int8 GEMV kernel everywhere: dequantize on the fly (still reads int8 weights)
            y = (x2.to(self.scale.dtype) @ self.q.t().to(self.scale.dtype)) * self.scale
        y = y.to(x.dtype).view(*shape[:-1], -1)
        return y + self.bias if self.bias is not None else y

    def dense_weight(self) -> torch.Tensor:
        """W in the model's float dtype (in, out): the matrix the int8 weights stand for (e.g. W_O for attention analysis)."""
        return (self.q.float() * self.scale.float()[:, None]).t().to(self.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Dense (in, out) weight, for code written against `Linear` (allocates a float copy)."""
        return self.dense_weight()

    def columns(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of q, dequantized: the tied embedding read from the int8 head."""
        return (self.q[ids].float() * self.scale[ids].float()[..., None]).to(self.dtype)


def swap_linears(model: nn.Module, make: Callable[[Linear], nn.Module]) -> int:
    """Replace every `Linear` anywhere in `model` by `make(linear)`, freeing each float weight as it
    goes; how many were replaced. Found by walking the modules, so a family's new projection cannot
    be missed. A replacement keeps `Linear`'s protocol: `forward`, `dense_weight`, `columns`."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                setattr(parent, name, make(child))
                del child
                n += 1
    return n


def quantize_int8(model: Decoder) -> Decoder:
    """Replace every linear layer (attention, MLP, head) by its int8 version."""
    swap_linears(model, Int8Linear.from_linear)
    return model
