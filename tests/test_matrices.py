"""The whole-matrix capture against transformers' eager attention: every row of every head, in
blocks of rows as long prompts get them, with masked keys passed through as -inf / 0."""

from __future__ import annotations

import pytest
import torch

import model.matrices as matrices
from model.loading import load_model
from model.matrices import capture_matrices

KINDS = ["gpt2", "llama", "qwen2", "mistral_window"]  # the last: a sliding window of 6 < T


class Keep:
    """A sink that assembles full (H, T, T) matrices from the blocks it is handed."""

    def __init__(self, T: int) -> None:
        self.T = T
        self.scores: dict[int, torch.Tensor] = {}
        self.weights: dict[int, torch.Tensor] = {}
        self.norm: dict[int, torch.Tensor] = {}
        self.blocks: list[tuple[int, int, int]] = []

    def rows(self, layer: int, first: int, scores: torch.Tensor) -> None:
        H, n, S = scores.shape
        assert S == first + n and scores.dtype == torch.float32
        weights = scores.softmax(-1)
        s = self.scores.setdefault(layer, torch.full((H, self.T, self.T), float("nan")))
        w = self.weights.setdefault(layer, torch.full((H, self.T, self.T), float("nan")))
        s[:, first : first + n] = float("-inf")
        w[:, first : first + n] = 0.0
        s[:, first : first + n, :S] = scores
        w[:, first : first + n, :S] = weights
        self.blocks.append((layer, first, n))

    def norms(self, layer: int, norms: torch.Tensor) -> None:
        self.norm[layer] = norms.clone()


def random_ids(vocab: int, T: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (T,), generator=g).tolist()


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return {kind: (load_model(tiny_models[kind][0]), tiny_models[kind][1]) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_every_row_matches_transformers_in_blocks(loaded, kind, monkeypatch):
    model, hf = loaded[kind]
    T, H = 23, model.cfg.n_heads
    ids = random_ids(model.cfg.vocab_size, T, seed=3)
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), output_attentions=True).attentions
    monkeypatch.setattr(matrices, "CHUNK_ELEMENTS", H * T * 4)  # a few rows per block, as a long prompt gets
    sink = Keep(T)
    capture_matrices(model, ids, [1], sink)
    assert set(sink.weights) == {1} and len(sink.blocks) > 3
    assert [b[1] for b in sink.blocks] == sorted(b[1] for b in sink.blocks)  # rows in order, each once
    assert sum(b[2] for b in sink.blocks) == T
    w, s = sink.weights[1], sink.scores[1]
    assert (w - ref[1][0]).abs().max().item() <= 1e-5
    masked = ~model.layers[1].attn.visible(torch.arange(T), T)  # the future, and keys outside a window
    assert torch.isneginf(s[:, masked]).all() and torch.isfinite(s[:, ~masked]).all()
    assert masked.sum() > T * (T - 1) // 2 if kind == "mistral_window" else True
    assert torch.allclose(s.softmax(-1), w, atol=1e-6)
    assert sink.norm[1].shape == (H, T) and (sink.norm[1] > 0).all()


def test_value_norms_times_weights_are_the_probe_s_value_norms(loaded):
    from model.probe import capture

    model, _ = loaded["llama"]
    T = 12
    ids = random_ids(model.cfg.vocab_size, T, seed=4)
    sink = Keep(T)
    capture_matrices(model, ids, [0, 1], sink)
    heads = list(range(model.cfg.n_heads))
    for qi in (0, 7, 11):
        cap = capture(model, ids, qi, [0, 1], heads, "from", "value-norms")
        for layer in (0, 1):
            mine = sink.weights[layer][:, qi, : qi + 1] * sink.norm[layer][:, : qi + 1]
            assert torch.allclose(mine, cap.layers[layer].values, rtol=1e-4, atol=1e-6)


def test_the_pass_stops_after_the_last_layer_asked(loaded, monkeypatch):
    model, _ = loaded["llama"]
    calls = []
    monkeypatch.setattr(model.lm_head, "forward", lambda x: calls.append(1))
    sink = Keep(8)
    capture_matrices(model, random_ids(model.cfg.vocab_size, 8, seed=5), [0], sink)
    assert set(sink.weights) == {0} and calls == []
