"""Model configuration, built from a checkpoint's own config.json (Hugging Face layout)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.errors import AttnError

SUPPORTED_TYPES = ("gpt2", "llama", "mistral", "qwen2")


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
    norm: str  # "layer" (GPT-2) or "rms" (Llama family)
    mlp: str  # "gelu" (GPT-2: fc → gelu → proj) or "swiglu" (Llama: silu(gate) * up → down)
    positions: str  # "learned" (GPT-2 wpe) or "rope"
    tie_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # Sliding-window attention: a query at position p sees keys p-W+1..p in the layers `layer_windows`
    # gives a window W (None: every earlier key). One entry per layer.
    layer_windows: list[int | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise AttnError(f"config: num_attention_heads {self.n_heads} is not a multiple of num_key_value_heads {self.n_kv_heads}")
        if not self.layer_windows:
            self.layer_windows = [None] * self.n_layers
        if len(self.layer_windows) != self.n_layers:
            raise AttnError(f"config: layer_types has {len(self.layer_windows)} entries for {self.n_layers} layers")
        for w in self.layer_windows:
            if w is not None and (not isinstance(w, int) or w < 1):
                raise AttnError(f"config: sliding_window must be a positive number of tokens (got {w!r})")

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        return head // self.group

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> "ModelConfig":
        mt = d.get("model_type")
        if mt not in SUPPORTED_TYPES:
            raise AttnError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED_TYPES)}")
        try:
            return _from_gpt2(d) if mt == "gpt2" else _from_llama(d, mt)
        except KeyError as e:
            raise AttnError(f"config.json: missing key {e.args[0]!r} for model_type {mt!r}") from None

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
                cfg.eos_token_ids = _merge_ids(cfg.eos_token_ids, g.get("eos_token_id"))
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                pass  # a broken generation_config is reported by the sampling defaults reader
        return cfg


def read_json_object(f: Path) -> dict:
    """An optional JSON file of a model directory: {} when absent, one clear error when broken."""
    if not f.is_file():
        return {}
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AttnError(f"{f}: invalid JSON ({e})") from None
    return d if isinstance(d, dict) else {}


def _merge_ids(ids: list[int], extra: Any) -> list[int]:
    more = extra if isinstance(extra, list) else [extra] if isinstance(extra, int) else []
    return list(dict.fromkeys([*ids, *more]))


def _from_gpt2(d: dict[str, Any]) -> ModelConfig:
    dim, heads = d["n_embd"], d["n_head"]
    return ModelConfig(
        model_type="gpt2",
        vocab_size=d["vocab_size"],
        dim=dim,
        n_layers=d["n_layer"],
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=dim // heads,
        hidden_dim=d.get("n_inner") or 4 * dim,  # GPT-2 leaves n_inner null to mean 4 × n_embd
        max_len=d["n_positions"],
        norm_eps=d.get("layer_norm_epsilon", 1e-5),
        norm="layer",
        mlp="gelu",
        positions="learned",
        tie_embeddings=d.get("tie_word_embeddings", True),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=_merge_ids([], d.get("eos_token_id")),
    )


def _from_llama(d: dict[str, Any], mt: str) -> ModelConfig:
    dim, heads = d["hidden_size"], d["num_attention_heads"]
    # RoPE settings moved from top-level keys into a `rope_parameters` dict in newer files.
    rope = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("default", "llama3", "linear"):
            raise AttnError(f"config.json: rope scaling type {kind!r} is not supported (supported: llama3, linear)")
        if kind == "default":
            scaling = None
    # Qwen2 always has q/k/v bias; Llama and Mistral only with attention_bias.
    qkv_bias = True if mt == "qwen2" else bool(d.get("attention_bias", False))
    return ModelConfig(
        model_type=mt,
        vocab_size=d["vocab_size"],
        dim=dim,
        n_layers=d["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or dim // heads,
        hidden_dim=d["intermediate_size"],
        max_len=d.get("max_position_embeddings", 2048),
        norm_eps=d.get("rms_norm_eps", 1e-6),
        norm="rms",
        mlp="swiglu",
        positions="rope",
        tie_embeddings=d.get("tie_word_embeddings", False),  # transformers' default for these families
        qkv_bias=qkv_bias,
        o_bias=bool(d.get("attention_bias", False)) and mt != "qwen2",
        mlp_bias=bool(d.get("mlp_bias", False)),
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        rope_scaling=scaling,
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=_merge_ids([], d.get("eos_token_id")),
        layer_windows=_layer_windows(d, mt),
    )


def _layer_windows(d: dict[str, Any], mt: str) -> list[int | None]:
    """The sliding window of each layer, as transformers applies it.

    Mistral: `sliding_window` on every layer (null: none). Qwen2: only with `use_sliding_window`, on
    the layers `layer_types` marks "sliding_attention" — by default those from `max_window_layers` on.
    """
    n = d["num_hidden_layers"]
    window = d.get("sliding_window")
    if mt == "qwen2" and not d.get("use_sliding_window", False):
        window = None
    if window is None:
        return [None] * n
    types = d.get("layer_types")
    if types is None:
        first = d.get("max_window_layers", 0) if mt == "qwen2" else 0
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    if not isinstance(types, list) or len(types) != n:
        raise AttnError(f"config.json: layer_types must list one type for each of the {n} layers")
    unknown = {t for t in types if t not in ("sliding_attention", "full_attention")}
    if unknown:
        raise AttnError(f"config.json: layer_types has unknown type {sorted(unknown)[0]!r}")
    return [window if t == "sliding_attention" else None for t in types]


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies θ^(-2i/D) in float32, with Llama 3's or linear scaling (computed as transformers does)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if not s:
        return inv
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        return inv / s["factor"]
    # llama3: long wavelengths are divided by `factor`, short ones kept, a smooth blend between.
    factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, blended, scaled)
