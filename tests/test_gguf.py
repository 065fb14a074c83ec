"""GGUF → safetensors conversion: dequantized values, Q/K un-permutation, config and tokenizer round trips.

Small GGUF files are written here with `gguf.GGUFWriter`, the way llama.cpp's convert_hf_to_gguf.py
would write them (its Q/K row permutation included); the references are the `gguf` package's own
dequantization and transformers running the original model. The real default model is compared
with transformers' own GGUF loader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file

from model.errors import AttnError
from tests.realmodel import real_gguf_path, real_model_dir  # noqa: F401
from weights.gguf import convert_gguf

# HF name → llama.cpp name, written out independently of weights/gguf.py's table.
HF_TO_LLAMA_CPP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.input_layernorm.weight": "blk.{}.attn_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "blk.{}.ffn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "blk.{}.attn_q.weight",
    "model.layers.{}.self_attn.k_proj.weight": "blk.{}.attn_k.weight",
    "model.layers.{}.self_attn.v_proj.weight": "blk.{}.attn_v.weight",
    "model.layers.{}.self_attn.q_proj.bias": "blk.{}.attn_q.bias",
    "model.layers.{}.self_attn.k_proj.bias": "blk.{}.attn_k.bias",
    "model.layers.{}.self_attn.v_proj.bias": "blk.{}.attn_v.bias",
    "model.layers.{}.self_attn.o_proj.weight": "blk.{}.attn_output.weight",
    "model.layers.{}.mlp.gate_proj.weight": "blk.{}.ffn_gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "blk.{}.ffn_up.weight",
    "model.layers.{}.mlp.down_proj.weight": "blk.{}.ffn_down.weight",
}

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<think>"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
CORPUS = [
    "a fluffy blue creature roamed the verdant forest",
    "The quick brown fox jumps over the lazy dog. It's 12345 o'clock, isn't it? I'M SURE they'll WIN.",
    "def main():\n    print('hello, world')  # 3.14159\n    return 0\n",
    "Café naïve résumé — façade, jalapeño, über. 2024-01-31 10:45",
    "我们今天去公园散步，天气很好。你好世界！",
    "Emoji: 😀🎉🚀👍🏽 and ✨ sparkles ✨",
    "Spaces:    four, tabs:\t\t, newlines:\n\n\nend.\r\n",
]
PROBES = CORPUS + [
    "Hello, world!",
    "   leading and trailing   ",
    "\n\n\n",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<think>hmm</think> 987654321",
    "unseen words: xylophone quizzically 🦜",
    "",
]


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF halves → interleaved pairs (rows)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    parts = hf.split(".")
    if hf.startswith("model.layers."):
        return HF_TO_LLAMA_CPP[".".join(parts[:2] + ["{}"] + parts[3:])].format(parts[2])
    return HF_TO_LLAMA_CPP[hf]


# --- tiny tokenizer ------------------------------------------------------------------------


def pre_tokenizer(pre: str) -> Any:
    """The pre-tokenizer each family's own tokenizer.json uses (not weights/gguf.py's regexes)."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre == "smollm":  # SmolLM's (StarCoder's) tokenizer.json
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    # (transformers 5.17, on the GPU machine's image, lacks this table: the gpt2 and smollm tokenizers above need none)
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    split = pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS[pre]), behavior="isolated")
    return pre_tokenizers.Sequence([split, byte_level])


