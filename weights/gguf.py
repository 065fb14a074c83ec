"""GGUF → a Hugging Face model directory (config.json, safetensors, tokenizer.json, …).

A GGUF file is llama.cpp's single-file checkpoint: metadata (shape, RoPE, tokenizer, chat
template) under llama.cpp's key names, and tensors under llama.cpp's names, often quantized.
We dequantize every tensor with the `gguf` package, rename it with its family's table (the GGUF
name tables live with the families: `model.families.GGUF_ARCHITECTURES`), undo the row permutation
llama.cpp applies to Llama's Q and K projections, turn Llama 3.1/3.2's `rope_freqs` back into
config.json's RoPE scaling, and rebuild the config and a `tokenizers` tokenizer from the metadata:
byte-level BPE, or SentencePiece's BPE (Llama 2, TinyLlama, Mistral v0.1) with byte fallback.
References: llama.cpp `convert_hf_to_gguf.py` (what was done to the weights), `src/llama-vocab.cpp`
(pre-tokenizer regexes), and transformers' `integrations/gguf` (the same conversion, used as the
test reference).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from model.errors import AttnError
from model.families import GGUF_ARCHITECTURES
from model.loading import DTYPES
from model.tokenizer import bytes_to_unicode

Progress = Callable[[str, int, "int | None"], None]


# llama.cpp permutes these rows (per head: interleaved RoPE pairs instead of HF's two halves) for
# the architectures whose GgufArch says `permuted_qk` (`llama`).
PERMUTED_Q = "blk.{}.attn_q.weight"
PERMUTED_K = "blk.{}.attn_k.weight"

# Llama 3.1/3.2's RoPE scaling, stored by llama.cpp as per-frequency divisors (not a weight).
ROPE_FREQS = "rope_freqs.weight"

# Pre-tokenizer split regexes by `tokenizer.ggml.pre`, as llama.cpp's llama-vocab.cpp lists
# them. None means the GPT-2 regex built into tokenizers' ByteLevel pre-tokenizer.
_GPT2_SPLIT = None
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# SmolLM (StarCoder's tokenizer) isolates every digit first, then applies the GPT-2 regex.
PRE_TOKENIZERS: dict[str, list[str | None]] = {
    "default": [_GPT2_SPLIT],
    "gpt2": [_GPT2_SPLIT],
    "smollm": [r"\p{N}", _GPT2_SPLIT],
    "starcoder": [r"\p{N}", _GPT2_SPLIT],
    "llama-bpe": [_LLAMA3_SPLIT],
    "llama3": [_LLAMA3_SPLIT],
    "smaug-bpe": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT],
    "deepseek-r1-qwen": [_QWEN2_SPLIT],
}
# llama.cpp looks a whole pre-token up in the vocabulary before merging for these.
_IGNORE_MERGES = {"llama-bpe", "llama3", "smaug-bpe"}

# llama.cpp token types (llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# A model directory made from a GGUF keeps the file itself under this name: `--quantize int4` reads its
# 4-bit blocks as they are, and `attn bench --compare llama.cpp` runs llama.cpp on it.
SOURCE_GGUF = "model.gguf"
BLOCKS_FILE = "gguf-blocks.safetensors"

# Shards are planned from tensor sizes so that at most one shard is in memory at a time.
MAX_SHARD_BYTES = 2 * 1024**3


def convert_gguf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: str = "float32",
    progress: Progress | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Convert a GGUF file to a Hugging Face model directory at out_dir, atomically."""
    import gguf

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in DTYPES:
        raise AttnError(f"unsupported dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if not gguf_path.is_file():
        raise AttnError(f"no such GGUF file: {gguf_path}")
    if out_dir.exists() and not out_dir.is_dir():
        raise AttnError(f"{out_dir} is a file, not a folder to write the model into")
    if out_dir.exists() and not overwrite and any(out_dir.iterdir()):
        raise AttnError(f"{out_dir} already exists and is not empty")
    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as e:  # the gguf package raises ValueError/struct errors on bad files
        raise AttnError(f"{gguf_path} is not a readable GGUF file: {e}") from None

    meta = _Metadata(reader)
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise AttnError("GGUF file lacks tensor 'token_embd.weight'")
    config = build_config(meta, [t.name for t in reader.tensors], dtype, int(embedding.shape[-1]))
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if freqs is not None:
        config["rope_scaling"] = llama3_scaling(dequantize_tensor(freqs), config)
    tokenizer_json, tokenizer_config = build_tokenizer(meta, config)
    plan = _plan(reader, config)

    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        # A sibling temp dir keeps the final rename on one filesystem, so it is atomic.
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    except (FileExistsError, NotADirectoryError):  # a file where a folder on the way should be
        raise AttnError(f"could not write {out_dir}: a part of its path is a file, not a folder") from None
    except OSError as e:
        raise AttnError(f"could not write {out_dir}: {e.strerror or e}") from None
    try:
        _write_weights(reader, plan, tmp, dtype, progress)
        _write_json(tmp / "config.json", config)
        (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        _write_json(tmp / "generation_config.json", build_generation_config(meta, config))
        _keep_source(gguf_path, tmp / SOURCE_GGUF)
        _write_blocks(plan, tmp / BLOCKS_FILE)
        _replace_dir(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise AttnError(f"could not write {out_dir}: {e.strerror or e}") from e
        raise
    return out_dir


# ---------------------------------------------------------------------------------------------
# metadata and config


class _Metadata:
    """GGUF key/value metadata as plain Python values, read lazily (token arrays are large)."""

    def __init__(self, reader: Any) -> None:
        self._fields = reader.fields
        self._cache: dict[str, Any] = {}
        arch = self.get("general.architecture")
        self.arch: str = arch if isinstance(arch, str) else ""

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self._cache:
            field = self._fields.get(key)
            self._cache[key] = default if field is None else field.contents()
        value = self._cache[key]
        return default if value is None else value

    def arch_key(self, key: str, default: Any = None) -> Any:
        return self.get(f"{self.arch}.{key}", default)

    def require(self, key: str) -> Any:
        value = self.arch_key(key)
        if value is None:
            raise AttnError(f"GGUF metadata lacks {self.arch}.{key}")
        return value


def build_config(meta: _Metadata, tensor_names: list[str], dtype: str, embedding_rows: int) -> dict[str, Any]:
    """A transformers-style config.json dict from GGUF metadata."""
    family = GGUF_ARCHITECTURES.get(meta.arch)
    if family is None:
        raise AttnError(
            f"unsupported GGUF architecture {meta.arch or '(none)'!r}: attn converts {', '.join(GGUF_ARCHITECTURES)}"
        )
    hidden = int(meta.require("embedding_length"))
    heads = int(meta.require("attention.head_count"))
    kv_heads = int(meta.arch_key("attention.head_count_kv", heads))
    head_dim = int(meta.arch_key("attention.key_length", hidden // heads))
    rope_dim = int(meta.arch_key("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise AttnError(f"unsupported GGUF: partial rotary embedding ({rope_dim} of {head_dim} dims)")
    # The embedding's row count is the vocabulary size the weights were trained with.
    embed = embedding_rows

    config: dict[str, Any] = {
        "architectures": [family.hf_class],
        "model_type": family.model_type,
        "hidden_size": hidden,
        "intermediate_size": int(meta.require("feed_forward_length")),
        "num_hidden_layers": int(meta.require("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(meta.arch_key("attention.layer_norm_rms_epsilon", 1e-5)),
        # llama.cpp's default when the file says nothing
        "rope_theta": float(meta.arch_key("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta),
        "max_position_embeddings": int(meta.arch_key("context_length", 2048)),
        "vocab_size": int(embed),
        # llama.cpp writes output.weight only when the head is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": any(n.endswith("attn_q.bias") for n in tensor_names),
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": dtype,
    }
    if family.model_type == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=config["num_hidden_layers"])
    return config


def _rope_scaling(meta: _Metadata) -> dict[str, Any] | None:
    kind = meta.arch_key("rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = meta.arch_key("rope.scaling.factor")
    if kind == "linear" and factor:
        return {"rope_type": "linear", "factor": float(factor)}
    raise AttnError(f"unsupported GGUF RoPE scaling {kind!r}")


def llama3_scaling(factors: np.ndarray, config: dict[str, Any]) -> dict[str, Any] | None:
    """config.json's Llama 3 rope_scaling from llama.cpp's `rope_freqs` (one divisor per frequency).

    llama.cpp computes the divisors at conversion (convert_hf_to_gguf.py, LlamaModel): 1 for
    wavelengths below original/high_freq_factor, `factor` above original/low_freq_factor, and
    1 / ((1 − s)/factor + s), s = (original/wavelength − low)/(high − low), between. Only
    original/(high − low) and low/(high − low) show in the divisors, so low is taken as 1 (every
    Llama 3 file's value) and the rest is solved for; Llama 3.1/3.2's own values are tried first.
    Whatever is chosen must give back every divisor, or the file is refused.
    """
    f = np.asarray(factors, dtype=np.float64).reshape(-1)
    dim, theta = config["head_dim"], config["rope_theta"]
    if f.shape[0] != dim // 2:
        raise AttnError(f"GGUF {ROPE_FREQS} has {f.shape[0]} entries; head_dim {dim} needs {dim // 2}")
    if config["rope_scaling"] is not None:
        raise AttnError(f"GGUF file has both {ROPE_FREQS} and rope.scaling.type metadata: unsupported")
    if np.allclose(f, 1.0):
        return None
    factor = float(f.max())
    wavelen = 2 * math.pi * theta ** (np.arange(0, dim, 2) / dim)
    candidates = [(4.0, 8192)]  # (high_freq_factor, original context) of Llama 3.1 and 3.2, with low = 1
    s = (1 / f - 1 / factor) / (1 - 1 / factor)  # 0 for the divided frequencies, 1 for the kept ones
    blend = (s > 1e-6) & (s < 1 - 1e-6)
    if blend.sum() >= 2:  # s = A/wavelength − B, A = original/(high − 1), B = 1/(high − 1)
        A, B = np.linalg.lstsq(np.stack([1 / wavelen[blend], -np.ones(int(blend.sum()))], 1), s[blend], rcond=None)[0]
        if B > 0:
            candidates.append((1 + 1 / B, round(A / B)))
    elif blend.sum() == 1:
        i = int(np.flatnonzero(blend)[0])
        candidates.append((4.0, round(wavelen[i] * (1 + 3 * s[i]))))
    else:  # no blended frequency: any original context between the kept and the divided wavelengths does
        kept, divided = wavelen[f < 1 + 1e-6], wavelen[f > factor - 1e-6]
        low, high = 4 * kept.max() if kept.size else 0.0, divided.min() if divided.size else 4 * kept.max() + 8
        candidates.append((4.0, max(math.ceil(high) - 1, math.floor(low) + 1)))  # an integer in (low, high)
    for hi, old in candidates:
        want = np.where(wavelen < old / hi, 1.0, np.where(wavelen > old, factor, 0.0))
        blended = (want == 0.0)
        smooth = (old / wavelen - 1.0) / (hi - 1.0)
        want[blended] = 1 / ((1 - smooth[blended]) / factor + smooth[blended])
        if np.allclose(want, f, rtol=1e-5, atol=0):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": float(hi),
                    "original_max_position_embeddings": int(old)}
    raise AttnError(f"GGUF {ROPE_FREQS}: these RoPE divisors are not Llama 3's scaling; unsupported")


def build_generation_config(meta: _Metadata, config: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json: the special ids, plus sampling defaults when the file states them."""
    gen: dict[str, Any] = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
    for gguf_key, hf_key in (("general.sampling.temp", "temperature"), ("general.sampling.top_k", "top_k"),
                             ("general.sampling.top_p", "top_p"), ("general.sampling.min_p", "min_p")):
        value = meta.get(gguf_key)
        if value is not None:
            gen[hf_key] = value
    if gen.get("temperature"):
        gen["do_sample"] = True
    return gen


# ---------------------------------------------------------------------------------------------
# tokenizer


def build_tokenizer(meta: _Metadata, config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(tokenizer.json text, tokenizer_config.json dict) from the GGUF tokenizer metadata."""
    from tokenizers import AddedToken, processors

    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    types = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    if kind == "gpt2":
        tok = _byte_level_bpe(meta, tokens, types)
        add_bos_default = False
    elif kind == "llama":
        tok = _sentencepiece_bpe(meta, tokens, types)
        add_bos_default = True  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
    else:
        raise AttnError(f"unsupported GGUF tokenizer {kind!r}: attn converts byte-level BPE ('gpt2') and SentencePiece ('llama') tokenizers")
    # Control tokens (<|im_end|>) are matched whole and skipped when decoding; user-defined
    # ones (<think>) are matched whole but printed.
    special = (_CONTROL, _UNKNOWN) if kind == "llama" else (_CONTROL,)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    def name(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = name("bos_token_id"), name("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        a = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        b = ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
        specials = {t: tokens.index(t) for t in (bos if add_bos else None, eos if add_eos else None) if t}
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(a), pair=" ".join(a + b), special_tokens=list(specials.items())
        )

    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": name("unknown_token_id"),
        "pad_token": name("padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        tokenizer_config["chat_template"] = template
    return tok.to_str(), tokenizer_config


def _byte_level_bpe(meta: _Metadata, tokens: list[str], types: list[int]) -> Any:
    """GPT-2-style BPE over bytes (SmolLM, Llama 3, Qwen2): tokens, merges and llama.cpp's split regexes."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    pre = meta.get("tokenizer.ggml.pre") or "default"
    if pre not in PRE_TOKENIZERS:
        raise AttnError(f"unsupported GGUF pre-tokenizer {pre!r}: attn knows {', '.join(sorted(PRE_TOKENIZERS))}")
    merges: list[str] = list(meta.get("tokenizer.ggml.merges") or [])
    if not tokens or not merges:
        raise AttnError("GGUF metadata lacks the tokenizer's tokens or merges")
    alphabet = set(bytes_to_unicode().values())
    spell = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        # Normal tokens are stored in the byte alphabet; a few converters wrote raw text instead.
        if ty == _NORMAL and not set(tok) <= alphabet:
            tok = "".join(spell[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]

    tok = Tokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=False, ignore_merges=pre in _IGNORE_MERGES))
    steps: list[Any] = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre] if r]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=PRE_TOKENIZERS[pre][-1] is None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(meta: _Metadata, tokens: list[str], types: list[int]) -> Any:
    """SentencePiece's BPE (Llama 2, TinyLlama, Mistral v0.1) as a `tokenizers` BPE, built as transformers'
    LlamaTokenizer builds it from a GGUF: pieces with ▁ for spaces, <0xNN> byte tokens to fall back on, a
    ▁ prepended to the text, and merges recovered from the pieces' scores (SentencePiece merges the pair
    whose result scores highest; the file has the scores, not the merges)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    scores = list(meta.get("tokenizer.ggml.scores") or [])
    if not tokens or len(scores) != len(tokens):
        raise AttnError("GGUF metadata lacks the SentencePiece tokens or their scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab=vocab, merges=_merges_from_scores(vocab, dict(zip(tokens, scores))), fuse_unk=True, byte_fallback=True))
    # llama.cpp's add_space_prefix (default on): a ▁ before the text, and the first one dropped when decoding.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return tok


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces of the vocabulary, best-scoring result first (ties: shorter
    left part, then lower ids), as transformers' `generate_merges` orders them."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


# ---------------------------------------------------------------------------------------------
# tensors


def _name_pattern(gguf_name: str) -> tuple[str, int | None]:
    """('blk.{}.attn_q.weight', 3) for 'blk.3.attn_q.weight'."""
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    return (f"blk.{{}}.{m.group(2)}", int(m.group(1))) if m else (gguf_name, None)


def _plan(reader: Any, config: dict[str, Any]) -> list[tuple[Any, str, int | None]]:
    """(gguf tensor, HF name, heads to un-permute with or None) per tensor; unknown names are errors."""
    arch = next(a for a in GGUF_ARCHITECTURES.values() if a.model_type == config["model_type"])
    permuted, table = arch.permuted_qk, arch.tensors
    layers = config["num_hidden_layers"]
    plan, seen = [], set()
    for t in reader.tensors:
        if t.name == ROPE_FREQS:  # read into config.json's rope_scaling (llama3_scaling)
            continue
        pattern, layer = _name_pattern(t.name)
        hf = table.get(pattern)
        if hf is None or (layer is not None and layer >= layers):
            raise AttnError(f"unsupported tensor {t.name!r} in GGUF file")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        want = _expected_shape(pattern, config)
        if shape != want:
            raise AttnError(f"tensor {t.name!r} has shape {list(shape)}, the metadata implies {list(want)}")
        heads = None
        if permuted and pattern == PERMUTED_Q:
            heads = config["num_attention_heads"]
        elif permuted and pattern == PERMUTED_K:
            heads = config["num_key_value_heads"]
        plan.append((t, hf.format(layer), heads))
        seen.add(hf.format(layer))
    required = ["model.embed_tokens.weight", "model.norm.weight"] + [
        table[p].format(i)
        for i in range(layers)
        for p in table
        if p.startswith("blk.") and p.endswith(".weight")
    ]
    missing = [n for n in required if n not in seen]
    if missing:
        raise AttnError(f"GGUF file lacks tensor {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return plan


def _expected_shape(pattern: str, c: dict[str, Any]) -> tuple[int, ...]:
    """The HF (row-major) shape a tensor must have under this config."""
    C, F, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    return {
        "token_embd.weight": (V, C),
        "output.weight": (V, C),
        "output_norm.weight": (C,),
        "blk.{}.attn_norm.weight": (C,),
        "blk.{}.ffn_norm.weight": (C,),
        "blk.{}.attn_q.weight": (q, C),
        "blk.{}.attn_k.weight": (kv, C),
        "blk.{}.attn_v.weight": (kv, C),
        "blk.{}.attn_q.bias": (q,),
        "blk.{}.attn_k.bias": (kv,),
        "blk.{}.attn_v.bias": (kv,),
        "blk.{}.attn_output.weight": (C, q),
        "blk.{}.ffn_gate.weight": (F, C),
        "blk.{}.ffn_up.weight": (F, C),
        "blk.{}.ffn_down.weight": (C, F),
    }[pattern]


# GGUF block types whose codes `--quantize int4` keeps as they are (model/quant/blocks.py), written
# beside the converted weights in BLOCKS_FILE.
BLOCK_KINDS = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q8_0": "q8_0"}
_BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}  # float16 d (and m), then the codes of 32 weights


def blocks_file(model_dir: str | os.PathLike[str]) -> Path | None:
    """The model's GGUF blocks file, written from its source GGUF on first use (atomically); None when the
    model has no source GGUF or it holds no Q4_0/Q4_1/Q8_0 tensor."""
    model_dir = Path(model_dir)
    out = model_dir / BLOCKS_FILE
    if out.is_file():
        return out
    source = model_dir / SOURCE_GGUF
    if not source.is_file():
        return None
    import gguf

    try:
        reader = gguf.GGUFReader(source)
    except Exception as e:  # the gguf package raises ValueError/struct errors on bad files
        raise AttnError(f"{source} is not a readable GGUF file: {e}") from None
    meta = _Metadata(reader)
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise AttnError("GGUF file lacks tensor 'token_embd.weight'")
    config = build_config(meta, [t.name for t in reader.tensors], "float32", int(embedding.shape[-1]))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if not _write_blocks(_plan(reader, config), tmp):
            return None
        os.replace(tmp, out)
    except OSError as e:
        raise AttnError(f"could not write {out}: {e.strerror or e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _write_blocks(plan: list[tuple[Any, str, int | None]], path: Path) -> bool:
    """The plan's Q4_0, Q4_1 and Q8_0 tensors as blocks by Hugging Face name, rows in HF order (llama.cpp's
    Q/K permutation undone), codes and float16 scales exactly as stored; False when there are none."""
    import torch

    from model.quant.blocks import save_blocks

    blocks = {}
    for t, hf_name, heads in plan:
        kind = BLOCK_KINDS.get(t.tensor_type.name)
        if kind is None:
            continue
        b = _parse_blocks(np.asarray(t.data), kind)
        if heads is not None:
            b = b.rows(torch.from_numpy(unpermute_qk(np.arange(b.codes.shape[0]), heads).copy()))
        blocks[hf_name] = b
    if blocks:
        save_blocks(blocks, path)
    return bool(blocks)


def _parse_blocks(data: np.ndarray, kind: str) -> Any:
    """(N, row bytes) uint8 of one tensor → Blocks: d (and m) float16 per block, codes per weight."""
    import torch

    from model.quant.blocks import Blocks

    n = _BLOCK_BYTES[kind]
    raw = data.reshape(data.shape[0], -1, n)  # (N, K/32, bytes)
    d = raw[..., 0:2].copy().view(np.float16)[..., 0]
    if kind == "q8_0":
        codes = raw[..., 2:].copy().view(np.int8).reshape(raw.shape[0], -1)
        return Blocks(kind, torch.from_numpy(codes), torch.from_numpy(d))
    start = 4 if kind == "q4_1" else 2
    qs = raw[..., start:]  # (N, K/32, 16): weight j in the low nibble of byte j, weight j+16 in the high one
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(raw.shape[0], -1)
    m = torch.from_numpy(raw[..., 2:4].copy().view(np.float16)[..., 0]) if kind == "q4_1" else None
    return Blocks(kind, torch.from_numpy(codes), torch.from_numpy(d), m)


def dequantize_tensor(t: Any) -> np.ndarray:
    """A GGUF reader tensor as a float32 array in numpy (row-major, HF) shape."""
    from gguf import quants

    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists ne0 (the fastest axis) first
    try:
        values = quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise AttnError(f"tensor {t.name!r}: the gguf package cannot dequantize {t.tensor_type.name}") from None
    values = np.asarray(values, dtype=np.float32).reshape(shape)
    # The reader memory-maps the file read-only; torch wants a writable array it may own.
    return values if values.flags.writeable and values.flags.owndata else values.copy()


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: per head, rows (D/2, 2) interleaved → (2, D/2) halves."""
    rows = w.shape[0]
    # (heads, D/2, 2, ...) → (heads, 2, D/2, ...): the inverse of convert_hf_to_gguf.py's permute
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _nbytes(t: Any, dtype: str) -> int:
    return math.prod(int(d) for d in t.shape.tolist()) * DTYPES[dtype].itemsize


def _write_weights(reader: Any, plan: list[tuple[Any, str, int | None]], out: Path, dtype: str, progress: Progress | None) -> None:
    import torch

    shards: list[list[tuple[Any, str, int | None]]] = [[]]
    size = 0
    for item in plan:
        n = _nbytes(item[0], dtype)
        if shards[-1] and size + n > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    torch_dtype = DTYPES[dtype]
    done, total = 0, len(plan)
    weight_map: dict[str, str] = {}
    for shard, filename in zip(shards, names):
        tensors: dict[str, Any] = {}
        for t, hf_name, heads in shard:
            values = dequantize_tensor(t)
            if heads is not None:
                values = unpermute_qk(values, heads)
            tensors[hf_name] = torch.from_numpy(np.ascontiguousarray(values)).to(torch_dtype)
            weight_map[hf_name] = filename
            done += 1
            if progress:
                progress(f"converting to {dtype} safetensors", done, total)
        _write_shard(tensors, out / filename)
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(t, dtype) for t, _, _ in plan)}, "weight_map": weight_map}
        _write_json(out / "model.safetensors.index.json", index)


def _keep_source(src: Path, dest: Path) -> None:
    """The GGUF beside the converted weights: a hard link where the filesystem allows (no second copy), else a copy."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def _write_shard(tensors: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _replace_dir(new: Path, dest: Path) -> None:
    """Move new into dest; an existing dest is swapped out first and removed afterwards."""
    # mkdtemp and safetensors create owner-only files; a model dir gets the user's usual modes.
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(new, 0o777 & ~mask)
    for f in new.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{dest.name}-", dir=dest.parent))
        os.replace(dest, old / dest.name)
        try:
            os.replace(new, dest)
        except BaseException:
            os.replace(old / dest.name, dest)  # put the previous model back
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, dest)
