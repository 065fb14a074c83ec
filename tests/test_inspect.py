"""The attention probe against independent references: transformers' eager attention, and
scores / value norms recomputed here from the raw weights (RoPE applied by this file)."""

from __future__ import annotations

import pytest
import torch

from model.loading import load_model
from model.probe import capture
from tests.conftest import FAMILY_KINDS

PARITY_KINDS = ["gpt2", "llama", "qwen2", *FAMILY_KINDS]
# Scores and value norms recomputed by hand below (the families' extra steps: tests/test_explain.py).
HAND_KINDS = ["gpt2", "llama", "qwen2"]


def random_ids(vocab: int, T: int = 16, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (T,), generator=g).tolist()


def hf_run(hf, ids: list[int]):
    with torch.no_grad():
        return hf(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)


def all_heads(model) -> list[int]:
    return list(range(model.cfg.n_heads))


@pytest.fixture(scope="module")
def loaded(tiny_models):
    """kind → (our model, transformers model); loaded once for the module."""
    return {kind: (load_model(tiny_models[kind][0]), tiny_models[kind][1]) for kind in PARITY_KINDS}


# --- weights: parity with transformers ---------------------------------------------------


@pytest.mark.parametrize("kind", PARITY_KINDS)
def test_weights_match_transformers_every_layer_head_query(loaded, kind):
    model, hf = loaded[kind]
    ids = random_ids(model.cfg.vocab_size)
    ref = hf_run(hf, ids).attentions  # per layer (1, H, T, T)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    for qi in range(len(ids)):
        cap = capture(model, ids, qi, list(range(L)), all_heads(model), "from", "weights")
        assert cap.positions == list(range(qi + 1))  # never a position after the query
        for layer in range(L):
            w = cap.layers[layer].weights
            assert w.shape == (H, qi + 1)
            assert (w - ref[layer][0, :, qi, : qi + 1]).abs().max().item() <= 1e-5
            assert torch.allclose(w.sum(-1), torch.ones(H), atol=1e-6)
            assert torch.equal(cap.layers[layer].values, w)


@pytest.mark.parametrize("kind", PARITY_KINDS)
def test_direction_to_is_the_column_of_the_full_matrix(loaded, kind):
    model, hf = loaded[kind]
    ids = random_ids(model.cfg.vocab_size, T=20, seed=4)
    ref = hf_run(hf, ids).attentions
    L = model.cfg.n_layers
    for c in (0, 5, 19):
        cap = capture(model, ids, c, list(range(L)), all_heads(model), "to", "weights")
        assert cap.positions == list(range(c, 20))
        for layer in range(L):
            full = ref[layer][0]  # (H, T, T)
            assert (cap.layers[layer].values - full[:, c:, c]).abs().max().item() <= 1e-5
            assert (cap.layers[layer].sink - full[:, c:, 0]).abs().max().item() <= 1e-5


def test_direction_to_in_many_row_chunks(loaded, monkeypatch):
    """The column is the same when rows are processed a few at a time (as for long prompts)."""
    import model.probe as probe

    model, hf = loaded["llama"]
    ids = random_ids(model.cfg.vocab_size, T=20, seed=5)
    ref = hf_run(hf, ids).attentions
    monkeypatch.setattr(probe, "CHUNK_ELEMENTS", model.cfg.n_heads * 20 * 3)  # 3 rows per chunk
    cap = capture(model, ids, 2, [0, 1], all_heads(model), "to", "weights")
    for layer in (0, 1):
        assert (cap.layers[layer].values - ref[layer][0, :, 2:, 2]).abs().max().item() <= 1e-5


def test_head_and_layer_subsets_keep_their_order_and_kv_heads(loaded):
    model, hf = loaded["llama"]  # 4 query heads share 2 KV heads
    ids = random_ids(model.cfg.vocab_size)
    ref = hf_run(hf, ids).attentions
    cap = capture(model, ids, 9, [1], [3, 0], "from", "weights")
    assert list(cap.layers) == [1]
    assert cap.heads == [3, 0] and cap.kv_heads == [1, 0]
    assert (cap.layers[1].weights - ref[1][0, [3, 0], 9, :10]).abs().max().item() <= 1e-5


def test_the_pass_stops_after_the_last_probed_layer(loaded, monkeypatch):
    model, _ = loaded["llama"]
    ran = []
    for i, block in enumerate(model.layers):
        monkeypatch.setattr(block.mlp, "forward", lambda x, i=i, f=block.mlp.forward: (ran.append(i), f(x))[1])
    head_calls = []
    monkeypatch.setattr(model.lm_head, "forward", lambda x: head_calls.append(1))
    capture(model, random_ids(model.cfg.vocab_size), 3, [0], [0], "from", "weights")
    assert ran == [0] and head_calls == []


# --- scores and value norms, recomputed here from the raw weights ---------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE, HF layout, written here independently: x (1, n, T, D) at positions 0..T-1."""
    T, D = x.shape[2], x.shape[3]
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return (x.double() * ang.cos() + rotate_half(x.double()) * ang.sin()).float()