def train_tokenizer(pre: str, vocab_size: int = 420) -> Any:
    """A byte-level BPE trained on the corpus, with control and user-defined added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    tk.pre_tokenizer = pre_tokenizer(pre)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(CORPUS * 3, trainer)
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in USER_DEFINED])
    return tk


def tokenizer_metadata(tk: Any, pre: str) -> dict[str, Any]:
    """What llama.cpp writes for a byte-level BPE: tokens by id, token types, merges 'a b'."""
    vocab = tk.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = json.loads(tk.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    types = [3 if t in SPECIALS else 4 if t in USER_DEFINED else 1 for t in tokens]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": vocab["<|im_start|>"],
        "tokenizer.ggml.eos_token_id": vocab["<|im_end|>"],
        "tokenizer.ggml.padding_token_id": vocab["<|endoftext|>"],
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return train_tokenizer("gpt2")


# --- writing GGUF files ------------------------------------------------------------------


def write_gguf(path: Path, arch: str, meta: dict[str, Any], tensors: list[tuple[str, np.ndarray, Q]]) -> Path:
    """A GGUF file: metadata with llama.cpp's key types, tensors as given (quantized ones as bytes)."""
    V = gguf.GGUFValueType
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        if key.endswith("token_type"):
            w.add_key_value(key, value, V.ARRAY, sub_type=V.INT32)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    for name, data, qtype in tensors:
        if qtype == Q.F32:
            w.add_tensor(name, data.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def model_metadata(arch: str, cfg: Any, tokenizer: Any, pre: str = "gpt2") -> dict[str, Any]:
    meta = {
        "general.name": f"tiny-{arch}",
        f"{arch}.block_count": cfg.num_hidden_layers,
        f"{arch}.context_length": cfg.max_position_embeddings,
        f"{arch}.embedding_length": cfg.hidden_size,
        f"{arch}.feed_forward_length": cfg.intermediate_size,
        f"{arch}.attention.head_count": cfg.num_attention_heads,
        f"{arch}.attention.head_count_kv": cfg.num_key_value_heads,
        f"{arch}.rope.freq_base": float(cfg.rope_parameters["rope_theta"]),
        f"{arch}.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        f"{arch}.vocab_size": cfg.vocab_size,
        f"{arch}.rope.dimension_count": cfg.hidden_size // cfg.num_attention_heads,
    }
    return meta | (tokenizer_metadata(tokenizer, pre) if pre else {})


def hf_to_gguf_tensors(arch: str, state: dict[str, np.ndarray], cfg: Any, qtype: Q = Q.F32) -> list[tuple[str, np.ndarray, Q]]:
    """HF tensors renamed, Q/K permuted as llama.cpp does for `llama`, 2-D ones in qtype."""
    out = []
    for hf, w in state.items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if arch == "llama" and hf.endswith("q_proj.weight"):
            w = permute(w, cfg.num_attention_heads)
        elif arch == "llama" and hf.endswith("k_proj.weight"):
            w = permute(w, cfg.num_key_value_heads)
        t = qtype if w.ndim == 2 else Q.F32  # llama.cpp keeps norms and biases in F32
        out.append((gguf_name(hf), w if t in (Q.F32, Q.F16) else gguf.quants.quantize(w, t), t))
    return out


def tiny_hf_model(arch: str, tokenizer: Any, tie: bool = True, hidden: int = 64, inter: int = 128) -> Any:
    import transformers

    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    cfg = config_cls(
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie, initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # norms away from 1 so their mapping matters
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.2)
    return model


# --- dequantization ------------------------------------------------------------------------

QUANTIZABLE = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
# gguf.quants cannot quantize these; random blocks stand in, as any bytes are a valid block.
DEQUANT_ONLY = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS]


def random_blocks(rows: int, cols: int, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block * size), dtype=np.uint8)
    # Clear bit 6 of every byte so no float16 scale inside a block is inf or NaN.
    return raw & np.uint8(0xBF)


@pytest.mark.parametrize("qtype", QUANTIZABLE + DEQUANT_ONLY, ids=lambda q: q.name)
def test_dequantized_values_equal_gguf_dequantize(tmp_path: Path, tokenizer: Any, qtype: Q) -> None:
    # 256 wide: a K-quant super-block. Rows are whole blocks, so permuting quantized rows is
    # the same as quantizing permuted rows: expected values need no permutation logic.
    model = tiny_hf_model("llama", tokenizer, tie=False, hidden=256, inter=256)
    cfg, rng = model.config, np.random.default_rng(int(qtype))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    expected: dict[str, np.ndarray] = {}
    tensors = []
    for hf, w in state.items():
        if w.ndim == 1:
            stored, t = w, Q.F32
        elif qtype in (Q.F32, Q.F16):
            stored, t = w.astype(np.float32 if qtype == Q.F32 else np.float16), qtype
        else:
            stored = gguf.quants.quantize(w, qtype) if qtype in QUANTIZABLE else random_blocks(*w.shape, qtype, rng)
            t = qtype
        expected[hf] = gguf.quants.dequantize(stored, t).reshape(w.shape).astype(np.float32)
        if hf.endswith("q_proj.weight"):
            stored = permute(stored, cfg.num_attention_heads)
        elif hf.endswith("k_proj.weight"):
            stored = permute(stored, cfg.num_key_value_heads)
        tensors.append((gguf_name(hf), stored, t))
    path = write_gguf(tmp_path / "m.gguf", "llama", model_metadata("llama", cfg, tokenizer), tensors)

    out = convert_gguf(path, tmp_path / "out")
    got = load_file(out / "model.safetensors")
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    assert np.isfinite(np.stack([np.abs(v).max() for v in got.values()])).all()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_output_dtype(tmp_path: Path, tokenizer: Any, dtype: str) -> None:
    model = tiny_hf_model("llama", tokenizer)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    path = write_gguf(tmp_path / "m.gguf", "llama", model_metadata("llama", model.config, tokenizer),
                      hf_to_gguf_tensors("llama", state, model.config))
    out = convert_gguf(path, tmp_path / "out", dtype=dtype)
    from safetensors.torch import load_file as load_torch

    got = load_torch(out / "model.safetensors")
    for name, t in got.items():
        assert t.dtype == getattr(torch, dtype)
        torch.testing.assert_close(t, model.state_dict()[name].to(t.dtype), rtol=0, atol=0)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype


