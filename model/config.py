"""Model configuration, built from a checkpoint's own config.json (Hugging Face layout).

Each family reads its config.json into this one dataclass (model/families/); the fields say how a
block is put together, and model/decoder.py reads them top to bottom.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.errors import AttnError

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    dim: int  # C: width of the residual stream
    n_layers: int
    n_heads: int  # H: query heads
    n_kv_heads: int  # G: key/value heads (G == H: multi-head, G < H: grouped-query)
    head_dim: int  # D
    hidden_dim: int  # MLP inner width
    max_len: int  # max_position_embeddings: the longest context the model was trained for
    norm_eps: float
    norm: str  # "layer" (GPT-2, GPT-NeoX: LayerNorm with bias) or "rms"
    mlp: str  # "gated": down(act(gate) * up) (Llama's SwiGLU, Gemma's GeGLU); "plain": down(act(up)) (GPT-2, GPT-NeoX)
    positions: str  # "learned" (GPT-2 wpe) or "rope"
    tie_embeddings: bool
    act: str = "silu"  # the MLP's activation: "silu", "gelu" (exact, erf) or "gelu_tanh" (GPT-2's gelu_new, Gemma's)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear" | "llama3" | "longrope", ...}, as transformers reads it
    rotary_dim: int | None = None  # partial rotary (GPT-NeoX, Phi-4-mini): only the first R of D dims rotate; None: all
    local_rope_theta: float | None = None  # Gemma 3: layers with a sliding window rotate with this base, unscaled
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # Sliding-window attention: a query at position p sees keys p-W+1..p in the layers `layer_windows`
    # gives a window W (None: every earlier key). One entry per layer.
    layer_windows: list[int | None] = field(default_factory=list)
    # How a block is put together (model/decoder.py, Block):
    pre_norm: bool = True  # a norm on the input of attention and MLP (every family but OLMo 2)
    post_norm: bool = False  # a norm on the output of attention and MLP, before the residual add (Gemma 2/3, OLMo 2)
    parallel_residual: bool = False  # GPT-NeoX: x + attn(norm1(x)) + mlp(norm2(x)), both reading the block's input
    norm_offset: float = 0.0  # Gemma: RMSNorm scales by (1 + w), weights stored around 0
    norm_weight_in_float32: bool = False  # Gemma, OLMo 2: the weight multiplies in float32, rounded once after
    qk_norm: str | None = None  # RMSNorm on q and k before RoPE: "head" over each head's D (Qwen3, Gemma 3), "flat" over all of q / k (OLMo 2)
    query_pre_attn_scalar: float | None = None  # Gemma: scores scaled by 1/√query_pre_attn_scalar, not 1/√D
    attn_softcap: float | None = None  # Gemma 2: scores → cap·tanh(scores/cap) before the mask and softmax
    logit_softcap: float | None = None  # Gemma 2: logits → cap·tanh(logits/cap)
    embed_scale: float | None = None  # Gemma: embeddings × √C (rounded to the weights' dtype, as the reference does)

    def __post_init__(self) -> None:
        if not isinstance(self.max_len, int) or isinstance(self.max_len, bool) or self.max_len < 1:
            raise AttnError(f"config: max_position_embeddings must be a positive integer (got {self.max_len!r})")
        if self.positions == "rope" and not 0 < self.rope_theta < float("inf"):
            raise AttnError(f"config: rope_theta must be a positive number (got {self.rope_theta!r})")
        if self.n_heads % self.n_kv_heads:
            raise AttnError(f"config: num_attention_heads {self.n_heads} is not a multiple of num_key_value_heads {self.n_kv_heads}")
        if not self.layer_windows:
            self.layer_windows = [None] * self.n_layers
        if len(self.layer_windows) != self.n_layers:
            raise AttnError(f"config: layer_types has {len(self.layer_windows)} entries for {self.n_layers} layers")
        for w in self.layer_windows:
            if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1):
                raise AttnError(f"config: sliding_window must be a positive number of tokens (got {w!r})")
        if self.act not in ACTIVATIONS:
            raise AttnError(f"config: activation {self.act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        if self.positions == "rope":
            r = self.rotary_dim if self.rotary_dim is not None else self.head_dim
            if r < 2 or r % 2 or r > self.head_dim:
                raise AttnError(f"config: {r} rotary dims of head_dim {self.head_dim}: need an even number from 2 to head_dim")
        for name in ("query_pre_attn_scalar", "attn_softcap", "logit_softcap"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise AttnError(f"config: {_JSON_NAMES.get(name, name)} must be positive (got {v!r})")

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    @property
    def attn_scale(self) -> float:
        """What Q·K is multiplied by before the softmax: 1/√D, or Gemma's 1/√query_pre_attn_scalar."""
        return (self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim) ** -0.5

    @property
    def rope_dims(self) -> int:
        """R: how many leading dims of each head RoPE rotates (D unless partial)."""
        return self.rotary_dim if self.rotary_dim is not None else self.head_dim

    def uses_local_rope(self, layer: int) -> bool:
        """Whether `layer` rotates with the local base (Gemma 3's sliding-window layers)."""
        return self.local_rope_theta is not None and self.layer_windows[layer] is not None

    def kv_head(self, head: int) -> int:
        return head // self.group

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> "ModelConfig":
        from model.families import read_config  # the families import this module for the dataclass

        return read_config(d)

    @classmethod
    def from_dir(cls, path: Path) -> "ModelConfig":
        f = Path(path) / "config.json"
        if not f.is_file():
            raise AttnError(f"{path}: no config.json (not a model directory)")
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AttnError(f"{f}: invalid JSON ({e})") from None
        if not isinstance(d, dict):
            raise AttnError(f"{f}: expected a JSON object")
        cfg = cls.from_hf_config(d)
        gen = Path(path) / "generation_config.json"
        if gen.is_file():
            try:
                g = json.loads(gen.read_text(encoding="utf-8"))
                cfg.eos_token_ids = merge_ids(cfg.eos_token_ids, g.get("eos_token_id"))
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                pass  # a broken generation_config is reported by the sampling defaults reader
        return cfg


