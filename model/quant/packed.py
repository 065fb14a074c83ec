"""Float linear layers on the CPU with their weight in oneDNN's packed layout (the eager CPU default).

`torch.ops.mkldnn._reorder_linear_weight` lays W (out, in) out once in the blocks oneDNN's GEMM reads,
and `_linear_pointwise` multiplies by it (bias fused). Measured on a 2-core Zen4 (AVX-512, no AMX) over
the default model's 121 matrices in order, float32, ms per step for M rows, MKL `x @ W` against packed:
M=1 32 → 28–34, M=4 112 → 31, M=16 126 → 53, M=64 295 → 152; bfloat16 M=1 53 → 24. The 49152-wide head
alone at 16 rows: 25–34 → 8–12 ms. The products agree with MKL's to float32 rounding (≤ 2e-6
relative).

inductor cannot trace an mkldnn tensor, so a compiled step swaps the dense layer back first (`unpack`).
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from model.decoder import Linear
from model.quant.kernels import forced_generic

KERNEL = "onednn"
DTYPES = (torch.float32, torch.bfloat16)


def packs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether float linear layers on `device` in `dtype` run packed: the CPU, float32 or bfloat16 (where oneDNN has
    a bfloat16 path on this CPU: AVX-512 or AVX-NE-CONVERT; an AVX2 Zen3 has none, and packing there fails), oneDNN
    built in, and not ATTN_KERNELS=generic (which keeps the plain products)."""
    if device.type != "cpu" or dtype not in DTYPES or not torch.backends.mkldnn.is_available() or forced_generic():
        return False
    return dtype != torch.bfloat16 or onednn_bf16()


def onednn_bf16() -> bool:
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedLinear(nn.Module):
    """y = x @ W (+ b), W held in oneDNN's packed layout; `Linear`'s protocol (forward, dense_weight, columns, bias)."""

    kernel = KERNEL

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tied: bool) -> None:
        """`weight` (out, in), contiguous. A tied head keeps it too: the embedding reads its rows."""
        super().__init__()
        self.n_out, self.n_in = weight.shape
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, None), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.register_buffer("rows", weight if tied else None, persistent=False)

    @classmethod
    def from_linear(cls, lin: Linear, tied: bool = False) -> PackedLinear:
        return cls(lin.weight.detach().t().contiguous(), lin.bias, tied)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def dense_weight(self) -> torch.Tensor:
        """W (in, out) as a float tensor (a copy out of the packed layout; the tied head's own rows)."""
        return (self.rows if self.rows is not None else self.packed.to_dense()).t()

    def columns(self, ids: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            raise RuntimeError("columns() of a packed layer that is not a tied head")
        return self.rows[ids]

    def to_linear(self) -> Linear:
        """The plain layer again, for inductor (which cannot trace the packed tensor): W as an (in, out) view
        of (out, in) storage, the layout inductor's one-row reduction reads (model.quant.unpack lays it out
        (in, out) where BLAS makes the compiled one-row products)."""
        with torch.device("meta"):
            lin = Linear(self.n_in, self.n_out, self.bias is not None)
        lin.weight = nn.Parameter(self.dense_weight(), requires_grad=False)  # (in, out) over (out, in) storage
        if self.bias is not None:
            lin.bias = self.bias
        return lin


def in_out(W: torch.Tensor, tile: int = 16) -> torch.Tensor:
    """W (in, out) over (out, in) storage, copied into (in, out) storage: tile by tile where the sizes allow (a plain
    `.contiguous()` reads across rows: 10 ms against 3.6 for a 3072×576 float32 weight, the default model's
    whole 540 MB 0.7 s against ≈ 0.25 s on a 2-core Xeon)."""
    K, N = W.shape
    if K % tile or N % tile:
        return W.contiguous()
    out = torch.empty(K, N, dtype=W.dtype, device=W.device)
    out.view(K // tile, tile, N // tile, tile).copy_(W.t().view(N // tile, tile, K // tile, tile).permute(2, 3, 0, 1))
    return out


def release_freed() -> None:
    """Hand the float weights packing freed back to the OS: glibc keeps the holes between the packed
    blocks otherwise (measured: the default model resident 1131 MiB after packing, 775 before)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