# --- Q/K permutation, against transformers running the original --------------------------


@pytest.mark.parametrize("arch,tie", [("llama", True), ("llama", False), ("qwen2", True)])
def test_converted_model_equals_original(tmp_path: Path, tokenizer: Any, arch: str, tie: bool) -> None:
    import transformers

    model = tiny_hf_model(arch, tokenizer, tie=tie)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    meta = model_metadata(arch, model.config, tokenizer)
    path = write_gguf(tmp_path / "m.gguf", arch, meta, hf_to_gguf_tensors(arch, state, model.config))
    out = convert_gguf(path, tmp_path / "out")

    got = load_file(out / "model.safetensors")
    assert sorted(got) == sorted(k for k in state if not (tie and k == "lm_head.weight"))
    for name, w in got.items():
        np.testing.assert_array_equal(w, state[name], err_msg=name)

    converted = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.tensor([tokenizer.encode(CORPUS[0]).ids])
    with torch.no_grad():
        want = model(ids, output_attentions=True)
        have = converted(ids, output_attentions=True)
    torch.testing.assert_close(have.logits, want.logits, rtol=0, atol=0)
    for a, b in zip(have.attentions, want.attentions):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    if arch == "llama":  # control: had the rows stayed permuted, attention would differ
        wrong = {k: torch.from_numpy(permute(v, model.config.num_attention_heads)) if k.endswith("q_proj.weight") else model.state_dict()[k]
                 for k, v in state.items()}
        converted.load_state_dict(wrong)
        with torch.no_grad():
            scrambled = converted(ids, output_attentions=True).attentions[0]
        assert not torch.allclose(scrambled, want.attentions[0], atol=1e-3)


def test_config_round_trip(tmp_path: Path, tokenizer: Any) -> None:
    model = tiny_hf_model("llama", tokenizer, tie=False)
    cfg = model.config
    path = write_gguf(tmp_path / "m.gguf", "llama", model_metadata("llama", cfg, tokenizer),
                      hf_to_gguf_tensors("llama", {k: v.numpy() for k, v in model.state_dict().items()}, cfg))
    out = convert_gguf(path, tmp_path / "out")
    got = json.loads((out / "config.json").read_text())
    assert got["model_type"] == "llama" and got["architectures"] == ["LlamaForCausalLM"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "vocab_size", "tie_word_embeddings"):
        assert got[key] == getattr(cfg, key), key
    assert got["rope_theta"] == cfg.rope_parameters["rope_theta"]
    assert got["rms_norm_eps"] == pytest.approx(cfg.rms_norm_eps, rel=1e-6)  # stored as float32 in GGUF
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    assert (got["bos_token_id"], got["eos_token_id"]) == (vocab["<|im_start|>"], vocab["<|im_end|>"])
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == CHAT_TEMPLATE
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == vocab["<|im_end|>"]
    reloaded = __import__("transformers").AutoConfig.from_pretrained(out)
    assert reloaded.num_key_value_heads == cfg.num_key_value_heads