# The config.json names of fields whose errors are raised here (the family readers check the rest).
_JSON_NAMES = {"attn_softcap": "attn_logit_softcapping", "logit_softcap": "final_logit_softcapping"}


def read_json_object(f: Path) -> dict:
    """An optional JSON file of a model directory: {} when absent, one clear error when broken."""
    if not f.is_file():
        return {}
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AttnError(f"{f}: invalid JSON ({e})") from None
    return d if isinstance(d, dict) else {}


def merge_ids(ids: list[int], extra: Any) -> list[int]:
    more = extra if isinstance(extra, list) else [extra] if isinstance(extra, int) else []
    return list(dict.fromkeys([*ids, *more]))


def rope_inv_freq(cfg: ModelConfig, max_len: int, local: bool = False) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the R rotary dims in float32, and the factor cos and sin are scaled by.

    Computed as transformers does: θ^(-2i/R), with linear, Llama 3 or LongRoPE scaling. `local`:
    Gemma 3's base for its sliding-window layers (never scaled). LongRoPE (Phi-3) has short and long
    factors; transformers picks by the longest position of each call, which makes a cache written
    in one regime and read in the other; here the choice is made once per cache, by its length
    `max_len`, as llama.cpp does (long factors only for a context longer than the original one).
    """
    d = cfg.rope_dims
    theta = cfg.local_rope_theta if local else cfg.rope_theta
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = None if local else cfg.rope_scaling
    if not s:
        return inv, 1.0
    kind = s["rope_type"]
    if kind == "linear":
        return inv / s["factor"], 1.0
    if kind == "longrope":
        factors = s["long_factor"] if max_len > s["original_max_position_embeddings"] else s["short_factor"]
        return inv / torch.tensor(factors, dtype=torch.float32), s["attention_factor"]
    # llama3: long wavelengths are divided by `factor`, short ones kept, a smooth blend between.
    factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, blended, scaled), 1.0
