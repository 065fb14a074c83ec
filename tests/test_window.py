"""Sliding-window attention (Mistral, Qwen2's window layers) against transformers' eager attention,
with prompts longer than the window: what the microscope shows, and the fused path.

Logits, cached decoding (token by token and uneven chunks), greedy tokens and the static-shape
step are covered for the window families by the KINDS-parametrised tests (test_parity.py,
test_fastpaths.py)."""

from __future__ import annotations

import json

import pytest
import torch

from model.decoder import attention, causal_mask, explicit_attention, one_query_attention
from model.explain import explain
from model.heads import head_patterns
from model.loading import load_model
from model.probe import capture

WINDOW_KINDS = ["mistral_window", "qwen2_window", "gemma2", "gemma3"]  # gemma: window layers between global ones


def random_ids(vocab: int, T: int = 14, seed: int = 5) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (T,), generator=g).tolist()


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return {kind: (load_model(tiny_models[kind][0]), tiny_models[kind][1]) for kind in WINDOW_KINDS}


def reference_attentions(hf, ids: list[int]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [a[0] for a in hf(torch.tensor([ids]), output_attentions=True).attentions]  # (H, T, T) per layer


def test_the_mask_rule():
    visible = causal_mask(torch.arange(8), 8, window=3)
    assert visible[7].tolist() == [False] * 5 + [True] * 3  # keys p-W+1..p
    assert visible[1].tolist() == [True, True] + [False] * 6
    assert torch.equal(causal_mask(torch.arange(8), 8, window=100), causal_mask(torch.arange(8), 8))  # larger than the context: no effect


@pytest.mark.parametrize("kind", WINDOW_KINDS)
def test_probe_weights_match_transformers_and_mark_the_window(loaded, kind):
    model, hf = loaded[kind]
    ids = random_ids(model.cfg.vocab_size)
    ref = reference_attentions(hf, ids)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    for qi in range(len(ids)):
        cap = capture(model, ids, qi, list(range(L)), list(range(H)), "from", "weights")
        for layer in range(L):
            lc = cap.layers[layer]
            assert (lc.weights - ref[layer][:, qi, : qi + 1]).abs().max().item() <= 1e-5
            window = model.cfg.layer_windows[layer]
            outside = [j for j in range(qi + 1) if window is not None and j <= qi - window]
            assert lc.masked.nonzero().flatten().tolist() == outside
            if outside:  # transformers gives them exactly 0: they are masked, and marked so
                assert ref[layer][:, qi, outside].abs().max().item() == 0.0
        col = capture(model, ids, 2, list(range(L)), list(range(H)), "to", "scores")
        for layer in range(L):
            window = model.cfg.layer_windows[layer]
            outside = [p - 2 for p in range(2, len(ids)) if window is not None and p - 2 >= window]
            assert col.layers[layer].masked.nonzero().flatten().tolist() == outside
            assert torch.isinf(col.layers[layer].values[:, outside]).all()


@pytest.mark.parametrize("kind", WINDOW_KINDS)
def test_fused_and_explicit_attention_agree_with_a_window(loaded, kind):
    model, _ = loaded[kind]
    attn = model.layers[1].attn
    g = torch.Generator().manual_seed(3)
    H, G, D, S = attn.n_heads, attn.n_kv_heads, attn.head_dim, 20
    k, v = torch.randn(1, G, S, D, generator=g), torch.randn(1, G, S, D, generator=g)
    for start, T in [(0, S), (0, 4), (12, 8), (2, 3), (19, 1), (3, 1)]:
        q = torch.randn(1, H, T, D, generator=g)
        kk, vv = k[:, :, : start + T], v[:, :, : start + T]
        fused = attention(q, kk, vv, start, attn.window)
        explicit, _ = explicit_attention(q, kk, vv, torch.arange(start, start + T), attn.window)
        assert (fused - explicit).abs().max().item() <= 1e-5
        if T == 1:  # the static-shape form: the whole buffer, the position on the device
            pos = torch.tensor([start])
            static = attention(q, k, v, pos, attn.window)
            assert (static - explicit).abs().max().item() <= 1e-5
            # and a compiled CPU step's form: the query written into the cache's row for it, two reductions
            queries = torch.zeros_like(q)
            visible = None if attn.window is None else causal_mask(torch.arange(start, start + 1), start + T, attn.window)
            reduced = one_query_attention(q, kk, vv, queries, visible)
            assert (reduced - explicit).abs().max().item() <= 1e-5
            assert torch.equal(queries, q)


def test_explain_masks_keys_outside_the_window(loaded):
    model, hf = loaded["mistral_window"]
    ids = random_ids(model.cfg.vocab_size)
    ref = reference_attentions(hf, ids)
    ex = explain(model, ids, 12, 1, 3)
    assert ex.window == 6 and ex.masked.nonzero().flatten().tolist() == list(range(7))
    assert torch.isinf(ex.scores[:7]).all() and torch.isfinite(ex.scores[7:]).all()
    torch.testing.assert_close(ex.weights, ref[1][3, 12, :13], rtol=1e-5, atol=1e-5)


def test_head_measures_leave_out_what_the_window_hides(loaded):
    model, hf = loaded["mistral_window"]
    ids = random_ids(model.cfg.vocab_size, T=14)
    ids[12] = ids[2]  # a repeat 10 tokens back: outside the window of 6
    ids[9] = ids[5]  # a repeat 4 tokens back: inside it
    got = head_patterns(model, ids)
    att = torch.stack(reference_attentions(hf, ids))  # (L, H, T, T)
    assert torch.allclose(got["first"], att[:, :, 1:6, 0].mean(-1), atol=1e-5)  # rows 1..5 still see token 0
    assert torch.allclose(got["duplicate_token"], att[:, :, 9, 5], atol=1e-5)  # the masked repeat is no row
    assert torch.allclose(got["induction"], att[:, :, 9, 6], atol=1e-5)


def test_inspect_json_shows_masked_positions_as_null(tiny_models, attn):
    path = str(tiny_models["mistral_window"][0])
    r = attn(["inspect", "a fluffy blue creature roamed the verdant forest", "-m", path, "--raw", "--format", "json", "-l", "0", "--head", "1"])
    assert r.code == 0, r
    out = json.loads(r.out)
    values = out["heads"][0]["values"]
    q = out["query"]["index"]
    assert q >= 6
    assert values[: q - 5] == [None] * (q - 5) and all(isinstance(x, float) for x in values[q - 5 :])
    r = attn(["inspect", "a fluffy blue creature roamed the verdant forest", "-m", path, "--raw", "--format", "csv", "-l", "0", "--head", "1"])
    assert r.code == 0 and r.out.splitlines()[1].endswith(",")  # position 0: no value
    r = attn(["explain", "a fluffy blue creature roamed the verdant forest", "-m", path, "--raw", "-l", "0", "--head", "1", "--format", "json"])
    assert r.code == 0, r
    ex = json.loads(r.out)
    assert ex["window"] == 6 and ex["window_masked"] == list(range(q - 5))
    assert ex["scores"][: q - 5] == [None] * (q - 5)