# --- tokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize("pre", ["gpt2", "smollm", "llama-bpe", "qwen2"])
def test_tokenizer_round_trip(tmp_path: Path, pre: str) -> None:
    from tokenizers import Tokenizer

    original = train_tokenizer(pre)
    model = tiny_hf_model("llama", original)
    path = write_gguf(tmp_path / "m.gguf", "llama", model_metadata("llama", model.config, original, pre),
                      hf_to_gguf_tensors("llama", {k: v.numpy() for k, v in model.state_dict().items()}, model.config))
    out = convert_gguf(path, tmp_path / "out")
    converted = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert converted.get_vocab_size(with_added_tokens=True) == original.get_vocab_size(with_added_tokens=True)
    for text in PROBES:
        ids = converted.encode(text).ids
        assert ids == original.encode(text).ids, text
        assert converted.decode(ids, skip_special_tokens=False) == text
    im_end = original.token_to_id("<|im_end|>")
    assert converted.decode([im_end]) == ""  # control tokens are special: skipped when decoding
    assert converted.decode([original.token_to_id("<think>")]) == "<think>"  # user-defined ones are text


# --- Llama 3.1/3.2: RoPE scaling stored as rope_freqs ------------------------------------------


def llama_cpp_rope_factors(cfg: Any) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors: one divisor per RoPE frequency."""
    rp = cfg.rope_parameters
    dim = cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / (rp["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high, old = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"], rp["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("theta,original", [(500000.0, 32), (10000.0, 64), (500000.0, 8192)])
def test_llama31_rope_freqs_become_rope_scaling(tmp_path: Path, tokenizer: Any, theta: float, original: int) -> None:
    """(500000, 32): no frequency blended; (10000, 64): two blended; (500000, 8192): Llama 3.1's own values."""
    import transformers

    from model.loading import load_model

    model = tiny_hf_model("llama", tokenizer, tie=False)
    cfg = model.config
    cfg.rope_parameters = {"rope_type": "llama3", "rope_theta": theta, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": original}
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    model.load_state_dict(tiny_hf_model("llama", tokenizer, tie=False).state_dict())
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    meta = model_metadata("llama", cfg, tokenizer) | {"llama.rope.freq_base": theta}
    tensors = hf_to_gguf_tensors("llama", state, cfg) + [("rope_freqs.weight", llama_cpp_rope_factors(cfg), Q.F32)]
    path = write_gguf(tmp_path / "m.gguf", "llama", meta, tensors)
    out = convert_gguf(path, tmp_path / "out")

    scaling = json.loads((out / "config.json").read_text())["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0
    if original == 8192:
        assert (scaling["high_freq_factor"], scaling["original_max_position_embeddings"]) == (4.0, 8192)
    converted = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    torch.testing.assert_close(converted.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    ids = torch.tensor([tokenizer.encode(CORPUS[1]).ids])
    ours = load_model(out)
    ours.setup_cache(ids.shape[1])
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(converted(ids).logits, want, rtol=0, atol=1e-6)
        assert (ours(ids, 0) - want).abs().max().item() <= 1e-4
    # transformers' own GGUF loading reads the same tensors (it leaves rope_freqs aside)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    got = load_file(out / "model.safetensors")
    for name, t in reference.state_dict().items():
        np.testing.assert_array_equal(got[name], t.numpy(), err_msg=name)


def test_rope_freqs_that_are_not_llama3_scaling_are_refused(tmp_path: Path, tokenizer: Any) -> None:
    model = tiny_hf_model("llama", tokenizer)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    odd = np.array([1.0, 3.0, 2.0, 8.0, 1.5, 8.0, 8.0, 8.0], dtype=np.float32)  # not monotone in wavelength
    tensors = hf_to_gguf_tensors("llama", state, model.config) + [("rope_freqs.weight", odd, Q.F32)]
    path = write_gguf(tmp_path / "m.gguf", "llama", model_metadata("llama", model.config, tokenizer), tensors)
    with pytest.raises(AttnError, match="rope_freqs.weight: these RoPE divisors are not Llama 3's scaling"):
        convert_gguf(path, tmp_path / "out")


# --- SentencePiece vocabularies (Llama 2, TinyLlama, Mistral v0.1) ------------------------------

SPM_SPECIALS = ["<unk>", "<s>", "</s>"]


def spm_vocabulary() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style BPE vocabulary laid out as Llama 2's: <unk>, <s>, </s>, the 256 byte pieces
    <0x00>..<0xFF>, then pieces (▁ for a space) scored by merge rank, as llama.cpp writes them."""
    from tokenizers import SentencePieceBPETokenizer

    trained = SentencePieceBPETokenizer()
    trained.train_from_iterator(CORPUS * 3, vocab_size=300, special_tokens=SPM_SPECIALS, show_progress=False)
    pieces = [t for t, _ in sorted(trained.get_vocab().items(), key=lambda kv: kv[1]) if t not in SPM_SPECIALS]
    tokens = SPM_SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)  # UNKNOWN, CONTROL, BYTE, NORMAL
    return tokens, scores, types


def spm_metadata(tokens: list[str], scores: list[float], types: list[int]) -> dict[str, Any]:
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


class _Vocab:
    """Just enough of a tokenizer for tiny_hf_model: the vocabulary size."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self.n


def test_sentencepiece_vocabulary_equals_transformers(tmp_path: Path) -> None:
    import transformers
    from tokenizers import Tokenizer

    tokens, scores, types = spm_vocabulary()
    model = tiny_hf_model("llama", _Vocab(len(tokens)))
    meta = model_metadata("llama", model.config, _Vocab(len(tokens)), pre=None) | spm_metadata(tokens, scores, types)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    path = write_gguf(tmp_path / "m.gguf", "llama", meta, hf_to_gguf_tensors("llama", state, model.config, Q.Q8_0))
    out = convert_gguf(path, tmp_path / "out")

    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert ours.get_vocab_size(with_added_tokens=True) == len(tokens)
    for text in PROBES + ["<s>[INST] hi [/INST]", " leading space", "x  y"]:
        ids = ours.encode(text).ids
        assert ids == reference(text)["input_ids"], text
        assert ids[0] == 1  # BOS, as the file asks
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True), text
    assert ours.encode("🦜").ids[2:] == [tokens.index(f"<0x{b:02X}>") for b in "🦜".encode()]  # ▁, then byte fallback
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"], tc["unk_token"], tc["add_bos_token"]) == ("<s>", "</s>", "<unk>", True)
    # transformers' own GGUF loading reads the same (dequantized Q8_0) tensors
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    got = load_file(out / "model.safetensors")
    for name, t in ref_model.state_dict().items():
        if name in got:
            np.testing.assert_array_equal(got[name], t.numpy(), err_msg=name)
    assert set(got) <= set(ref_model.state_dict())


def test_sentencepiece_model_generates_through_attn(tmp_path: Path) -> None:
    """The converted SentencePiece model runs end to end: the CLI encodes with BOS, streams text, exits 0."""
    from tests.conftest import run_cli

    tokens, scores, types = spm_vocabulary()
    model = tiny_hf_model("llama", _Vocab(len(tokens)))
    meta = model_metadata("llama", model.config, _Vocab(len(tokens)), pre=None) | spm_metadata(tokens, scores, types)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    path = write_gguf(tmp_path / "m.gguf", "llama", meta, hf_to_gguf_tensors("llama", state, model.config))
    out = convert_gguf(path, tmp_path / "out")
    r = run_cli(["generate", "the fluffy creature", "-m", str(out), "-n", "8", "--raw", "--temperature", "0"])
    assert r.code == 0, r
    r = run_cli(["inspect", "the fluffy creature", "-m", str(out), "--raw", "--format", "json", "-l", "0", "--head", "0"])
    assert r.code == 0, r
    labels = [t["text"] for t in json.loads(r.out)["tokens"]]
    assert labels[0] == "<s>" and any(t.startswith(" ") for t in labels[1:])  # a piece's ▁ shown as its space


# --- failures --------------------------------------------------------------------------------


def tiny_gguf(tmp_path: Path, tokenizer: Any, arch: str = "llama", meta_changes: dict | None = None, extra: list | None = None) -> Path:
    model = tiny_hf_model("llama", tokenizer)
    meta = model_metadata("llama", model.config, tokenizer)
    if arch != "llama":
        meta = {k.replace("llama.", f"{arch}.", 1): v for k, v in meta.items()}
    meta |= meta_changes or {}
    tensors = hf_to_gguf_tensors("llama", {k: v.numpy() for k, v in model.state_dict().items()}, model.config) + (extra or [])
    return write_gguf(tmp_path / "m.gguf", arch, meta, tensors)


@pytest.mark.parametrize(
    "arch,meta,extra,message",
    [
        ("mamba", {}, [], "unsupported GGUF architecture 'mamba'"),
        ("llama", {"tokenizer.ggml.model": "bert"}, [], "unsupported GGUF tokenizer 'bert'"),
        ("llama", {"tokenizer.ggml.model": "llama"}, [], "GGUF metadata lacks the SentencePiece tokens or their scores"),
        ("llama", {"tokenizer.ggml.pre": "made-up"}, [], "unsupported GGUF pre-tokenizer 'made-up'"),
        ("llama", {}, [("blk.0.attn_sinks.weight", np.ones(4, np.float32), Q.F32)], "unsupported tensor 'blk.0.attn_sinks.weight'"),
        ("llama", {"llama.attention.head_count_kv": 4}, [], r"tensor 'blk.0.attn_k.weight' has shape \[32, 64\], the metadata implies \[64, 64\]"),
    ],
)
def test_unsupported_files_fail_clearly(tmp_path: Path, tokenizer: Any, arch: str, meta: dict, extra: list, message: str) -> None:
    path = tiny_gguf(tmp_path, tokenizer, arch, meta, extra)
    with pytest.raises(AttnError, match=message) as e:
        convert_gguf(path, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # nothing half-written


def test_not_a_gguf_and_existing_output(tmp_path: Path, tokenizer: Any) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(AttnError, match="not a readable GGUF"):
        convert_gguf(bad, tmp_path / "out")
    path = tiny_gguf(tmp_path, tokenizer)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(AttnError, match="already exists"):
        convert_gguf(path, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    with pytest.raises(AttnError, match="unsupported dtype"):
        convert_gguf(path, tmp_path / "out2", dtype="int8")


def test_write_error_leaves_nothing(tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import weights.gguf as wg

    path = tiny_gguf(tmp_path, tokenizer)

    def full_disk(tensors: dict, target: Path) -> None:
        target.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wg, "_write_shard", full_disk)
    with pytest.raises(AttnError, match="No space left on device"):
        convert_gguf(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_sharded_output(tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    import weights.gguf as wg

    monkeypatch.setattr(wg, "MAX_SHARD_BYTES", 200_000)
    model = tiny_hf_model("llama", tokenizer)
    path = write_gguf(tmp_path / "m.gguf", "llama", model_metadata("llama", model.config, tokenizer),
                      hf_to_gguf_tensors("llama", {k: v.numpy() for k, v in model.state_dict().items()}, model.config))
    out = convert_gguf(path, tmp_path / "out")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    for name, t in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], t, rtol=0, atol=0)


# --- the real default model ---------------------------------------------------------------

REAL_TEXTS = [
    "The capital of France is",
    "Hello, world! It's a beautiful day; isn't it?",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "我们今天去公园散步，天气很好。",
    "Emoji: 😀🎉🚀👍🏽 and ✨",
    "Spaces:    four\t\ttabs\n\n\n  newlines   ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Prices: $1,234.56 on 2024-01-31 at 10:45",
]


@pytest.mark.slow
def test_real_model_tensors_equal_transformers(real_model_dir: Path, real_gguf_path: Path) -> None:
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        real_gguf_path.parent, gguf_file=real_gguf_path.name, dtype=torch.float32
    )
    ref = reference.state_dict()
    from safetensors.torch import load_file as load_torch

    ours = load_torch(real_model_dir / "model.safetensors")
    assert set(ours) == set(ref) - {"lm_head.weight"}  # tied head: only the embedding is stored
    for name, t in ours.items():
        assert t.dtype == torch.float32
        torch.testing.assert_close(t, ref[name], rtol=0, atol=1e-6, msg=name)
    config = json.loads((real_model_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 576, 9, 3)
    assert (config["vocab_size"], config["rope_theta"], config["tie_word_embeddings"]) == (49152, 100000.0, True)


@pytest.mark.slow
def test_real_model_tokenizer_equals_transformers(real_model_dir: Path, real_gguf_path: Path) -> None:
    import transformers
    from tokenizers import Tokenizer

    reference = transformers.AutoTokenizer.from_pretrained(real_gguf_path.parent, gguf_file=real_gguf_path.name)
    ours = Tokenizer.from_file(str(real_model_dir / "tokenizer.json"))
    for text in REAL_TEXTS:
        assert ours.encode(text).ids == reference(text)["input_ids"], text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text
    tc = json.loads((real_model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tc["chat_template"] and tc["eos_token"] == "<|im_end|>"


@pytest.mark.slow
def test_real_model_generates_paris_in_transformers(real_model_dir: Path) -> None:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(real_model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(real_model_dir).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
