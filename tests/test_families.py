"""Family config readers: older and newer config.json spellings read alike; contradictory fields end in one
line naming the field (exit 1); and what the short-prompt parity tests cannot reach (LongRoPE's long factors).

Logits, cached decoding, greedy tokens, attention weights and explain's stages of each family against
transformers are in test_parity.py, test_inspect.py, test_window.py, test_explain.py (FAMILY_KINDS)."""

from __future__ import annotations

import copy
import re
import json
import shutil

import pytest
import torch

from model.config import ModelConfig
from model.errors import AttnError
from model.loading import load_model
from model.probe import capture
from tests.conftest import run_cli


def saved_config(tiny_models, kind: str) -> dict:
    return json.loads((tiny_models[kind][0] / "config.json").read_text())


def older_spelling(kind: str, d: dict) -> dict:
    """The same model as transformers v4 wrote config.json: top-level RoPE keys, `rope_scaling`, patterns."""
    d = copy.deepcopy(d)
    rp = d.pop("rope_parameters")
    if kind == "gemma3":  # a window pattern instead of layer_types; the local base as rope_local_base_freq
        del d["layer_types"]
        d["sliding_window_pattern"] = 2
        d["rope_local_base_freq"] = rp["sliding_attention"]["rope_theta"]
        glob = rp["full_attention"]
        d["rope_theta"] = glob.pop("rope_theta")
        d["rope_scaling"] = {"type": glob["rope_type"], "factor": glob["factor"]}
    elif kind == "phi3":  # early Phi-3 files call LongRoPE "su"; partial_rotary_factor top-level
        d["rope_theta"] = rp["rope_theta"]
        d["partial_rotary_factor"] = rp["partial_rotary_factor"]
        d["rope_scaling"] = {"type": "su", "short_factor": rp["short_factor"], "long_factor": rp["long_factor"]}
    elif kind == "pythia":  # GPT-NeoX's own names
        d["rotary_pct"] = rp["partial_rotary_factor"]
        d["rotary_emb_base"] = rp["rope_theta"]
    elif kind == "llama3":
        d["rope_theta"] = rp.pop("rope_theta")
        d["rope_scaling"] = rp
    return d


@pytest.mark.parametrize("kind", ["gemma3", "phi3", "pythia", "llama3"])
def test_older_config_spellings_read_alike(tiny_models, kind):
    d = saved_config(tiny_models, kind)
    newer = ModelConfig.from_hf_config(d)
    older = ModelConfig.from_hf_config(older_spelling(kind, d))
    assert older == newer
    if kind == "gemma3":
        assert newer.local_rope_theta == 10000.0 and newer.rope_theta == 1e6 and newer.rope_scaling["factor"] == 4.0
        assert newer.layer_windows == [5, None] and [newer.uses_local_rope(i) for i in (0, 1)] == [True, False]
    if kind == "phi3":
        assert newer.rotary_dim == 12 and newer.rope_scaling["rope_type"] == "longrope"
    if kind == "pythia":
        assert newer.rotary_dim == 4 and newer.parallel_residual


def test_phi3_long_factors_past_the_original_context(tiny_models):
    """80 positions > original_max_position_embeddings 64: transformers' full forward uses the long factors, as
    does a cache set up for 80 positions; cached decoding in chunks equals that full forward."""
    path, hf = tiny_models["phi3"]
    model = load_model(path)
    ids = torch.randint(3, model.cfg.vocab_size, (1, 80), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model.setup_cache(80)
        full = model(ids, 0)
        ref = hf(ids).logits
        assert (full - ref).abs().max().item() <= 1e-4
        model.setup_cache(80)
        chunks = [model(ids[:, a:b], a) for a, b in ((0, 33), (33, 34), (34, 80))]
        assert (torch.cat(chunks, dim=1) - full).abs().max().item() <= 1e-4
        model.setup_cache(64)  # a context within the original one: short factors, and different numbers
        assert (model(ids[:, :64], 0) - full[:, :64]).abs().max().item() > 1e-3


def test_a_window_larger_than_the_context_never_masks(tiny_models):
    path, _ = tiny_models["phi3"]  # sliding_window 200 on every layer, prompts of 24
    model = load_model(path)
    assert model.cfg.layer_windows == [200, 200]
    ids = torch.randint(3, model.cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(5)).tolist()
    cap = capture(model, ids, 23, [0, 1], list(range(model.cfg.n_heads)))
    assert not any(lc.masked.any() for lc in cap.layers.values())


def rope_with(d: dict, **changes) -> dict:
    return {**d["rope_parameters"], **changes}


BAD = [
    # (kind, fields changed in config.json, what the one line says)
    ("qwen3", lambda d: {"head_dim": 32}, r"tensor model.layers.0.self_attn.\w+.weight has shape \[\d+(, 64)?\], expected \[\d+(, 64)?\] from config.json \(.*head_dim 32"),
    ("qwen3", lambda d: {"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ("mistral_window", lambda d: {"sliding_window": 0}, "sliding_window must be a positive number of tokens"),
    ("gemma2", lambda d: {"sliding_window": -4}, "sliding_window must be a positive number of tokens"),
    ("gemma3", lambda d: {"layer_types": ["sliding_attention"]}, "layer_types must list one type for each of the 2 layers"),
    ("gemma3", lambda d: {"layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types has unknown type 'chunked_attention'"),
    ("llama3", lambda d: {"rope_parameters": rope_with(d, rope_type="yarn")}, "rope_parameters.rope_type 'yarn' is not supported"),
    ("pythia", lambda d: {"rope_parameters": rope_with(d, partial_rotary_factor=0.2)}, "gives 3 rotary dims of head_dim 16: need an even number"),
    ("phi3", lambda d: {"rope_parameters": rope_with(d, short_factor=[1.0] * 5)}, "short_factor has 5 entries; the 12 rotary dims need 6"),
    ("gemma2", lambda d: {"query_pre_attn_scalar": 0}, "query_pre_attn_scalar must be a positive number"),
    ("gemma2", lambda d: {"attn_logit_softcapping": -1.0}, "attn_logit_softcapping must be a positive number or null"),
    ("olmo2", lambda d: {"hidden_act": "relu2"}, "hidden_act 'relu2' is not supported"),
    ("gemma3", lambda d: {"use_bidirectional_attention": True}, "use_bidirectional_attention is true"),
]


@pytest.mark.parametrize("kind,change,message", BAD, ids=[f"{k}-{m[:24]}" for k, _, m in BAD])
def test_contradictory_config_fails_in_one_line(tiny_models, tmp_path, kind, change, message):
    src = tiny_models[kind][0]
    model_dir = tmp_path / kind
    shutil.copytree(src, model_dir)
    d = saved_config(tiny_models, kind)
    (model_dir / "config.json").write_text(json.dumps({**d, **change(d)}))
    with pytest.raises(AttnError, match=message) as e:
        load_model(model_dir)
    assert "\n" not in str(e.value)
    r = run_cli(["generate", "hi", "-m", str(model_dir), "-n", "1"])
    assert r.code == 1 and r.out == ""
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.err, r.err
    assert re.search(message, lines[0]), lines[0]

