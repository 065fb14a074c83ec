"""Llama and its close relatives: Llama 2/3/3.1/3.2, SmolLM, TinyLlama, Mistral, Qwen2 (and Qwen3, OLMo 2 reuse the names).

RMSNorm before attention and MLP, RoPE (default, linear or Llama 3 scaling), SwiGLU, grouped-query
attention; Qwen2 adds q/k/v biases; Mistral and Qwen2 may slide a window over some layers.
"""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig
from model.families.common import Family, GgufArch, activation, get, head_dim, layer_windows, positive_int, read_rope, rotary_dim, special_ids

# q, k, v (fused into one projection) and o, as transformers' Llama-style attention names them.
ATTENTION_WEIGHTS = {
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.qkv.weight:q",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.qkv.weight:k",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.qkv.weight:v",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attn.qkv.bias:q",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attn.qkv.bias:k",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attn.qkv.bias:v",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.o.weight",
    "model.layers.{}.self_attn.o_proj.bias": "layers.{}.attn.o.bias",
}

WEIGHTS = {
    "model.embed_tokens.weight": "tok_emb.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    **ATTENTION_WEIGHTS,
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate_up.weight:gate",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.gate_up.weight:up",
    "model.layers.{}.mlp.gate_proj.bias": "layers.{}.mlp.gate_up.bias:gate",
    "model.layers.{}.mlp.up_proj.bias": "layers.{}.mlp.gate_up.bias:up",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down.weight",
    "model.layers.{}.mlp.down_proj.bias": "layers.{}.mlp.down.bias",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def base_config(d: dict[str, Any], mt: str, **overrides: Any) -> ModelConfig:
    """The Llama-layout fields every RMSNorm/RoPE/gated-MLP family shares; `overrides` replace any of them."""
    dim, heads = positive_int(d, "hidden_size"), positive_int(d, "num_attention_heads")
    D = overrides.pop("head_dim", None) or head_dim(d, dim, heads)
    rope = overrides.pop("rope", None) or read_rope(d)
    fields: dict[str, Any] = dict(
        model_type=mt,
        vocab_size=positive_int(d, "vocab_size"),
        dim=dim,
        n_layers=positive_int(d, "num_hidden_layers"),
        n_heads=heads,
        n_kv_heads=positive_int(d, "num_key_value_heads", heads),
        head_dim=D,
        hidden_dim=positive_int(d, "intermediate_size"),
        max_len=get(d, "max_position_embeddings", 2048),
        norm_eps=float(get(d, "rms_norm_eps", 1e-6)),
        norm="rms",
        mlp="gated",
        act=activation(d, "hidden_act", "silu"),
        positions="rope",
        tie_embeddings=bool(get(d, "tie_word_embeddings", False)),  # transformers' default for these families
        qkv_bias=bool(get(d, "attention_bias", False)),
        o_bias=bool(get(d, "attention_bias", False)),
        mlp_bias=bool(get(d, "mlp_bias", False)),
        rope_theta=rope.theta,
        rope_scaling=rope.scaling,
        rotary_dim=rotary_dim(rope, D),
        **special_ids(d),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def qwen_windows(d: dict[str, Any], n: int) -> list[int | None]:
    """Qwen2/Qwen3: a window only with `use_sliding_window`, on the layers `layer_types` marks — by default
    those from `max_window_layers` on."""
    if not d.get("use_sliding_window", False):
        return [None] * n
    first = get(d, "max_window_layers", 28)
    return layer_windows(d, n, d.get("sliding_window"), ["sliding_attention" if i >= first else "full_attention" for i in range(n)])


def read_config(d: dict[str, Any]) -> ModelConfig:
    mt = d["model_type"]
    n = positive_int(d, "num_hidden_layers")
    if mt == "qwen2":  # q/k/v always have a bias, W_O never
        return base_config(d, mt, qkv_bias=True, o_bias=False, layer_windows=qwen_windows(d, n))
    # Mistral: one window on every layer (null: none).
    window = d.get("sliding_window") if mt == "mistral" and d.get("use_sliding_window", True) else None
    return base_config(d, mt, layer_windows=layer_windows(d, n, window, ["sliding_attention"] * n))


FAMILY = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    read_config=read_config,
    weights=WEIGHTS,
    embedding="model.embed_tokens.weight",
)

# GGUF (llama.cpp) tensor names → checkpoint names: the `llama` and `qwen2` architectures. `output.weight`
# exists only when the head is not tied to the embedding. `rope_freqs.weight` (Llama 3.1/3.2) is not a
# weight: weights/gguf.py turns it back into config.json's Llama 3 rope_scaling.
GGUF_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}

# llama.cpp permutes Q/K rows for the `llama` architecture only; Qwen2 keeps HF's layout.
GGUF = {
    "llama": GgufArch("llama", "LlamaForCausalLM", GGUF_TENSORS, permuted_qk=True),
    "qwen2": GgufArch("qwen2", "Qwen2ForCausalLM", GGUF_TENSORS, permuted_qk=False),
}
