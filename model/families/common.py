"""What every family file declares, and the config.json readers they share (RoPE, windows, activations).

A family is a config reader plus a weight-name table: `read_config(d)` turns the checkpoint's own
config.json into a `ModelConfig`, and `weights` maps checkpoint tensor names to ours (`{}` is the
layer index, `name:part` a slice of a fused weight). Errors name the config.json field they read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from model.config import ModelConfig, merge_ids
from model.errors import AttnError


@dataclass(frozen=True)
class Family:
    """One family: how to read its config.json and where its weights go."""

    name: str
    model_types: tuple[str, ...]
    read_config: Callable[[dict[str, Any]], ModelConfig]
    weights: dict[str, str]  # checkpoint name → ours
    embedding: str  # the checkpoint name of the token embedding (a tied head reuses it)
    head: str = "lm_head.weight"  # the checkpoint name of an untied head
    prefix: str = ""  # stripped from checkpoint names before the table is read (GPT-2's "transformer.")
    not_transposed: re.Pattern | None = None  # 2-D weights already stored (in, out) (GPT-2's Conv1D)
    ignored: re.Pattern | None = None  # buffers some files carry that are not weights (causal masks, RoPE tables)
    # Checkpoint name → a function of (tensor, config) that reorders it into our layout once, at loading.
    fixes: dict[str, Callable[[torch.Tensor, ModelConfig], torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class GgufArch:
    """A `general.architecture` of GGUF files that converts to one of our families (weights/gguf.py)."""

    model_type: str
    hf_class: str
    tensors: dict[str, str]  # GGUF tensor name → checkpoint name, `{}` the layer index
    permuted_qk: bool  # llama.cpp permuted Q/K rows (per head: interleaved RoPE pairs) at conversion


def get(d: dict[str, Any], key: str, default: Any) -> Any:
    """d[key], or `default` when absent or null (transformers' class default for a key a file leaves out)."""
    v = d.get(key)
    return default if v is None else v


def positive_int(d: dict[str, Any], key: str, default: Any = None) -> int:
    v = d[key] if default is None else get(d, key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise AttnError(f"config.json: {key} must be a positive integer (got {v!r})")
    return v


def head_dim(d: dict[str, Any], dim: int, heads: int, default: int | None = None) -> int:
    """head_dim as the file states it, else `default` (Gemma, Qwen3: a class default), else C / H."""
    if d.get("head_dim") is not None:
        return positive_int(d, "head_dim")
    if default is not None:
        return default
    if dim % heads:
        raise AttnError(f"config.json: hidden_size {dim} is not divisible by num_attention_heads {heads} (and no head_dim is given)")
    return dim // heads


def special_ids(d: dict[str, Any]) -> dict[str, Any]:
    return {"bos_token_id": d.get("bos_token_id"), "eos_token_ids": merge_ids([], d.get("eos_token_id"))}


# transformers' activation names → ours.
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def activation(d: dict[str, Any], key: str, default: str) -> str:
    name = get(d, key, default)
    if name not in ACTIVATIONS:
        raise AttnError(f"config.json: {key} {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


ROPE_TYPES = ("default", "linear", "llama3", "longrope")


@dataclass
class Rope:
    theta: float
    scaling: dict[str, Any] | None
    partial: float  # partial_rotary_factor: the share of each head's dims that rotate


def read_rope(
    d: dict[str, Any],
    params: dict[str, Any] | None = None,
    theta_default: float = 10000.0,
    theta_key: str = "rope_theta",
    partial_key: str = "partial_rotary_factor",
    partial_default: float = 1.0,
    aliases: dict[str, str] | None = None,
) -> Rope:
    """RoPE settings from a v5 `rope_parameters` dict (or `params`, one entry of a nested one) or v4 keys.

    Newer files keep everything in `rope_parameters`; older ones have top-level `rope_theta`,
    `partial_rotary_factor` and a `rope_scaling` dict (whose type is `type` or `rope_type`).
    """
    p = params if params is not None else d.get("rope_parameters")
    p = dict(p) if isinstance(p, dict) else {}
    if isinstance(d.get("rope_scaling"), dict) and params is None:
        p.update(d["rope_scaling"])
    where = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    kind = p.get("rope_type", p.get("type")) or "default"
    kind = (aliases or {}).get(kind, kind)
    if kind not in ROPE_TYPES:
        raise AttnError(f"config.json: {where}.rope_type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    theta = get(p, "rope_theta", get(d, theta_key, theta_default))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise AttnError(f"config.json: rope_theta must be a number (got {theta!r})")
    theta = float(theta)
    partial = float(get(p, "partial_rotary_factor", get(d, partial_key, partial_default)))
    if not 0 < partial <= 1:
        raise AttnError(f"config.json: {partial_key} must be in (0, 1] (got {partial})")
    if kind == "default":
        return Rope(theta, None, partial)
    max_pos = get(d, "max_position_embeddings", 2048)
    try:
        if kind == "linear":
            scaling = {"rope_type": "linear", "factor": float(p["factor"])}
        elif kind == "llama3":
            scaling = {
                "rope_type": "llama3",
                "factor": float(p["factor"]),
                "low_freq_factor": float(get(p, "low_freq_factor", 1.0)),
                "high_freq_factor": float(get(p, "high_freq_factor", 4.0)),
                "original_max_position_embeddings": int(get(p, "original_max_position_embeddings", max_pos)),
            }
            if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
                raise AttnError(f"config.json: {where}.high_freq_factor must be larger than low_freq_factor")
        else:  # longrope (Phi-3): a top-level original_max_position_embeddings wins, as in transformers
            orig = int(get(d, "original_max_position_embeddings", get(p, "original_max_position_embeddings", max_pos)))
            factor = p.get("factor") or max_pos / orig
            attention_factor = p.get("attention_factor")
            if attention_factor is None:
                attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
            scaling = {
                "rope_type": "longrope",
                "short_factor": [float(x) for x in p["short_factor"]],
                "long_factor": [float(x) for x in p["long_factor"]],
                "original_max_position_embeddings": orig,
                "attention_factor": float(attention_factor),
            }
    except KeyError as e:
        raise AttnError(f"config.json: {where} of type {kind!r} lacks {e.args[0]!r}") from None
    except (TypeError, ValueError):
        raise AttnError(f"config.json: {where} of type {kind!r} has a value that is not a number") from None
    if kind in ("linear", "llama3") and not scaling["factor"] > 0:
        raise AttnError(f"config.json: {where}.factor must be positive (got {scaling['factor']})")
    return Rope(theta, scaling, partial)


def rotary_dim(rope: Rope, head_dim: int, key: str = "partial_rotary_factor") -> int | None:
    """R = int(D × partial), as transformers computes it; None when all of D rotates. Checks LongRoPE's factor lists."""
    r = int(head_dim * rope.partial)
    if r < 2 or r % 2:
        raise AttnError(f"config.json: {key} {rope.partial} gives {r} rotary dims of head_dim {head_dim}: need an even number")
    s = rope.scaling
    if s and s["rope_type"] == "longrope":
        for name in ("short_factor", "long_factor"):
            if len(s[name]) != r // 2:
                raise AttnError(f"config.json: rope_scaling.{name} has {len(s[name])} entries; the {r} rotary dims need {r // 2}")
    return None if r == head_dim else r


def layer_windows(d: dict[str, Any], n: int, window: int | None, default_types: list[str]) -> list[int | None]:
    """The sliding window of each layer: `window` on the layers `layer_types` (or `default_types`) marks
    "sliding_attention", none on "full_attention" ones. A window larger than any context never masks."""
    if window is None:
        return [None] * n
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise AttnError(f"config.json: sliding_window must be a positive number of tokens (got {window!r})")
    types = d.get("layer_types")
    if types is None:
        types = default_types
    if not isinstance(types, list) or len(types) != n:
        got = f"{len(types)} entries" if isinstance(types, list) else repr(types)
        raise AttnError(f"config.json: layer_types must list one type for each of the {n} layers (got {got})")
    unknown = {t for t in types if t not in ("sliding_attention", "full_attention")}
    if unknown:
        raise AttnError(f"config.json: layer_types has unknown type {sorted(map(str, unknown))[0]!r}")
    return [window if t == "sliding_attention" else None for t in types]


def interleaved_types(n: int, pattern: int) -> list[str]:
    """Gemma's default layer pattern: every `pattern`-th layer global, the rest sliding (2: alternating)."""
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
