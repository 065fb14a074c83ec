"""OLMo 2: the Llama layout with the norms moved after each sublayer (x + norm(attn(x)), x + norm(mlp(x)),
nothing normed before) and an RMSNorm over the whole q and k projections (H·D and G·D wide) before RoPE."""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig
from model.families.common import Family
from model.families.llama import ATTENTION_WEIGHTS, base_config

WEIGHTS = {
    "model.embed_tokens.weight": "tok_emb.weight",
    **ATTENTION_WEIGHTS,
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.attn_post_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate_up.weight:gate",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.gate_up.weight:up",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down.weight",
    "model.layers.{}.post_feedforward_layernorm.weight": "layers.{}.mlp_post_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def read_config(d: dict[str, Any]) -> ModelConfig:
    # Olmo2RMSNorm multiplies by its weight in float32 and rounds once (Llama rounds first).
    return base_config(
        d, "olmo2", norm_eps=float(d.get("rms_norm_eps") or 1e-5), pre_norm=False, post_norm=True, qk_norm="flat", mlp_bias=False,
        norm_weight_in_float32=True
    )


FAMILY = Family(name="olmo2", model_types=("olmo2",), read_config=read_config, weights=WEIGHTS, embedding="model.embed_tokens.weight")
