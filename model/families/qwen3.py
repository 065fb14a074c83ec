"""Qwen3: the Qwen2 layout with an RMSNorm on each head's q and k (over D, before RoPE), an explicit
head_dim that need not be C / H, and biases only with `attention_bias` (then on W_O too)."""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig
from model.families.common import Family, positive_int
from model.families.llama import WEIGHTS as LLAMA_WEIGHTS
from model.families.llama import base_config, qwen_windows

WEIGHTS = {
    **LLAMA_WEIGHTS,
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_norm.weight",
}


def read_config(d: dict[str, Any]) -> ModelConfig:
    n = positive_int(d, "num_hidden_layers")
    # transformers' Qwen3Config defaults head_dim to 128 when the file leaves it out.
    D = positive_int(d, "head_dim", 128)
    return base_config(d, "qwen3", head_dim=D, qk_norm="head", mlp_bias=False, layer_windows=qwen_windows(d, n))


FAMILY = Family(name="qwen3", model_types=("qwen3",), read_config=read_config, weights=WEIGHTS, embedding="model.embed_tokens.weight")
