"""Loading a Hugging Face model directory: config, name tables, safetensors reading, shape checks.

Checkpoint names map to ours in one flat table per family (`{}` is the layer index). A value is
`our_key` or `our_key:part` for a slice of a fused weight (q|k|v, gate|up). Linear weights are
transposed to our (in, out) layout, except GPT-2's Conv1D weights, which already are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from model.config import ModelConfig, read_json_object
from model.decoder import Decoder
from model.errors import AttnError

LLAMA = {
    "model.embed_tokens.weight": "tok_emb.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.qkv.weight:q",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.qkv.weight:k",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.qkv.weight:v",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attn.qkv.bias:q",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attn.qkv.bias:k",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attn.qkv.bias:v",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.o.weight",
    "model.layers.{}.self_attn.o_proj.bias": "layers.{}.attn.o.bias",
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

GPT2 = {
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

TABLES = {"gpt2": GPT2, "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA}

# Stored (in, out) already: GPT-2's Conv1D. Everything else that is 2-D comes (out, in) and is transposed.
NOT_TRANSPOSED = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# Embedding tables keep their (rows, C) layout.
EMBEDDINGS = {"tok_emb.weight", "pos_emb.weight"}
# Buffers some GPT-2 files carry (the causal mask), not weights.
IGNORED = re.compile(r"h\.\d+\.attn\.(masked_)?bias$")


def load_model(
    path: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", skip: Callable[[str], bool] | None = None
) -> Decoder:
    """Build the decoder for a model directory and fill it with its weights, checked against the config.

    Weights `skip` names are checked but not read: they stay on the meta device, for the caller to
    replace (quantized layers built from a GGUF's own blocks, model/quant)."""
    path = Path(path)
    cfg = ModelConfig.from_dir(path)
    with torch.device("meta"):
        model = Decoder(cfg)
    expected = {k: tuple(p.shape) for k, p in model.state_dict().items()}
    files = checkpoint_files(path)
    plan = plan_loading(cfg, files, expected)
    if skip is not None:
        plan = {name: pieces for name, pieces in plan.items() if not skip(name)}
    state = read_weights(plan, expected, cfg, dtype, device)
    model.load_state_dict(state, assign=True, strict=skip is None)
    return model.eval()


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Checkpoint key → file, from model.safetensors or a sharded index."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise AttnError(f"{index}: not a valid safetensors index ({e})") from None
        out = {}
        for key, shard in weight_map.items():
            f = path / shard
            if not f.is_file():
                raise AttnError(f"{index}: shard {shard} is missing (it holds {key})")
            out[key] = f
        return out
    single = path / "model.safetensors"
    if not single.is_file():
        raise AttnError(f"{path}: no model.safetensors or model.safetensors.index.json")
    return {key: single for key in read_header(single)}


def read_header(f: Path) -> dict[str, dict]:
    """The safetensors header of one file, checked before any tensor is read."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise AttnError(f"{f}: truncated safetensors file ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise AttnError(f"{f}: safetensors header length {n} is larger than the file ({size} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise AttnError(f"{f}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise AttnError(f"{f}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    for key, info in header.items():
        try:
            begin, end = info["data_offsets"]
            shape, dt = info["shape"], info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise AttnError(f"{f}: tensor {key}: malformed header entry") from None
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_len):
            raise AttnError(f"{f}: tensor {key}: data lies outside the file (truncated download?)")
        if dt not in SAFETENSORS_DTYPES:
            raise AttnError(f"{f}: tensor {key}: unsupported dtype {dt}")
        numel = 1
        for d in shape:
            if not isinstance(d, int) or d < 0:
                raise AttnError(f"{f}: tensor {key}: bad shape {shape}")
            numel *= d
        if numel * SAFETENSORS_DTYPES[dt].itemsize != end - begin:
            raise AttnError(f"{f}: tensor {key}: {end - begin} bytes for shape {shape} {dt}")
    return header


# The dtypes attn reads from safetensors files (their header's codes) and offers for computing.
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _table_regex(table: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile("^" + re.escape(k).replace(r"\{\}", r"(\d+)") + "$"), v) for k, v in table.items()]


def part_sizes(cfg: ModelConfig) -> dict[str, int]:
    H, G, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    return {"q": H * D, "k": G * D, "v": G * D, "gate": cfg.hidden_dim, "up": cfg.hidden_dim}


PART_ORDER = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}


def part_offsets(cfg: ModelConfig) -> dict[str, int]:
    """Where each part starts along the output dimension of its fused weight."""
    sizes, out = part_sizes(cfg), {}
    for order in PART_ORDER.values():
        at = 0
        for part in order:
            out[part] = at
            at += sizes[part]
    return out


def name_table(cfg: ModelConfig) -> dict[str, str]:
    """The family's checkpoint key → our key table, with a tied model's one matrix mapped to the head."""
    table = dict(TABLES[cfg.model_type])
    if cfg.tie_embeddings:
        # One matrix serves both ends; it is stored in the head's (C, V) layout.
        emb = "wte.weight" if cfg.model_type == "gpt2" else "model.embed_tokens.weight"
        table[emb] = "lm_head.weight"
        del table["lm_head.weight"]
    return table


def weight_sources(cfg: ModelConfig, name: str) -> list[str]:
    """The checkpoint keys that fill our 2-D weight `name`, in the order its fused parts are laid out."""
    layer = re.search(r"layers\.(\d+)\.", name)
    generic = _generic(name)
    parts = {}
    for ckpt, ours in name_table(cfg).items():
        target, _, part = ours.partition(":")
        if target == generic:
            parts[part] = ckpt.replace("{}", layer.group(1)) if layer else ckpt
    order = next((o for o in PART_ORDER.values() if set(o) == set(parts)), [""])
    return [parts[p] for p in order]


def plan_loading(cfg: ModelConfig, files: dict[str, Path], expected: dict[str, tuple]) -> dict[str, list]:
    """For each of our tensors, the checkpoint pieces that fill it: [(ckpt_key, file, part, transpose)]."""
    table = name_table(cfg)
    patterns = _table_regex(table)
    headers: dict[Path, dict] = {}
    plan: dict[str, list] = {}
    for raw_key, f in files.items():
        key = raw_key.removeprefix("transformer.") if cfg.model_type == "gpt2" else raw_key
        if IGNORED.search(key) or (cfg.tie_embeddings and key == "lm_head.weight"):
            continue  # a tied head saved twice is the same matrix
        ours = _match(patterns, key)
        if ours is None:
            raise AttnError(f"{f}: unexpected tensor {raw_key} for model_type {cfg.model_type}")
        name, _, part = ours.partition(":")
        if name not in expected:
            raise AttnError(f"{f}: unexpected tensor {raw_key} (the config has no such layer or bias)")
        if f not in headers:
            headers[f] = read_header(f)
        info = headers[f].get(raw_key)
        if info is None:
            raise AttnError(f"{f}: tensor {raw_key} is listed in the index but not in the file")
        transpose = len(info["shape"]) == 2 and not NOT_TRANSPOSED.search(key) and name not in EMBEDDINGS
        want = _piece_shape(expected[name], part, cfg)
        got = tuple(info["shape"][::-1]) if transpose else tuple(info["shape"])
        if got != want:
            shown = tuple(info["shape"])
            need = want[::-1] if transpose else want
            raise AttnError(f"{f}: tensor {raw_key} has shape {list(shown)}, expected {list(need)} from config.json")
        plan.setdefault(name, []).append((raw_key, f, part, transpose))
    parts_needed: dict[str, list[str]] = {}  # our generic name → the parts the table fills it from ("" = whole)
    for ours in table.values():
        generic, _, part = ours.partition(":")
        parts_needed.setdefault(generic, []).append(part)
    for name in expected:
        have = {p for _, _, p, _ in plan.get(name, [])}
        missing = [p for p in parts_needed.get(_generic(name), [""]) if p not in have]
        if missing:
            ckpt = _ckpt_name(table, name, missing[0])
            raise AttnError(f"missing tensor {ckpt} in the checkpoint ({', '.join(sorted({str(p) for p in files.values()}))})")
    return plan


def _generic(name: str) -> str:
    """Our tensor name with the layer index as `{}`, as the tables write it."""
    return re.sub(r"layers\.\d+\.", "layers.{}.", name)


def _piece_shape(full: tuple, part: str, cfg: ModelConfig) -> tuple:
    if not part:
        return full
    n = part_sizes(cfg)[part]
    return (full[0], n) if len(full) == 2 else (n,)


def _match(patterns: list[tuple[re.Pattern, str]], key: str) -> str | None:
    for rx, ours in patterns:
        m = rx.match(key)
        if m:
            return ours.replace("{}", m.group(1)) if m.groups() else ours
    return None


def _ckpt_name(table: dict[str, str], name: str, part: str) -> str:
    layer = re.search(r"layers\.(\d+)\.", name)
    generic = _generic(name) + (f":{part}" if part else "")
    for k, v in table.items():
        if v == generic:
            return k.replace("{}", layer.group(1)) if layer else k
    return name


def read_weights(plan: dict[str, list], expected: dict[str, tuple], cfg: ModelConfig, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Fill each of our tensors from its pieces, converting to `dtype` once, one source tensor at a time."""
    state = {name: torch.empty(expected[name], dtype=dtype, device=device) for name in plan}
    by_file: dict[Path, list] = {}
    for name, pieces in plan.items():
        for raw_key, f, part, transpose in pieces:
            by_file.setdefault(f, []).append((name, raw_key, part, transpose))
    offsets = part_offsets(cfg)
    for f, items in by_file.items():
        with safe_open(f, framework="pt", device="cpu", backend="pread") as fh:
            for name, raw_key, part, transpose in items:
                src = fh.get_tensor(raw_key)
                if transpose:
                    src = src.t()
                dst = state[name]
                if part:  # a slice of a fused weight, along the output dimension
                    dst = dst[..., offsets[part] : offsets[part] + src.shape[-1]]
                dst.copy_(src)
                del src
    return state


def load_generation_config(path: Path) -> dict:
    """generation_config.json's settings ({} when the model has none)."""
    return read_json_object(Path(path) / "generation_config.json")
