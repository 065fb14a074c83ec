"""Weights quantized in groups of 32 along the input dimension, as GGUF's Q4_0, Q4_1 and Q8_0 blocks hold them.

A `Blocks` is the plain data (codes, and per group a float16 scale and offset); the linear layers in
int4.py and q8.py are built from it. Dequantizing follows ggml (and the `gguf` package) exactly, in
float32: Q4_1 w = d·q + m, Q4_0 w = d·(q − 8), Q8_0 w = d·q. One kind is ours: "u8", Q4_1's form at
8 bits (codes 0..255, w = d·q + m), what `--quantize int8` makes from float weights.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.errors import AttnError

GROUP = 32  # every GGUF block type used here covers 32 consecutive weights of a row
KINDS = ("q4_0", "q4_1", "q8_0", "u8")


@dataclass
class Blocks:
    """One weight (N out, K in): codes per element, a scale (and an offset) per group of 32 along K."""

    kind: str  # "q4_0" | "q4_1" | "q8_0" | "u8"
    codes: torch.Tensor  # (N, K): uint8 0..15 for q4_*, int8 for q8_0, uint8 0..255 for u8
    scale: torch.Tensor  # (N, K/32) float16: ggml's d
    offset: torch.Tensor | None = None  # (N, K/32) float16: Q4_1's (and u8's) m; None otherwise
    # Reads scale and offset again from where they came (a blocks file: load_blocks), so that a layer that runs on
    # its kernel's rounded copy need not keep these exact ones resident (int4.py); None: they are only here.
    reread: Callable[[], tuple[torch.Tensor, torch.Tensor | None]] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown block kind {self.kind!r}")
        N, K = self.codes.shape
        if K % GROUP or self.scale.shape != (N, K // GROUP):
            raise ValueError(f"{self.kind}: codes {tuple(self.codes.shape)} and scales {tuple(self.scale.shape)} do not fit groups of {GROUP}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """The weight (N, K) in float32, as ggml computes it (scale first, then the offset)."""
        d = self.scale.float().repeat_interleave(GROUP, dim=1)  # (N, K)
        if self.kind == "q8_0":
            return d * self.codes.float()
        if self.kind == "q4_0":
            return d * (self.codes.float() - 8)
        return d * self.codes.float() + self.offset.float().repeat_interleave(GROUP, dim=1)  # q4_1, u8

    def rows(self, index: torch.Tensor) -> "Blocks":
        """The blocks of some rows (e.g. llama.cpp's Q/K permutation undone, or one part of a fused weight)."""
        reread, whole = None, self.reread  # (the closure holds the function only: not these blocks' codes)
        if whole is not None:

            def reread() -> tuple[torch.Tensor, torch.Tensor | None]:
                scale, offset = whole()
                return scale[index], None if offset is None else offset[index]

        return Blocks(self.kind, self.codes[index], self.scale[index], None if self.offset is None else self.offset[index], reread)

    @staticmethod
    def cat(parts: list["Blocks"]) -> "Blocks":
        """Row-wise concatenation (q|k|v, gate|up): parts of one kind."""
        kinds = {p.kind for p in parts}
        if len(kinds) != 1:
            raise ValueError(f"cannot fuse blocks of kinds {sorted(kinds)}")
        offsets = None if parts[0].offset is None else torch.cat([p.offset for p in parts])
        reread, each = None, [p.reread for p in parts]  # (the functions only: not the parts' codes)
        if all(r is not None for r in each):

            def reread() -> tuple[torch.Tensor, torch.Tensor | None]:
                scales, offsets = zip(*[r() for r in each])
                return torch.cat(scales), None if offsets[0] is None else torch.cat(offsets)

        return Blocks(parts[0].kind, torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]), offsets, reread)


def q4_1_rtn(w: torch.Tensor) -> Blocks:
    """Round-to-nearest 4-bit in Q4_1's form (a scale and an offset per group), as llama.cpp's
    reference quantizer does it: d = (max − min)/15, m = min, q = round((w − m)/d) ∈ 0..15. w (N, K)."""
    return _asymmetric_rtn(w, 15, "q4_1")


def u8_rtn(w: torch.Tensor) -> Blocks:
    """Round-to-nearest 8-bit in the same form: d = (max − min)/255, m = min, q ∈ 0..255. w (N, K).

    Against symmetric 8-bit (Q8_0, or one scale per channel) the offset matters on the default model,
    whose float weights are Q4_1's 16 levels per group: those land on this grid (step d/17), not on a
    symmetric one — measured top-1 agreement with float32 98.4% here, 96.9% for Q8_0, 96.7% per channel."""
    return _asymmetric_rtn(w, 255, "u8")


