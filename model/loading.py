"""Loading a Hugging Face model directory: config, name tables, safetensors reading, shape checks.

Checkpoint names map to ours in one flat table per family (model/families/, `{}` is the layer
index). A value is `our_key` or `our_key:part` for a slice of a fused weight (q|k|v, gate|up).
Linear weights are transposed to our (in, out) layout, except GPT-2's Conv1D weights, which
already are; a family's `fixes` reorder a tensor once (GPT-NeoX's per-head q|k|v).
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
from model.families import family

# The name tables live with their families (model/families/): checkpoint name → ours, `{}` the layer index.
# Embedding tables keep their (rows, C) layout; every other 2-D weight comes (out, in) and is transposed,
# except where a family says it is stored (in, out) already (GPT-2's Conv1D).
EMBEDDINGS = {"tok_emb.weight", "pos_emb.weight"}


def load_model(
    path: Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    skip: Callable[[str], bool] | None = None,
    out_in: bool = False,
) -> Decoder:
    """Build the decoder for a model directory and fill it with its weights, checked against the config.

    Weights `skip` names are checked but not read: they stay on the meta device, for the caller to
    replace (quantized layers built from a GGUF's own blocks, model/quant). With `out_in`, linear
    weights keep the checkpoint's (out, in) storage, seen through an (in, out) view: what oneDNN's
    packing reads (model/quant/packed.py) without a transposing copy."""
    path = Path(path)
    cfg = ModelConfig.from_dir(path)
    with torch.device("meta"):
        model = Decoder(cfg)
    expected = {k: tuple(p.shape) for k, p in model.state_dict().items()}
    files = checkpoint_files(path)
    plan = plan_loading(cfg, files, expected)
    if skip is not None:
        plan = {name: pieces for name, pieces in plan.items() if not skip(name)}
    state = read_weights(plan, expected, cfg, dtype, device, out_in)
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
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise AttnError(f"{index}: not a valid safetensors index (weight_map must map tensor names to file names)")
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


def _table_regex(table: dict) -> list[tuple[re.Pattern, object]]:
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
    fam = family(cfg.model_type)
    table = dict(fam.weights)
    if cfg.tie_embeddings:
        # One matrix serves both ends; it is stored in the head's (C, V) layout.
        table[fam.embedding] = "lm_head.weight"
        del table[fam.head]
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
    """For each of our tensors, the checkpoint pieces that fill it: [(ckpt_key, file, part, transpose, fix)]."""
    fam = family(cfg.model_type)
    table = name_table(cfg)
    patterns = _table_regex(table)
    fixes = _table_regex(fam.fixes)
    headers: dict[Path, dict] = {}
    plan: dict[str, list] = {}
    for raw_key, f in files.items():
        key = raw_key.removeprefix(fam.prefix) if fam.prefix else raw_key
        if (fam.ignored and fam.ignored.search(key)) or (cfg.tie_embeddings and key == fam.head):
            continue  # a buffer, not a weight; or a tied head saved twice (the same matrix)
        ours = _match(patterns, key)
        if ours is None:
            raise AttnError(f"{f}: unexpected tensor {raw_key} for model_type {cfg.model_type}")
        name, _, part = ours.partition(":")
        if name not in expected:
            raise AttnError(f"{f}: unexpected tensor {raw_key} (the config has no such layer, norm or bias)")
        if f not in headers:
            headers[f] = read_header(f)
        info = headers[f].get(raw_key)
        if info is None:
            raise AttnError(f"{f}: tensor {raw_key} is listed in the index but not in the file")
        not_transposed = fam.not_transposed is not None and fam.not_transposed.search(key)
        transpose = len(info["shape"]) == 2 and not not_transposed and name not in EMBEDDINGS
        want = _piece_shape(expected[name], part, cfg)
        got = tuple(info["shape"][::-1]) if transpose else tuple(info["shape"])
        if got != want:
            shown = tuple(info["shape"])
            need = want[::-1] if transpose else want
            raise AttnError(
                f"{f}: tensor {raw_key} has shape {list(shown)}, expected {list(need)} from config.json{_shape_hint(name, part, cfg)}"
            )
        plan.setdefault(name, []).append((raw_key, f, part, transpose, _match_fix(fixes, key)))
    parts_needed: dict[str, list[str]] = {}  # our generic name → the parts the table fills it from ("" = whole)
    for ours in table.values():
        generic, _, part = ours.partition(":")
        parts_needed.setdefault(generic, []).append(part)
    for name in expected:
        have = {p for _, _, p, _, _ in plan.get(name, [])}
        missing = [p for p in parts_needed.get(_generic(name), [""]) if p not in have]
        if missing:
            ckpt = _ckpt_name(table, name, missing[0])
            raise AttnError(f"missing tensor {ckpt} in the checkpoint ({', '.join(sorted({str(p) for p in files.values()}))})")
    return plan


def _shape_hint(name: str, part: str, cfg: ModelConfig) -> str:
    """Which config.json fields set the expected shape, for the few tensors whose shape mixes several."""
    H, G, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = f"num_attention_heads {H} × head_dim {D} = {H * D}"
    kv = f"num_key_value_heads {G} × head_dim {D} = {G * D}"
    if part == "q" or name.endswith("attn.o.weight") or (name.endswith("q_norm.weight") and cfg.qk_norm == "flat"):
        return f" ({q})"
    if part in ("k", "v") or (name.endswith("k_norm.weight") and cfg.qk_norm == "flat"):
        return f" ({kv})"
    if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
        return f" ({q}, plus 2 × {kv})"
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        return f" (head_dim {D})"
    return ""


def _generic(name: str) -> str:
    """Our tensor name with the layer index as `{}`, as the tables write it."""
    return re.sub(r"layers\.\d+\.", "layers.{}.", name)


def _piece_shape(full: tuple, part: str, cfg: ModelConfig) -> tuple:
    if not part:
        return full
    n = part_sizes(cfg)[part]
    return (full[0], n) if len(full) == 2 else (n,)


def _match_fix(fixes: list[tuple[re.Pattern, object]], key: str):
    return next((fix for rx, fix in fixes if rx.match(key)), None)


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


def read_weights(
    plan: dict[str, list], expected: dict[str, tuple], cfg: ModelConfig, dtype: torch.dtype, device, out_in: bool = False
) -> dict[str, torch.Tensor]:
    """Fill each of our tensors from its pieces, converting to `dtype` once, one source tensor at a time;
    with `out_in`, transposed weights as (in, out) views of (out, in) storage (load_model)."""

    def empty(name: str) -> torch.Tensor:
        if out_in and all(transpose for _, _, _, transpose, _ in plan[name]):
            return torch.empty(expected[name][::-1], dtype=dtype, device=device).t()
        return torch.empty(expected[name], dtype=dtype, device=device)

    state = {name: empty(name) for name in plan}
    by_file: dict[Path, list] = {}
    for name, pieces in plan.items():
        for raw_key, f, part, transpose, fix in pieces:
            by_file.setdefault(f, []).append((name, raw_key, part, transpose, fix))
    offsets = part_offsets(cfg)
    for f, items in by_file.items():
        with safe_open(f, framework="pt", device="cpu", backend="pread") as fh:
            for name, raw_key, part, transpose, fix in items:
                src = fh.get_tensor(raw_key)
                if fix is not None:
                    src = fix(src, cfg)
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
