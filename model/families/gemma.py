"""Gemma 2 and Gemma 3 (text): the Llama layout with four norms a block, RMSNorm of (1 + w), GeGLU, scaled
embeddings, scores scaled by 1/√query_pre_attn_scalar, and sliding-window layers between global ones.

Gemma 2 soft-caps attention scores (cap·tanh(s/cap), before the mask) and the final logits. Gemma 3
drops the caps, adds an RMSNorm on each head's q and k, and rotates its sliding-window layers with a
local base (rope_local_base_freq, unscaled) and its global layers with rope_theta and its scaling.
"""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig
from model.errors import AttnError
from model.families.common import Family, activation, get, interleaved_types, layer_windows, positive_int, read_rope
from model.families.llama import ATTENTION_WEIGHTS, base_config

WEIGHTS = {
    "model.embed_tokens.weight": "tok_emb.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    **ATTENTION_WEIGHTS,
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_norm.weight",  # Gemma 3
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_norm.weight",  # Gemma 3
    # Gemma's post_attention_layernorm normalises attention's output (Llama's is the MLP's input norm).
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.attn_post_norm.weight",
    "model.layers.{}.pre_feedforward_layernorm.weight": "layers.{}.mlp_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate_up.weight:gate",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.gate_up.weight:up",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down.weight",
    "model.layers.{}.post_feedforward_layernorm.weight": "layers.{}.mlp_post_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def _positive_or_none(d: dict[str, Any], key: str, default: float | None) -> float | None:
    v = d.get(key, default)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
        raise AttnError(f"config.json: {key} must be a positive number or null (got {v!r})")
    return None if v is None else float(v)


def read_config(d: dict[str, Any]) -> ModelConfig:
    mt = d["model_type"]
    gemma3 = mt == "gemma3_text"
    n = positive_int(d, "num_hidden_layers")
    dim = positive_int(d, "hidden_size")
    if gemma3 and d.get("use_bidirectional_attention"):
        raise AttnError("config.json: use_bidirectional_attention is true: an encoder (EmbeddingGemma), not a decoder attn can run")
    # transformers' class defaults where a file leaves a key out: Gemma's differ from Llama's.
    default_types = interleaved_types(n, get(d, "sliding_window_pattern", 6) if gemma3 else 2)
    windows = layer_windows(d, n, get(d, "sliding_window", 4096), default_types)
    scalar = _positive_or_none(d, "query_pre_attn_scalar", 256)
    if scalar is None:
        raise AttnError("config.json: query_pre_attn_scalar must be a positive number (got null)")
    fields: dict[str, Any] = dict(
        head_dim=positive_int(d, "head_dim", 256),
        norm_eps=float(get(d, "rms_norm_eps", 1e-6)),
        max_len=get(d, "max_position_embeddings", 131072 if gemma3 else 8192),
        act=activation(d, "hidden_activation", "gelu_pytorch_tanh"),
        tie_embeddings=bool(get(d, "tie_word_embeddings", True)),
        mlp_bias=False,
        layer_windows=windows,
        post_norm=True,
        norm_offset=1.0,
        norm_weight_in_float32=True,
        query_pre_attn_scalar=scalar,
        logit_softcap=_positive_or_none(d, "final_logit_softcapping", None if gemma3 else 30.0),
        embed_scale=dim**0.5,
    )
    if gemma3:
        # transformers' Gemma3Attention never applies attn_logit_softcapping (the released configs set it null).
        params = d.get("rope_parameters")
        nested = isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params)
        glob = read_rope(d, params.get("full_attention") or {} if nested else None, theta_default=1_000_000.0)
        local = read_rope(d, params.get("sliding_attention") or {}, theta_default=10_000.0, theta_key="rope_local_base_freq") if nested else None
        if local is not None and local.scaling is not None:
            raise AttnError("config.json: rope_parameters.sliding_attention: scaling the local RoPE is not supported")
        fields.update(rope=glob, qk_norm="head", local_rope_theta=local.theta if local else float(get(d, "rope_local_base_freq", 10_000.0)))
    else:
        fields.update(attn_softcap=_positive_or_none(d, "attn_logit_softcapping", 50.0))
    return base_config(d, mt, **fields)


FAMILY = Family(name="gemma", model_types=("gemma2", "gemma3_text"), read_config=read_config, weights=WEIGHTS, embedding="model.embed_tokens.weight")