def _asymmetric_rtn(w: torch.Tensor, top: int, kind: str) -> Blocks:
    N, K = w.shape
    g = _groups(w)
    lo, hi = g.amin(-1), g.amax(-1)
    d = ((hi - lo) / top).half()
    m = lo.half()
    inv = torch.where(d.float() != 0, 1 / d.float(), torch.zeros_like(lo))
    q = (g - m.float()[..., None]).mul_(inv[..., None]).add_(0.5).floor_().clamp_(0, top).to(torch.uint8)
    return Blocks(kind, q.view(N, K), d, m)


def _groups(w: torch.Tensor) -> torch.Tensor:
    """w (N, K) as float32 groups (N, K/32, 32), each group's 32 weights side by side in memory (a copy only where w
    comes transposed: `--quantize` loads the weights in (out, in) storage, cli/models.py). Viewed as it lay, a
    transposed weight's groups were a row apart: the min, max and rounding over the default model took 0.94–1.0 s of
    `--quantize int8`'s 2.2–2.5 s load; on a contiguous copy 0.54 s (2-core Xeon; the same codes and scales, bit for bit)."""
    N, K = w.shape
    return w.float().contiguous().view(N, K // GROUP, GROUP)


def q8_0_rtn(w: torch.Tensor) -> Blocks:
    """Round-to-nearest 8-bit in Q8_0's form: d = max|w|/127 per group, q = round(w/d). w (N, K)."""
    N, K = w.shape
    g = _groups(w)
    d = (g.abs().amax(-1) / 127).half()
    inv = torch.where(d.float() != 0, 1 / d.float(), torch.zeros_like(d.float()))
    q = (g * inv[..., None]).round().clamp_(-127, 127).to(torch.int8)
    return Blocks("q8_0", q.view(N, K), d)


def save_blocks(blocks: dict[str, Blocks], path) -> None:
    """Write blocks by name to one safetensors file: 4-bit codes two to a byte, scales and offsets as float16."""
    from safetensors.torch import save_file

    tensors, kinds = {}, {}
    for name, b in blocks.items():
        codes = b.codes
        if b.kind.startswith("q4"):  # two 4-bit codes a byte: weight 2j in the low nibble, 2j+1 in the high one
            codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
        tensors[f"{name}.codes"] = codes.contiguous()
        tensors[f"{name}.scale"] = b.scale.contiguous()
        if b.offset is not None:
            tensors[f"{name}.offset"] = b.offset.contiguous()
        kinds[name] = b.kind
    save_file(tensors, str(path), metadata={"kinds": json.dumps(kinds)})


def load_blocks(path) -> dict[str, Blocks]:
    """The blocks `save_blocks` wrote, each able to read its scale and offset again from the file (`reread`)."""
    from safetensors import safe_open

    out = {}
    stamp = _stamp(path)
    with safe_open(str(path), framework="pt") as f:
        kinds = json.loads(f.metadata()["kinds"])
        names = set(f.keys())
        for name, kind in kinds.items():
            codes = f.get_tensor(f"{name}.codes")
            if kind.startswith("q4"):
                codes = torch.stack([codes & 15, codes >> 4], dim=-1).view(codes.shape[0], -1)
            offset = f.get_tensor(f"{name}.offset") if f"{name}.offset" in names else None
            out[name] = Blocks(kind, codes, f.get_tensor(f"{name}.scale"), offset, _reader(path, name, offset is not None, stamp))
    return out


def _stamp(path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=2)
def _opened(path: str, stamp: tuple[int, int, int]):
    """The blocks file at `path` as `stamp` saw it, opened once for every weight that reads its scales again (a model's
    layers do, one after another, as its step is set up: 210 opens of the default model's file took ≈ 0.2 s)."""
    from safetensors import safe_open

    return safe_open(path, framework="pt")


def _reader(path, name: str, has_offset: bool, stamp: tuple[int, int, int]) -> Callable[[], tuple[torch.Tensor, torch.Tensor | None]]:
    """Reads one weight's scale (and offset) from the blocks file again, as it was when the codes were loaded."""

    def reread() -> tuple[torch.Tensor, torch.Tensor | None]:
        try:
            if _stamp(path) != stamp:
                raise OSError("the file changed since the model was loaded")
            f = _opened(str(path), stamp)
            return f.get_tensor(f"{name}.scale"), f.get_tensor(f"{name}.offset") if has_offset else None
        except OSError as e:
            raise AttnError(f"{path}: cannot read {name}'s exact scales again ({e.strerror or e}); load the model again") from None

    return reread