def reference_qkv_wo(kind: str, hf, hidden: torch.Tensor, layer: int):
    """q (H, T, D), k, v (H, T, D) expanded to query heads, W_O per head (H, D, C), from HF modules."""
    cfg = hf.config
    H = cfg.num_attention_heads if kind != "gpt2" else cfg.n_head
    C = cfg.hidden_size if kind != "gpt2" else cfg.n_embd
    D = C // H
    with torch.no_grad():
        if kind == "gpt2":
            blk = hf.transformer.h[layer]
            x = blk.ln_1(hidden)
            q, k, v = (t.view(1, -1, H, D).transpose(1, 2) for t in blk.attn.c_attn(x).split(C, dim=-1))
            w_o = blk.attn.c_proj.weight.view(H, D, C)  # Conv1D stores (in, out)
        else:
            blk = hf.model.layers[layer]
            att = blk.self_attn
            G = cfg.num_key_value_heads
            x = blk.input_layernorm(hidden)
            q = att.q_proj(x).view(1, -1, H, D).transpose(1, 2)
            k = att.k_proj(x).view(1, -1, G, D).transpose(1, 2)
            v = att.v_proj(x).view(1, -1, G, D).transpose(1, 2)
            theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or cfg.rope_theta
            q, k = rope(q, theta), rope(k, theta)
            k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
            w_o = att.o_proj.weight.t().reshape(H, D, C)  # nn.Linear stores (out, in)
    return q[0], k[0], v[0], w_o


@pytest.mark.parametrize("kind", HAND_KINDS)
def test_scores_are_qk_over_sqrt_d_with_rope(loaded, kind):
    model, hf = loaded[kind]
    ids = random_ids(model.cfg.vocab_size, T=12, seed=7)
    out = hf_run(hf, ids)
    for layer in range(model.cfg.n_layers):
        q, k, _, _ = reference_qkv_wo(kind, hf, out.hidden_states[layer], layer)
        D = q.shape[-1]
        for qi in (0, 6, 11):
            ref = (q[:, qi : qi + 1] @ k[:, : qi + 1].transpose(-1, -2))[:, 0] / D**0.5  # (H, qi+1)
            cap = capture(model, ids, qi, [layer], all_heads(model), "from", "scores")
            assert (cap.layers[layer].values - ref).abs().max().item() <= 1e-4
            assert torch.isfinite(cap.layers[layer].values).all()
        col = capture(model, ids, 4, [layer], all_heads(model), "to", "scores").layers[layer].values
        ref_col = (q[:, 4:] @ k[:, 4].unsqueeze(-1))[..., 0] / D**0.5  # (H, T-4)
        assert (col - ref_col).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", HAND_KINDS)
def test_value_norms_are_alpha_v_wo(loaded, kind):
    model, hf = loaded[kind]
    ids = random_ids(model.cfg.vocab_size, T=12, seed=8)
    out = hf_run(hf, ids)
    for layer in range(model.cfg.n_layers):
        _, _, v, w_o = reference_qkv_wo(kind, hf, out.hidden_states[layer], layer)
        alpha = out.attentions[layer][0]  # (H, T, T)
        qi = 10
        ref = torch.stack(
            [torch.stack([(alpha[h, qi, j] * v[h, j] @ w_o[h]).norm() for j in range(qi + 1)]) for h in range(alpha.shape[0])]
        )
        cap = capture(model, ids, qi, [layer], all_heads(model), "from", "value-norms")
        assert (cap.layers[layer].values - ref).abs().max().item() <= 1e-4
        col = capture(model, ids, 3, [layer], all_heads(model), "to", "value-norms").layers[layer].values
        ref_col = torch.stack([torch.stack([(alpha[h, i, 3] * v[h, 3] @ w_o[h]).norm() for i in range(3, 12)]) for h in range(alpha.shape[0])])
        assert (col - ref_col).abs().max().item() <= 1e-4


def test_capture_after_a_cached_prefix_equals_a_full_pass(loaded):
    """The KV-cache path: a probe on one decode step sees what a full forward pass sees."""
    model, hf = loaded["qwen2"]
    ids = random_ids(model.cfg.vocab_size, T=14, seed=9)
    ref = hf_run(hf, ids).attentions
    model.setup_cache(32)
    with torch.inference_mode():
        model(torch.tensor([ids[:13]]), 0)  # positions 0..12 cached
    for qi, direction in ((13, "from"), (11, "from"), (9, "to")):
        cap = capture(model, ids, qi, [0, 1], all_heads(model), direction, "weights", cached=13)
        for layer in (0, 1):
            want = ref[layer][0, :, qi, : qi + 1] if direction == "from" else ref[layer][0, :, qi:, qi]
            assert (cap.layers[layer].values - want).abs().max().item() <= 1e-5
