"""GPT-2: learned positions, LayerNorm before attention and MLP, a GELU (tanh) MLP, fused q|k|v, a tied head.

Its linear weights are Conv1D: stored (in, out) already, so they are not transposed.
"""

from __future__ import annotations

import re
from typing import Any

from model.config import ModelConfig
from model.errors import AttnError
from model.families.common import Family, get, positive_int, special_ids

WEIGHTS = {
    "wte.weight": "tok_emb.weight",
    "wpe.weight": "pos_emb.weight",
    "h.{}.ln_1.weight": "layers.{}.attn_norm.weight",
    "h.{}.ln_1.bias": "layers.{}.attn_norm.bias",
    "h.{}.attn.c_attn.weight": "layers.{}.attn.qkv.weight",
    "h.{}.attn.c_attn.bias": "layers.{}.attn.qkv.bias",
    "h.{}.attn.c_proj.weight": "layers.{}.attn.o.weight",
    "h.{}.attn.c_proj.bias": "layers.{}.attn.o.bias",
    "h.{}.ln_2.weight": "layers.{}.mlp_norm.weight",
    "h.{}.ln_2.bias": "layers.{}.mlp_norm.bias",
    "h.{}.mlp.c_fc.weight": "layers.{}.mlp.up.weight",
    "h.{}.mlp.c_fc.bias": "layers.{}.mlp.up.bias",
    "h.{}.mlp.c_proj.weight": "layers.{}.mlp.down.weight",
    "h.{}.mlp.c_proj.bias": "layers.{}.mlp.down.bias",
    "ln_f.weight": "norm.weight",
    "ln_f.bias": "norm.bias",
    "lm_head.weight": "lm_head.weight",
}


def read_config(d: dict[str, Any]) -> ModelConfig:
    dim, heads = positive_int(d, "n_embd"), positive_int(d, "n_head")
    if dim % heads:
        raise AttnError(f"config.json: n_embd {dim} is not divisible by n_head {heads}")
    return ModelConfig(
        model_type="gpt2",
        vocab_size=positive_int(d, "vocab_size"),
        dim=dim,
        n_layers=positive_int(d, "n_layer"),
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=dim // heads,
        hidden_dim=get(d, "n_inner", 4 * dim),  # GPT-2 leaves n_inner null to mean 4 × n_embd
        max_len=positive_int(d, "n_positions"),
        norm_eps=float(get(d, "layer_norm_epsilon", 1e-5)),
        norm="layer",
        mlp="plain",
        act="gelu_tanh",  # "gelu_new"
        positions="learned",
        tie_embeddings=bool(get(d, "tie_word_embeddings", True)),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        **special_ids(d),
    )


FAMILY = Family(
    name="gpt2",
    model_types=("gpt2",),
    read_config=read_config,
    weights=WEIGHTS,
    embedding="wte.weight",
    prefix="transformer.",
    not_transposed=re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$"),
    ignored=re.compile(r"h\.\d+\.attn\.(masked_)?bias$"),  # the causal mask some files carry
)
