"""Parity with Hugging Face transformers on the same files: logits, cached decoding, greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.decoder import Linear, attention, explicit_attention
from model.generate import generate
from model.loading import load_model
from model.quant import pack
from model.sampling import SamplingSettings
from tests.conftest import KINDS, save_model

GREEDY = SamplingSettings(temperature=0)


# Every parity test runs twice: plain products (CUDA, --compile, ATTN_KERNELS=generic) and the eager CPU
# default, oneDNN's packed weights (model/quant/packed.py), loaded as the CLI loads them.
LAYOUTS = pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])


def load(path: Path, packed: bool):
    model = load_model(path, out_in=packed)
    if packed:
        assert pack(model) > 0 and not any(isinstance(m, Linear) for m in model.modules())
    return model


def ids_for(model, T: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.cfg.vocab_size, (1, T), generator=g)


@LAYOUTS
@pytest.mark.parametrize("kind", KINDS)
def test_full_logits_match_transformers(tiny_models, kind, packed):
    path, hf = tiny_models[kind]
    model = load(path, packed)
    model.setup_cache(64)
    ids = ids_for(model)
    with torch.no_grad():
        ours = model(ids, 0)
        ref = hf(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-4


@LAYOUTS
@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_equals_full_logits(tiny_models, kind, packed):
    path, _ = tiny_models[kind]
    model = load(path, packed)
    ids = ids_for(model, T=30)
    model.setup_cache(64)
    with torch.no_grad():
        full = model(ids, 0)
        for chunks in ([1] * 30, [7, 1, 5, 2, 11, 1, 3]):  # token by token, and uneven prefill chunks
            model.setup_cache(64)
            got, at = [], 0
            for n in chunks:
                got.append(model(ids[:, at : at + n], at))
                at += n
            assert (torch.cat(got, dim=1) - full).abs().max().item() <= 1e-4


@LAYOUTS
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_match_transformers_generate(tiny_models, kind, packed):
    path, hf = tiny_models[kind]
    model = load(path, packed)
    prompt = ids_for(model, T=8, seed=2)
    ours = [s.id for s in generate(model, prompt[0].tolist(), 32, GREEDY)]
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert ours == ref[0, 8:].tolist()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "pythia", "phi3"])  # pythia, phi3: fused tensors reordered / whole
def test_sharded_checkpoint_loads_the_same(tmp_path, tokenizer_json, tiny_models, kind):
    save_model(kind, tmp_path, tokenizer_json, shards="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    single = load_model(tiny_models[kind][0]).state_dict()
    sharded = load_model(tmp_path).state_dict()
    assert single.keys() == sharded.keys()
    for k in single:
        assert torch.equal(single[k], sharded[k]), k


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2", "gemma2", "gemma3"])
def test_fused_and_explicit_attention_agree(tiny_models, kind):
    """Each layer's own settings (window, scale, soft-cap): gemma2's capped layers take the explicit path."""
    model = load_model(tiny_models[kind][0])
    for attn in (block.attn for block in model.layers):
        g = torch.Generator().manual_seed(3)
        B, H, G, D, S = 1, attn.n_heads, attn.n_kv_heads, attn.head_dim, 20
        k = torch.randn(B, G, S, D, generator=g) * 2  # scores of a few units, so a cap of 1.5 bites
        v = torch.randn(B, G, S, D, generator=g)
        settings = (attn.window, attn.scale, attn.softcap)
        for start, T in [(0, S), (12, 8), (19, 1)]:  # prefill, a chunk after cached tokens, a decode step
            q = torch.randn(B, H, T, D, generator=g) * 2
            fused = attention(q, k[:, :, : start + T], v[:, :, : start + T], start, *settings)
            explicit, w = explicit_attention(q, k[:, :, : start + T], v[:, :, : start + T], torch.arange(start, start + T), *settings)
            assert (fused - explicit).abs().max().item() <= 1e-5
            assert torch.allclose(w.sum(-1), torch.ones(B, H, T))


MEASURE_LOAD = """
import resource, sys, torch
from model.loading import load_model
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = load_model(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(weights, (after - before) * 1024)
"""


def test_loading_float32_peaks_under_1_3x_the_weights(tmp_path, tokenizer_json):
    """Peak resident memory of a float32 load stays under 1.3 × the weights (no second copy anywhere)."""
    import subprocess
    import sys

    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)  # ≈ 100 MB of float32
    root = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", MEASURE_LOAD, str(tmp_path)], capture_output=True, text=True, cwd=root, check=True)
    weights, peak_growth = map(int, out.stdout.split())
    assert weights > 80e6
    assert peak_growth < 1.3 * weights, (peak_growth / weights)
