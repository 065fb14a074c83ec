"""Quantized linear layers, swapped in for every `Linear` by walking the model.

Each replacement keeps `Linear`'s protocol — `forward(x)`, `dense_weight()` (W (in, out) in the
model's dtype, for the probe and explain), `columns(ids)` (a tied embedding's rows), `bias` — so the
decoder, the microscope and the compiled step need not know which one they hold.

- int8: 8-bit groups of 32 with a scale and an offset, round-to-nearest from the float weights (q8.py).
- packed (packed.py): not quantized — float32/bfloat16 weights in oneDNN's packed layout, the eager CPU
  default (`pack`), put back as plain layers before inductor compiles the step (`unpack`).
- int4: 4-bit groups of 32 with a scale and an offset (int4.py). From a GGUF with Q4_0/Q4_1 blocks the
  file's own codes are kept; from float weights, round-to-nearest. The LM head (the tied embedding)
  stays 8-bit: the file's Q8_0 blocks, or 8-bit groups from float (q8.py).
Which kernel runs is chosen by kernels.py.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from model.decoder import Decoder, Linear
from model.loading import weight_sources
from model.quant.blocks import Blocks
from model.quant.int4 import Int4Linear
from model.quant.kernels import cpu_features, forced_generic, lanes_wanted, one_row_kernel
from model.quant.packed import PackedLinear, in_out, packs, release_freed
from model.quant.q8 import Q8Linear

MODES = ("int8", "int4")

__all__ = ["MODES", "Blocks", "Int4Linear", "PackedLinear", "Q8Linear", "add_lanes", "cpu_features", "drop_lanes", "forced_generic", "layer_kernels", "pack", "packs", "quantize", "quantize_int8", "swap_linears", "unpack"]


def swap_linears(model: nn.Module, make: Callable[[str, nn.Module], nn.Module], kind: type = Linear) -> int:
    """Replace every `kind` layer (a `Linear`) anywhere in `model` by `make(qualified_name, layer)`, freeing
    each old weight as it goes; how many were replaced. Found by walking the modules, so a family's new
    projection cannot be missed."""
    n = 0
    for prefix, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                setattr(parent, name, make(f"{prefix}.{name}" if prefix else name, child))
                del child
                n += 1
    return n


def pack(model: Decoder) -> int:
    """Put every float `Linear` of a CPU model into oneDNN's packed layout (packed.py) where `packs` says
    so; how many."""
    if not packs(model.device, model.dtype):
        return 0
    tied = model.cfg.tie_embeddings

    def make(name: str, lin: Linear) -> PackedLinear:
        layer = PackedLinear.from_linear(lin, tied=tied and name.startswith("lm_head"))  # (--tp: lm_head.linear)
        lin.weight = None
        release_freed()  # the float weight's pages back to the OS as it goes (glibc keeps the holes otherwise)
        return layer

    return swap_linears(model, make)


def unpack(model: Decoder) -> int:
    """Plain `Linear`s back in place of the packed ones, for compiling (inductor cannot trace oneDNN's packed
    tensors), with W in (out, in) storage: `Linear.forward`'s compiled one-row reduction reads it, and eagerly
    (the prefill) oneDNN reads it as it is. Where BLAS makes the compiled one-row products instead
    (kernels.one_row_kernel: Intel CPUs), every float32 layer's W is stored (in, out), plain ones too. The head
    too: it runs inside the compiled packages
    (model/compile.py), and a tied head is its own rows again, so the packed copy (113 MiB on the default model)
    is freed; eagerly at one row it takes 5.85 ms against 5.4 packed (49152×576, Zen4 2 threads)."""
    n = swap_linears(model, lambda name, layer: layer.to_linear(), PackedLinear)
    if one_row_kernel() == "blas":  # every float32 layer, unpacked or opened plain (deferred packing): (in, out) for BLAS
        for lin in model.modules():
            W = lin.weight if isinstance(lin, Linear) else None  # (a quantized layer's `weight` dequantizes it)
            if W is not None and W.dtype == torch.float32 and W.device.type == "cpu" and not W.is_contiguous() and W.t().is_contiguous():
                lin.weight = nn.Parameter(in_out(W.detach()), requires_grad=False)
    release_freed()
    return n


def add_lanes(model: Decoder) -> int:
    """Before the step is compiled, where `lanes_wanted` for its bits: each quantized layer on int4pack codes gets its codes in the
    lanes layout (model/quant/lanes.py) instead, for the step's one-row products and the prompt's package; the head
    keeps its int4pack codes beside them, for the eager rows that end a prompt (its last row's logits) or a batch.
    How many."""
    n = 0
    for name, layer in model.named_modules():
        if isinstance(layer, (Int4Linear, Q8Linear)) and layer.kernel == "int4pack" and layer.lanes is None and lanes_wanted(model.device, layer.BITS):
            layer.add_lanes(only=not name.startswith("lm_head"))
            n += 1
    release_freed()
    return n


def drop_lanes(model: Decoder) -> None:
    """The int4pack codes again, the lanes copies gone (the step could not be built: it runs eagerly)."""
    for layer in model.modules():
        if isinstance(layer, (Int4Linear, Q8Linear)) and layer.lanes is not None:
            layer.drop_lanes()


def quantize(model: Decoder, mode: str, blocks: dict[str, Blocks] | None = None) -> Counter:
    """Quantize every linear layer in place; `blocks` are a GGUF's quantized tensors by checkpoint key
    (weights/gguf.py), used as they are where they cover a layer. Returns how many layers run each
    (class, kernel), for `attn bench` to say which path ran."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}")
    cfg = model.cfg
    from_blocks = covered_by(cfg, blocks or {})

    def make(name: str, lin: Linear) -> nn.Module:
        if mode == "int8":
            layer = Q8Linear.from_linear(lin)
        else:
            if from_blocks(f"{name}.weight"):  # the float weight may never have been read (load_model's skip)
                fused = Blocks.cat([blocks[s] for s in weight_sources(cfg, f"{name}.weight")])
                cls = Q8Linear if fused.kind == "q8_0" else Int4Linear
                layer = cls(fused, lin.bias, model.dtype, model.device)
            elif name == "lm_head":  # the head (and a tied embedding) stays 8-bit, as llama.cpp keeps its output layer
                layer = Q8Linear.from_linear(lin)
            else:
                layer = Int4Linear.from_linear(lin)
        return layer

    swap_linears(model, make)
    return layer_kernels(model)


