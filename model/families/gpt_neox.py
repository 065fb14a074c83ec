"""GPT-NeoX (Pythia): LayerNorm with bias, attention and MLP side by side on the block's input (parallel
residual), RoPE on the first rotary_pct of each head, a GELU MLP, biases everywhere, an untied head
(`embed_out`), and q|k|v fused per head: rows (H, 3, D), reordered to our [q | k | v] at loading."""

from __future__ import annotations

import re
from typing import Any

import torch

from model.config import ModelConfig
from model.errors import AttnError
from model.families.common import Family, activation, get, positive_int, read_rope, rotary_dim, special_ids

WEIGHTS = {
    "gpt_neox.embed_in.weight": "tok_emb.weight",
    "gpt_neox.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "gpt_neox.layers.{}.input_layernorm.bias": "layers.{}.attn_norm.bias",
    "gpt_neox.layers.{}.attention.query_key_value.weight": "layers.{}.attn.qkv.weight",
    "gpt_neox.layers.{}.attention.query_key_value.bias": "layers.{}.attn.qkv.bias",
    "gpt_neox.layers.{}.attention.dense.weight": "layers.{}.attn.o.weight",
    "gpt_neox.layers.{}.attention.dense.bias": "layers.{}.attn.o.bias",
    "gpt_neox.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
    "gpt_neox.layers.{}.post_attention_layernorm.bias": "layers.{}.mlp_norm.bias",
    "gpt_neox.layers.{}.mlp.dense_h_to_4h.weight": "layers.{}.mlp.up.weight",
    "gpt_neox.layers.{}.mlp.dense_h_to_4h.bias": "layers.{}.mlp.up.bias",
    "gpt_neox.layers.{}.mlp.dense_4h_to_h.weight": "layers.{}.mlp.down.weight",
    "gpt_neox.layers.{}.mlp.dense_4h_to_h.bias": "layers.{}.mlp.down.bias",
    "gpt_neox.final_layer_norm.weight": "norm.weight",
    "gpt_neox.final_layer_norm.bias": "norm.bias",
    "embed_out.weight": "lm_head.weight",
}


def per_head_qkv(w: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Rows (H, 3, D) — each head's q, k, v together — to (3, H, D): [q | k | v]. w: (3·H·D, …)."""
    H, D = cfg.n_heads, cfg.head_dim
    return w.reshape(H, 3, D, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def read_config(d: dict[str, Any]) -> ModelConfig:
    dim, heads = positive_int(d, "hidden_size"), positive_int(d, "num_attention_heads")
    if dim % heads:
        raise AttnError(f"config.json: hidden_size {dim} is not divisible by num_attention_heads {heads}")
    D = dim // heads
    # Older files: rotary_emb_base and rotary_pct (default 0.25); newer: rope_parameters.
    rope = read_rope(d, theta_key="rotary_emb_base", partial_key="rotary_pct", partial_default=0.25)
    bias = bool(get(d, "attention_bias", True))
    return ModelConfig(
        model_type="gpt_neox",
        vocab_size=positive_int(d, "vocab_size"),
        dim=dim,
        n_layers=positive_int(d, "num_hidden_layers"),
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=D,
        hidden_dim=positive_int(d, "intermediate_size"),
        max_len=get(d, "max_position_embeddings", 2048),
        norm_eps=float(get(d, "layer_norm_eps", 1e-5)),
        norm="layer",
        mlp="plain",
        act=activation(d, "hidden_act", "gelu"),
        positions="rope",
        tie_embeddings=bool(get(d, "tie_word_embeddings", False)),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=True,
        rope_theta=rope.theta,
        rope_scaling=rope.scaling,
        rotary_dim=rotary_dim(rope, D, "rotary_pct"),
        parallel_residual=bool(get(d, "use_parallel_residual", True)),
        **special_ids(d),
    )


FAMILY = Family(
    name="gpt_neox",
    model_types=("gpt_neox",),
    read_config=read_config,
    weights=WEIGHTS,
    embedding="gpt_neox.embed_in.weight",
    head="embed_out.weight",
    # Older Pythia files carry the causal mask and the RoPE table as buffers.
    ignored=re.compile(r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$"),
    fixes={
        "gpt_neox.layers.{}.attention.query_key_value.weight": per_head_qkv,
        "gpt_neox.layers.{}.attention.query_key_value.bias": per_head_qkv,
    },
)
