"""Phi-3 and Phi-4-mini: the Llama layout with q|k|v and gate|up stored fused (in our own order), LongRoPE
scaling (short and long factors, and a factor on cos and sin), partial rotary (Phi-4-mini rotates 3/4 of
each head) and a sliding window on every layer (Phi-3-mini: 2047)."""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig
from model.families.common import Family, layer_windows, positive_int, read_rope
from model.families.llama import base_config

WEIGHTS = {
    "model.embed_tokens.weight": "tok_emb.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "model.layers.{}.self_attn.qkv_proj.weight": "layers.{}.attn.qkv.weight",  # rows [q | k | v], as ours
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.o.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
    "model.layers.{}.mlp.gate_up_proj.weight": "layers.{}.mlp.gate_up.weight",  # rows [gate | up], as ours
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def read_config(d: dict[str, Any]) -> ModelConfig:
    n = positive_int(d, "num_hidden_layers")
    # Early Phi-3 files name LongRoPE "su" (and "yarn"); transformers reads both as longrope.
    rope = read_rope(d, aliases={"su": "longrope", "yarn": "longrope"})
    return base_config(
        d,
        "phi3",
        rope=rope,
        norm_eps=float(d.get("rms_norm_eps") or 1e-5),
        max_len=d.get("max_position_embeddings") or 4096,
        qkv_bias=False,
        o_bias=False,
        mlp_bias=False,
        layer_windows=layer_windows(d, n, d.get("sliding_window"), ["sliding_attention"] * n),
    )


FAMILY = Family(name="phi3", model_types=("phi3",), read_config=read_config, weights=WEIGHTS, embedding="model.embed_tokens.weight")