def layer_kernels(model: nn.Module) -> Counter:
    """How many linear layers run each "Class:kernel" (packed or quantized; plain ones are not counted),
    read off the model as it is now: for `attn bench` to say which path ran."""
    def kernel(m: nn.Module) -> str:  # (a head with both: lanes for the compiled step's one row, int4pack for eager rows)
        return f"lanes+{m.kernel}" if getattr(m, "lanes", None) is not None and m.kernel != "lanes" else m.kernel

    return Counter(f"{type(m).__name__}:{kernel(m)}" for m in model.modules() if isinstance(m, (PackedLinear, Int4Linear, Q8Linear)))


def covered_by(cfg, blocks: dict[str, Blocks]) -> Callable[[str], bool]:
    """Which of our weights `blocks` fill completely (every fused part, matching shapes): those need
    not be read as floats at all (load_model's `skip`)."""

    def covered(name: str) -> bool:
        if not name.endswith(".weight") or not blocks:
            return False
        sources = weight_sources(cfg, name)
        return bool(sources) and all(s in blocks for s in sources) and len({blocks[s].shape[1] for s in sources}) == 1

    return covered


def quantize_int8(model: Decoder) -> Decoder:
    """Replace every linear layer (attention, MLP, head) by its int8 version."""
    quantize(model, "int8")
    return model
