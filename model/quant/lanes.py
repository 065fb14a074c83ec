"""Products over 4- and 8-bit codes in a layout inductor compiles into fast loops ("lanes"): a compiled int4/int8
step's layers on CPUs whose int4pack kernel is slow at one row (AVX2 without AVX-512; with AVX-512, 8-bit codes,
which int4pack multiplies as two halves; model/quant/kernels.lanes_wanted).

`LANES` consecutive output rows (a float vector's width: 8 with AVX2, 16 with AVX-512) share a 32-bit word per
position: word [r, c, l] holds row LANES·r + l's codes for inputs c·P … c·P + P − 1 (P = 8 codes of 4 bits, or 4 of
8 bits, the first in the lowest bits). Reduced along c with those rows as the vector's lanes, every load is a whole
vector: the word, one input broadcast per code, a group's scales (a and b, w = a·u + b, stored (r, group, l)). The
words are kept as float32 bit patterns, and the product reinterprets them: inductor's AVX2 loads of integer vectors
go through a buffer (a store-forwarding stall per load: 3–5× slower loops), its float loads do not. With 8 rows to a
word on an AVX-512 CPU inductor's loop ran scalar: one row of a 3072×576 8-bit product 630 µs against 45 with 16
(torch.compile, its call included; 2-core Zen5), the 49152×576 head 13.7 ms against 0.97.

Measured on a 2-core AMD EPYC (Zen3, AVX2), one row, kernels alone (torch.compile, less its ≈ 40 µs per call; the
first form of `row_product`, a group's sum then a second pass): 4-bit 960×576 ≈ 35 µs against 59 for int4pack,
3072×576 ≈ 90 against 159; 8-bit 3072×576 ≈ 90 against 265 for int4pack over both halves of the codes, the
49152×576 head 1.5 ms against 4.1 (the present form: a token 10–20% faster again, see `row_product`). Eagerly the
same product is 10–20× slower than int4pack (one pass per operation), so only a compiled step's layers take these codes
(model/quant/__init__.add_lanes): one row inside the step's packages, many rows (a prompt) through `Prompt`, a
package built once per machine (inductor dequantizes, BLAS multiplies; on AMD CPUs `PromptWeight`, oneDNN multiplies). inductor fuses the unpacking into the
reduction only with its "realize" thresholds raised (`INDUCTOR`): with its defaults it writes the unpacked
products to memory first (2× slower).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.quant.blocks import GROUP


def _width() -> int:
    """Rows a word position holds: Vectorized<float>'s width here, 16 with AVX-512 and 8 with AVX2, so that inductor's
    loop loads a whole vector of words at once (with 8 rows on an AVX-512 CPU it runs scalar, 10–14× slower)."""
    return 16 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 8


LANES = _width()
RUN = 8  # codes a row's product scales at once (a group of 32 holds four runs)
# inductor settings for a build that contains these products: fuse the codes' unpacking into the reduction (its
# opcount and reads thresholds raised), and keep an input read by several of its terms as a vector in memory (a
# pointwise result read more than once and itself reading more than 2 buffers is stored: otherwise a norm before
# the product is recomputed, square root and all, for every code; the 49152×576 head after the final norm 3.1 ms
# against 1.3); leave a reduction's few words a loop rather than unrolled (the int4 step's first build 11.7–12.8 s
# against 13.5–14.3, A/B on a 2-core Zen3; a token the same). (Every build also fuses a multiply and an add into
# one FMA: model/cxx.BUILD_OPTIONS.)
INDUCTOR = {"realize_reads_threshold": 2, "realize_cpu_opcount_threshold": 400, "realize_cpu_acc_reads_threshold": 64, "unroll_reductions_threshold": 1}


def per_word(bits: int) -> int:
    return 32 // bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (N, K) (0..15 or 0..255; N a multiple of LANES, K of 32) → words (N/LANES, K/P, LANES) as float32 bit patterns
    (a word's bytes in memory order, little-endian: its first code in the lowest bits)."""
    N, K = codes.shape
    P = per_word(bits)
    c = codes.to(torch.uint8).view(N // LANES, LANES, K // P, P).permute(0, 2, 1, 3)  # (r, c, l, j)
    if bits == 4:
        c = c[..., 0::2] | (c[..., 1::2] << 4)  # (r, c, l, 4 bytes): codes 2m and 2m + 1 in byte m
    return c.contiguous().view(torch.float32).view(N // LANES, K // P, LANES)


def unpack(words: torch.Tensor, bits: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The codes (N, K) as uint8 (or those of `rows`): the inverse of `pack`."""
    R, C, _ = words.shape
    b = words.view(torch.uint8).view(R, C, LANES, 4)
    if rows is not None:
        b = b[rows // LANES, :, rows % LANES]  # (n, C, 4)
    if bits == 4:
        b = torch.stack([b & 15, b >> 4], dim=-1).flatten(-2)  # (…, 8): code 2m low, 2m + 1 high
    if rows is not None:
        return b.reshape(len(rows), -1)
    return b.permute(0, 2, 1, 3).reshape(R * LANES, -1)


def by_lanes(t: torch.Tensor) -> torch.Tensor:
    """Per-row, per-group values (N, G) → (N/LANES, G, LANES) float32."""
    N, G = t.shape
    return t.float().view(N // LANES, LANES, G).transpose(1, 2).contiguous()


def from_lanes(t: torch.Tensor) -> torch.Tensor:
    R, G, _ = t.shape
    return t.transpose(1, 2).reshape(R * LANES, G)


def row_product(x: torch.Tensor, words: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bits: int) -> torch.Tensor:
    """x (1, K) float32 @ Wᵀ → (1, N'), W = a·u + b per group of 32: for each run of `RUN` codes (one word of 4 bits,
    two of 8), a times the sum of the codes u times their inputs, plus b times the sum of those inputs; summed over
    the runs. One reduction over a row's runs (inductor's loop loads each word once and keeps one accumulator), each
    run's products added as a tree (a short chain of dependent additions). Against the sum over a group first, then
    a second pass applying a and b: a token 9.0–10.0 → 7.8–9.0 ms (int4), 10.6–11.7 → 8.7–9.7 (int8), 2-core Zen3.
    Runs of 16 codes: about 3% faster again, but the step's first build takes 16 s against 12 (inductor's code
    generation grows with the terms in a loop)."""
    R, C, _ = words.shape
    G = a.shape[1]
    P, mask = per_word(bits), (1 << bits) - 1
    n = RUN // P  # words to a run
    w = words.view(torch.int32).view(R, C // n, n, LANES)
    xc = x.reshape(C // n, n, P)
    terms = [((w[:, :, i] >> (bits * j)) & mask if j else w[:, :, i] & mask).float() * xc[:, i, j].view(1, -1, 1) for i in range(n) for j in range(P)]
    while len(terms) > 1:  # (RUN a power of 2)
        terms = [terms[i] + terms[i + 1] for i in range(0, len(terms), 2)]
    per_group = C // n // G  # runs
    s = terms[0].view(R, G, per_group, LANES)
    xs = xc.sum((1, 2)).view(1, G, per_group, 1)
    return (s * a.view(R, G, 1, LANES) + b.view(R, G, 1, LANES) * xs).sum((1, 2)).view(1, R * LANES)


def dense(words: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bits: int) -> torch.Tensor:
    """W (N', K) in float32: a·u + b per group, exactly as the blocks define it."""
    u = unpack(words, bits).float()
    n, K = u.shape
    scale, offset = from_lanes(a), from_lanes(b)
    return (u.view(n, K // GROUP, GROUP) * scale[..., None] + offset[..., None]).view(n, K)


def dense_t(words: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bits: int) -> torch.Tensor:
    """Wᵀ (K, N') in float32, as `dense` (the same values), written so that inductor's loop runs along the rows of a
    word position, every load a whole vector: what the prompt's package computes before its matrix product."""
    R, C, _ = words.shape
    G = a.shape[1]
    P, mask = per_word(bits), (1 << bits) - 1
    shifts = torch.arange(P, dtype=torch.int32, device=words.device).view(1, 1, P, 1) * bits
    u = ((words.view(torch.int32).unsqueeze(2) >> shifts) & mask).float()  # (r, c, j, l)
    per_code = (R, G, C // G, P, LANES)
    a_, b_ = (t.view(R, G, 1, 1, LANES).expand(per_code).reshape(R, C, P, LANES) for t in (a, b))
    return (u * a_ + b_).permute(1, 2, 0, 3).reshape(C * P, R * LANES)


def prompt_through_onednn() -> bool:
    """Whether a prompt's rows are multiplied by oneDNN, outside the package that dequantizes the weight (`PromptWeight`),
    rather than by BLAS inside it (`Prompt`): on AMD CPUs, where MKL takes its generic code path. Measured on a 2-core
    Zen5, 64 rows, float32 either way: a 3072×576 8-bit layer 0.70 ms against 1.68, 576×1536 0.63 against 0.85."""
    from model.quant.kernels import cpuinfo

    return cpuinfo("vendor_id") == "AuthenticAMD" and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Prompt(nn.Module):
    """What a prompt's package computes for any layer with `bits`-bit lanes: x (M, K) @ W (N', K)ᵀ, the weight
    dequantized by inductor's loop (model/compile.py builds it once per machine, every size a symbolic one)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, x: torch.Tensor, words: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return x @ dense_t(words, a, b, self.bits)


class PromptWeight(Prompt):
    """The prompt's package where `prompt_through_onednn`: the weight alone, Wᵀ (K, N') dequantized exactly in float32."""

    def forward(self, words: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return dense_t(words, a, b, self.bits)


class Lanes(nn.Module):
    """A weight's codes in the lanes layout with its per-group a and b (w = a·u + b): `row` is the one-row product."""

    def __init__(self, codes: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bits: int, device: torch.device) -> None:
        super().__init__()
        pad = -codes.shape[0] % LANES  # zero rows up to whole words; their outputs are cut
        self.bits = bits
        self.register_buffer("words", pack(F.pad(codes, (0, 0, 0, pad)), bits).to(device))
        self.register_buffer("a", by_lanes(F.pad(a.float(), (0, 0, 0, pad))).to(device))
        self.register_buffer("b", by_lanes(F.pad(b.float(), (0, 0, 0, pad))).to(device))
        self._prompt = None  # the prompt's package (Prompt, built ahead of time), attached by model/compile.py
        self._prompt_weight = False  # whether that package is a PromptWeight

    def row(self, x: torch.Tensor) -> torch.Tensor:
        """x (1, K) → (1, N') float32."""
        return row_product(x.float(), self.words, self.a, self.b, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) → (M, N') float32: one row compiled into a step, `row`; else through the prompt's package where
        one is attached, or eagerly (the weight dequantized, then BLAS)."""
        x = x.float()
        if torch.compiler.is_compiling():
            return self.row(x) if x.shape[0] == 1 else x @ dense_t(self.words, self.a, self.b, self.bits)
        if self._prompt is not None:
            if self._prompt_weight:  # the package dequantizes Wᵀ, oneDNN multiplies (prompt_through_onednn)
                w_t = self._prompt([self.words, self.a, self.b])[0]
                return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w_t.t(), None, "none", [], "")
            return self._prompt([x.contiguous(), self.words, self.a, self.b])[0]
        return x @ dense(self.words, self.a, self.b, self.bits).t()

    def codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        return unpack(self.words, self.bits, rows)
