"""Weight-only int4: 4-bit codes in groups of 32 along the input dimension, a scale and an offset per group.

W (out, in) = (q − 8)·s + z per group, the form ATen's `_weight_int4pack_mm_for_cpu` computes. A
GGUF Q4_1 block (w = d·q + m) is that with s = d, z = m + 8d; Q4_0 (w = d·(q − 8)) with s = d, z = 0.
From a GGUF the file's own codes are kept, and its float16 d and m are read again from the model's blocks
file whenever `dense_weight` asks (so it is exactly the file's weight; not kept resident: 13 MB on the
default model, read only by the microscope); the kernel reads s and z rounded to bfloat16 (its
activations' dtype) — the one rounding this path adds, shown in `attn bench --quality`. From float weights the groups are
quantized round-to-nearest in Q4_1's form (blocks.q4_1_rtn).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from model.quant.blocks import GROUP, Blocks, q4_1_rtn
from model.quant.kernels import PACKED, int4_kernel
from model.quant.lanes import Lanes

ROWS = 64  # output rows are padded to a multiple of this: whole tiles of every layout the kernel has (`layout`)


class Packed4(nn.Module):
    """x @ ((q − 8)·s + z)ᵀ for 4-bit codes q (N, K) held in the int4pack kernel's layout, s and z per group
    of 32 in bfloat16: the one product Int4Linear makes, and the one over [high | low] halves Q8Linear makes.
    On CUDA the product reads the codes in tinygemm's tiles (`tiles`), and the CPU layout stays beside them for
    reading codes back (a tied embedding's rows, the microscope's dense weight): 4-bit weights take twice their
    size in GPU memory there."""

    def __init__(self, codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor, device: torch.device) -> None:
        super().__init__()
        N = codes.shape[0]
        pad = -N % ROWS  # zero rows up to whole tiles; their output is cut
        padded = F.pad(codes, (0, 0, 0, pad)).to(device)
        # read once here: a compiled step that traces codes() must not run layout()'s probe (dynamo looks through its cache)
        self.layout = _tiles(None)
        self.register_buffer("packed", pack_rows(padded, self.layout))  # (N', K/2) uint8
        self.register_buffer("tiles", tinygemm_tiles(padded) if int4_kernel(device) == "tinygemm" else None)
        sz = F.pad(torch.stack([s.float(), z.float()], dim=-1), (0, 0, 0, 0, 0, pad))  # (N', K/32, 2)
        self.register_buffer("sz", sz.transpose(0, 1).contiguous().to(torch.bfloat16).to(device))  # (K/32, N', 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) → (M, N') bfloat16."""
        if self.tiles is not None:
            return torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), self.tiles, GROUP, self.sz)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, GROUP, self.sz)

    def codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The codes (N', K) as uint8 0..15, or only `rows` of them (cheap: a tied embedding reads a few)."""
        if rows is None:
            return unpack_rows(self.packed, self.layout)
        return unpack_row_ids(self.packed, rows, self.layout)


class BlockLinear(nn.Module):
    """What a layer with W (out, in) held as blocks of `KINDS` shares — `Linear`'s protocol: forward (the
    subclass's `product` of the padded input), dense_weight, columns, bias — and making one from a float
    `Linear` (round-to-nearest by `rtn`). Subclasses: Int4Linear here, Q8Linear in q8.py."""

    KINDS: tuple[str, ...] = ()
    REREAD = False  # whether the exact scales stay in the file where they can be read again (Blocks.reread)
    BITS = 4  # bits a code
    ZERO = 8  # w = d·(u − ZERO) for blocks without an offset
    rtn: Callable[[torch.Tensor], Blocks]

    def __init__(self, blocks: Blocks, bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        if blocks.kind not in self.KINDS:
            raise ValueError(f"{type(self).__name__} takes {' or '.join(self.KINDS)} blocks, not {blocks.kind}")
        N, K = blocks.shape
        self.n_out, self.n_in = N, K
        self.dtype = dtype  # the model's float dtype: what dense_weight returns, what forward gives back
        self.kind = blocks.kind
        self.kernel = int4_kernel(device)
        self.k_padded = K  # the input's width with whole groups
        # The exact float16 d (N, K/32) and m (or None), for dense_weight: kept here, or where the subclass runs on
        # its kernel's rounded copy and the blocks can read them again from their file, read there when asked.
        self.reread = blocks.reread if self.REREAD else None
        exact = (None, None) if self.reread is not None else (blocks.scale.to(device), None if blocks.offset is None else blocks.offset.to(device))
        self.register_buffer("scale16", exact[0])
        self.register_buffer("offset16", exact[1])
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.q: Packed4 | None = None  # the int4pack product's codes (None where the lanes copy replaced them: add_lanes)
        self.lanes: Lanes | None = None  # the codes in the lanes layout for the compiled step, where added (add_lanes)

    @classmethod
    def from_linear(cls, lin: nn.Module) -> "BlockLinear":
        """Round-to-nearest from a float `Linear` (W stored (in, out)); K padded with zeros to whole groups."""
        w = lin.dense_weight().detach().t().float()  # (out, in)
        w = F.pad(w, (0, -w.shape[1] % GROUP))
        layer = cls(cls.rtn(w), lin.bias, lin.weight.dtype, lin.weight.device)
        layer.n_in = lin.weight.shape[0]
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = pad_input(x.reshape(-1, shape[-1]), self.k_padded)  # (M, K')
        if self.lanes is not None and (self.kernel == "lanes" or self._lanes_take(x2.shape[0])):
            y = self.lanes.forward(x2)  # (its own codes only, or beside int4pack's: add_lanes)
        else:
            y = self.product(x2)
        if y.shape[1] != self.n_out:  # rows padded to whole tiles
            y = y[:, : self.n_out]
        y = y.to(x.dtype).view(*shape[:-1], self.n_out)
        return y + self.bias if self.bias is not None else y

    def _lanes_take(self, rows: int) -> bool:
        """With both layouts (the head): the lanes copy takes one row compiled into the step and many rows where the
        prompt's package is attached (exact, as the blocks); one eager row (a prompt's last, for its logits) stays on
        int4pack (4.8 ms for the default model's head, against ≈ 20 through the package, which dequantizes it whole)."""
        if torch.compiler.is_compiling():
            return rows == 1
        return rows > 1 and self.lanes._prompt is not None

    def product(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, K') @ Wᵀ → (M, N' ≥ N), in any float dtype."""
        raise NotImplementedError

    def _dense_rows(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of W (out, in') as float32, exactly as the blocks define them (all rows, or `rows`)."""
        raise NotImplementedError

    def codes(self) -> torch.Tensor:
        """The codes (N, K') as uint8: 0..15, or 0..255 for 8-bit blocks (Q8_0's q + 128)."""
        return self._codes()[: self.n_out]

    def _codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The codes of `rows` (all rows, padding too, where None) as uint8, from whichever layout the layer holds."""
        if self.q is None:
            return self.lanes.codes(rows)
        return self._packed_codes(rows)

    def _packed_codes(self, rows: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _packed(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, device: torch.device) -> "Packed4":
        """The int4pack product's codes and scales for codes (N, K') 0..2^BITS − 1 and the float16 scale and offset."""
        raise NotImplementedError

    def _exact(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.reread() if self.reread is not None else (self.scale16, self.offset16)

    def add_lanes(self, only: bool = False) -> None:
        """Keep the codes in the lanes layout (model/quant/lanes.py), with the exact scales in the form w = a·u + b, for
        the compiled step's products: beside the int4pack codes (eager rows keep running those), or `only` (its one
        row product compiled into the step, many rows through `Lanes.forward`)."""
        scale, offset = self._exact()
        a = scale.float()
        b = offset.float() if offset is not None else -self.ZERO * a
        self.lanes = Lanes(self.codes(), a, b, self.BITS, a.device)
        if only:
            self.q, self.kernel = None, "lanes"

    def drop_lanes(self) -> None:
        """The int4pack codes again (made from the lanes copy where they were dropped), the lanes copy gone."""
        if self.q is None:
            scale, offset = self._exact()
            self.q = self._packed(self.codes(), scale, offset, self.lanes.words.device)
            self.kernel = "int4pack"
        self.lanes = None

    def _dequantize(self, codes: torch.Tensor, rows: torch.Tensor | None, zero: int) -> torch.Tensor:
        """d·(q − zero) (no offset) or d·q + m, per group, for codes (n, K') of `rows` (None: all)."""
        pick = slice(None) if rows is None else rows
        n, K = codes.shape
        q = codes.view(n, K // GROUP, GROUP).float()
        scale, offset = self._exact()
        d = scale[pick].float()[..., None]  # (n, K/32, 1): broadcast over each group, not repeated
        w = d * (q - zero) if offset is None else d * q + offset[pick].float()[..., None]
        return w.view(n, K)

    def dense_weight(self) -> torch.Tensor:
        """W (in, out) in the model's dtype, from the kept codes and float16 scales (exactly the blocks' weight)."""
        return self._dense_rows()[:, : self.n_in].t().to(self.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Dense (in, out) weight, for code written against `Linear` (allocates a float copy)."""
        return self.dense_weight()

    def columns(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of W (out, in) dequantized: a tied embedding read from a quantized head."""
        return self._dense_rows(ids.reshape(-1))[:, : self.n_in].view(*ids.shape, -1).to(self.dtype)


class Int4Linear(BlockLinear):
    """y = x @ Wᵀ (+ b) with W held as 4-bit blocks: a drop-in for `Linear` (forward, dense_weight, columns)."""

    KINDS = ("q4_0", "q4_1")
    REREAD = True  # 13 MB of exact scales on the default model, read only by dense_weight (the microscope)
    rtn = staticmethod(q4_1_rtn)

    def __init__(self, blocks: Blocks, bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(blocks, bias, dtype, device)
        self.q = self._packed(blocks.codes, blocks.scale, blocks.offset, device)

    def _packed(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, device: torch.device) -> Packed4:
        s = scale.float()
        z = offset.float() + 8 * s if offset is not None else torch.zeros_like(s)
        return Packed4(codes, s, z, device)

    def product(self, x2: torch.Tensor) -> torch.Tensor:
        if self.kernel in PACKED:
            return self.q.forward(x2)  # (not through Module.__call__: ≈ 3 µs a call, 121 calls a token)
        return x2.to(self.dtype) @ self._dense_rows().t().to(self.dtype)

    def _packed_codes(self, rows: torch.Tensor | None) -> torch.Tensor:
        return self.q.codes(rows)

    def _dense_rows(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        q = self.codes() if rows is None else self._codes(rows)
        return self._dequantize(q, rows, 8)


def tinygemm_tiles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 on CUDA, N a multiple of 8 and K of 32 → `_convert_weight_to_int4pack`'s tiles (its input: two
    codes a byte, the even column in the high nibble; as many k-tiles per step, 8, 4 or 2, as K allows)."""
    K = codes.shape[1]
    inner = next(t for t in (8, 4, 2) if K % (16 * t) == 0)
    c = codes.to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack((c[:, ::2] << 4 | c[:, 1::2]).contiguous(), inner)


def pad_input(x: torch.Tensor, K: int) -> torch.Tensor:
    """x (M, k) with zero columns up to K: the inputs of weights padded to whole groups."""
    return x if x.shape[1] == K else F.pad(x, (0, K - x.shape[1]))


@lru_cache(maxsize=1)
def layout() -> tuple[int, bool] | None:
    """How `_convert_weight_to_int4pack_for_cpu` lays out codes in this process: (rows per tile, split), read off the
    kernel's own packing of a probe. Per tile, column by column, B/2 bytes, each holding two rows' codes: with split,
    byte i holds rows i (low nibble) and i + B/2 (high); else rows 2i and 2i + 1. It follows ATen's vector ISA
    (Vectorized<float>::size() × 4 rows): AVX-512 (64, split), AVX2 (32, split), no vector ISA (32, not split).
    None where no known layout matches (or there is no such kernel): the int4 layers then run the generic kernel."""
    convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if convert is None:
        return None
    probe = torch.randint(0, 16, (2 * ROWS, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    try:
        packed = convert(probe, 1)
    except RuntimeError:
        return None
    for tile in (64, 32, 16, 8):
        for split in (True, False):
            if torch.equal(pack_rows(probe, (tile, split)), packed):
                return tile, split
    return None


def _tiles(layout_: tuple[int, bool] | None) -> tuple[int, bool]:
    return layout_ or layout() or (ROWS, True)  # (with no kernel, any layout will do: this one)


def pack_rows(codes: torch.Tensor, layout_: tuple[int, bool] | None = None) -> torch.Tensor:
    """(N, K) codes, N a multiple of 64 → (N, K/2) bytes in `_convert_weight_to_int4pack_for_cpu`'s layout here
    (`layout()`, or the one given)."""
    tile, split = _tiles(layout_)
    N, K = codes.shape
    c = codes.to(torch.uint8)
    pairs = c.view(N // tile, 2, tile // 2, K) if split else c.view(N // tile, tile // 2, 2, K).transpose(1, 2)  # (tiles, low|high, B/2, K)
    byte = pairs[:, 0] | (pairs[:, 1] << 4)  # (tiles, B/2, K)
    return byte.transpose(1, 2).contiguous().view(N, K // 2)


def unpack_rows(packed: torch.Tensor, layout_: tuple[int, bool] | None = None) -> torch.Tensor:
    """The inverse of pack_rows: (N, K/2) bytes → (N, K) uint8 codes."""
    tile, split = _tiles(layout_)
    N, half = packed.shape
    K = half * 2
    byte = packed.view(N // tile, K, tile // 2).transpose(1, 2)  # (tiles, B/2, K)
    pairs = torch.stack([byte & 15, byte >> 4], dim=1)  # (tiles, low|high, B/2, K)
    return (pairs if split else pairs.transpose(1, 2)).reshape(N, K)


def unpack_row_ids(packed: torch.Tensor, rows: torch.Tensor, layout_: tuple[int, bool] | None = None) -> torch.Tensor:
    """pack_rows's codes of some rows only: (N, K/2) bytes, rows (n,) → (n, K) uint8."""
    tile, split = _tiles(layout_)
    N, half = packed.shape
    tiles = packed.view(N // tile, half * 2, tile // 2)  # (tiles, K, B/2)
    if rows.numel() == 1 and rows.device.type == "cpu" and not torch.compiler.is_compiling():
        # a decode step's embedding row, eagerly: a view, not a gather (≈ 4× less time)
        r, w = divmod(int(rows), tile)
        byte, high = (w % (tile // 2), w // (tile // 2)) if split else divmod(w, 2)
        return (tiles[r, :, byte] >> (4 * high)).unsqueeze(0) & 15
    within = rows % tile
    byte, high = (within % (tile // 2), within // (tile // 2)) if split else (within // 2, within % 2)
    return (tiles[rows // tile, :, byte] >> (4 * high)[:, None]) & 15
