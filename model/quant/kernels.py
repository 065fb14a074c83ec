"""Which kernel each quantized layer runs, chosen once by what the device offers.

- int4: ATen's `_weight_int4pack_mm_for_cpu` (4-bit codes in its packed layout, a bfloat16 scale and
  zero per group of 32, bfloat16 activations; with float32 or float16 activations it takes a path
  measured 20–40× slower). Vectorised for AVX2 and AVX-512; PyTorch ≥ 2.5. Its packed layout differs by vector ISA
  (64-row tiles with AVX-512, 32 with AVX2): int4.layout() reads it off the kernel's own packing.
- 8-bit groups (q8.py, `--quantize int8` and the int4 mode's head): the same kernel once, over the
  high and the low 4 bits of each code side by side along the input (twice the input length).
- tinygemm (CUDA): ATen's `_weight_int4pack_mm`, the same product (codes in its own tiles, a bfloat16 scale and zero
  per group of 32, bfloat16 activations) on the GPU; the 8-bit head through it the same way, over [hi | lo] halves.
  Measured on an H200, one token's products of the default model's shapes replayed as one CUDA graph: 0.67 ms against
  0.80 for bfloat16 `x @ W` (64 rows eagerly: 1.96 against 2.44 ms); ATen's `_weight_int8pack_mm` (per channel) took
  6.6 ms, so int8 does not run on CUDA. Neither does int4 yet, from the command line (`CUDA_MODES`, below).
- generic: dequantize to the activations' dtype, then a dense product. Correct everywhere, slow;
  used where no packed kernel exists, and forced with ATTN_KERNELS=generic (tests cover it).

- lanes (lanes.py): a compiled int4/int8 step's layers hold their codes in a layout made for inductor's loops
  instead (the head: beside its int4pack codes), its one-row products compiled into the step, many rows through a
  package built once per machine: on CPUs whose best vector ISA is AVX2, where int4pack at one row is slowest, and for
  8-bit codes with AVX-512 (`lanes_wanted`; measured: README, Performance). ATTN_LANES=1|0 forces it on or off (tests
  cover both).

- float32 at one row in a compiled step (`one_row_kernel`): BLAS (`x @ W`, one extern call in the package, W
  stored (in, out)) on Intel CPUs, where MKL streams the weights at 19–26 GB/s; inductor's own vectorized
  reduction along W stored (out, in) elsewhere (on a Zen4, MKL's one-row product ran on one thread and the
  reduction was twice as fast). ATTN_ONE_ROW=blas|reduce forces either (tests cover both).

`describe()` says which ran, for `attn bench`.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

GENERIC = "generic"
PACKED = ("int4pack", "tinygemm")  # the kernels that multiply by Packed4's codes (int4.py), on the CPU and on CUDA
# The --quantize modes `open_model` runs on CUDA; the others are refused there. int8: ATen's 8-bit product (above).
# int4: on an H200 (2026-12-04, random weights of the default model's shapes) its compiled step decoded 430 tok/s against
# bfloat16's 772, because inductor could not trace it (the tied embedding ran int4.layout()'s probe, a torch.Generator:
# fixed since, with the CPU's row read by value that came next, and tested on the CPU by tracing the step whole) and the
# eager step was captured instead; eagerly 78 against 82. It joins once a GPU run of `tests/test_quant.py -k cuda` and `attn bench --device cuda --quantize int4 --compile`
# shows it ahead of bfloat16.
CUDA_MODES: tuple[str, ...] = ()


def forced_generic() -> bool:
    return os.environ.get("ATTN_KERNELS", "").strip().lower() == GENERIC


def int4_kernel(device: torch.device) -> str:
    from model.quant.int4 import layout  # (int4.py holds the codes in the kernel's layout, read off the kernel)

    if forced_generic():
        return GENERIC
    if device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and layout() is not None:
        return "int4pack"
    if device.type == "cuda" and hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return "tinygemm"
    return GENERIC



def lanes_wanted(device: torch.device, bits: int) -> bool:
    """Whether a compiled step's `bits`-bit layers hold their codes in the lanes layout (lanes.py, model/compile.py):
    on AVX2 CPUs all of them; with AVX-512 (no AMX tiles) the 8-bit ones, where int4pack works over two halves of each
    code: measured on a 2-core Zen5, alternating in one $ATTN_HOME, the int8 step decoded 116–137 tok/s (median 136) on
    lanes against 119–122 (121) on int4pack; a 4-bit step on lanes decoded 167–172 against 191–223 on int4pack in the
    flows of that hour (README, Performance). Not on AMX CPUs: on a 2-core Xeon with AMX, forced on, the int4 step took
    20.5 ms a token against 7.1 on int4pack and the int8 step 23.3 against 11.8 (a code's shift, mask and conversion
    issue on one port of its 512-bit units there)."""
    forced = os.environ.get("ATTN_LANES", "").strip()
    if device.type != "cpu" or forced_generic() or forced == "0":
        return False
    if forced == "1":
        return True
    level = torch.backends.cpu.get_cpu_capability()
    return level == "AVX2" or (level == "AVX512" and bits == 8 and "AMX" not in cpu_features())


def one_row_kernel() -> str:
    """How a compiled float32 step multiplies one row by a weight: "blas" (`x @ W`, W stored (in, out)) or "reduce"
    (inductor's reduction along W stored (out, in)); model.quant.unpack lays the weights out for it. Measured on a
    2-core Intel Xeon (AMX) over the default model's 121 matrices, weights from memory: 26–28 ms a token through
    MKL against 44–46 through the reduction."""
    forced = os.environ.get("ATTN_ONE_ROW", "").strip().lower()
    if forced in ("blas", "reduce"):
        return forced
    return "blas" if cpuinfo("vendor_id") == "GenuineIntel" else "reduce"


@lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = (x.strip() for x in line.partition(":"))
                info.setdefault(key, value)
    except OSError:  # not Linux
        pass
    return info


def cpuinfo(field: str) -> str | None:
    """A field of /proc/cpuinfo as the first CPU lists it ("vendor_id", "model name", "flags"); None where there is none."""
    return _cpuinfo().get(field)


def cpu_features() -> str:
    """What PyTorch's CPU kernels dispatch on here: its vector ISA level, and AMX tiles when present."""
    level = torch.backends.cpu.get_cpu_capability()
    # torch.cpu's probe (torch 2.13 has it there only: torch._C._cpu's went away, and the AMX machines read "no AMX")
    amx = getattr(torch.cpu, "_is_amx_tile_supported", getattr(torch._C._cpu, "_is_amx_tile_supported", lambda: False))()
    return level + (" + AMX" if amx else "")
