"""Sampling on crafted logits, checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.generate import generate
from model.loading import load_model
from model.sampling import SamplingSettings, apply_repeat_penalty, filter_logits, sample

LOGITS = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))  # probabilities by hand


def kept(s: SamplingSettings) -> list[int]:
    return torch.isfinite(filter_logits(LOGITS, s)).nonzero().flatten().tolist()


def test_top_k_keeps_k_largest():
    assert kept(SamplingSettings(temperature=1, top_k=2)) == [0, 1]


def test_top_p_keeps_smallest_set_reaching_p():
    # cumulative 0.5, 0.7, 0.85, 0.95, 1.0
    assert kept(SamplingSettings(temperature=1, top_p=0.5)) == [0]
    assert kept(SamplingSettings(temperature=1, top_p=0.7)) == [0, 1]
    assert kept(SamplingSettings(temperature=1, top_p=0.71)) == [0, 1, 2]
    assert kept(SamplingSettings(temperature=1, top_p=0.01)) == [0]  # the top token always stays


def test_min_p_is_relative_to_the_top_token():
    # threshold = min_p × 0.5
    assert kept(SamplingSettings(temperature=1, min_p=0.25)) == [0, 1, 2]  # 0.125
    assert kept(SamplingSettings(temperature=1, min_p=0.39)) == [0, 1]  # 0.195
    assert kept(SamplingSettings(temperature=1, min_p=0.5)) == [0]  # 0.25


def test_filters_apply_in_order_after_temperature():
    # temperature 0.5 squares the probabilities: 0.25, 0.04, 0.0225, 0.01, 0.0025 (sum 0.325),
    # i.e. 0.769, 0.123, 0.069, 0.031, 0.008; cumulative before each: 0, 0.769, 0.892, 0.962
    p = filter_logits(LOGITS, SamplingSettings(temperature=0.5, top_p=0.8)).softmax(-1)
    assert p[1].item() == pytest.approx(0.04 / 0.29, rel=1e-4) and p[2].item() == 0
    p = filter_logits(LOGITS, SamplingSettings(temperature=0.5, top_p=0.9)).softmax(-1)
    assert p[1].item() == pytest.approx(0.04 / 0.3125, rel=1e-4) and p[3].item() == 0
    # top-k before top-p: k=1 leaves nothing for top-p to do
    assert kept(SamplingSettings(temperature=0.5, top_k=1, top_p=0.99)) == [0]


def test_repeat_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    out = apply_repeat_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0]


def test_greedy_is_argmax_and_top_k_1_equals_greedy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(100, generator=g)
    assert sample(logits, SamplingSettings(temperature=0)).item() == logits.argmax().item()
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        assert sample(logits, SamplingSettings(temperature=1.3, top_k=1), generator=gen).item() == logits.argmax().item()


def test_sampling_follows_the_distribution():
    gen = torch.Generator().manual_seed(0)
    s = SamplingSettings(temperature=1.0, top_p=1.0)
    counts = torch.bincount(torch.stack([sample(LOGITS, s, generator=gen) for _ in range(4000)]), minlength=5)
    assert counts[0].item() / 4000 == pytest.approx(0.5, abs=0.03)
    assert counts[4].item() / 4000 == pytest.approx(0.05, abs=0.015)


def test_same_seed_same_tokens(tiny_llama):
    model = load_model(tiny_llama)
    s = SamplingSettings(temperature=1.0, top_p=0.9, repeat_penalty=1.1)

    def run(seed):
        return [st.id for st in generate(model, [5, 6, 7], 24, s, torch.Generator().manual_seed(seed))]

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_top_k_1_generation_equals_greedy(tiny_llama):
    model = load_model(tiny_llama)
    greedy = [s.id for s in generate(model, [5, 6, 7], 16, SamplingSettings(temperature=0))]
    topk = [s.id for s in generate(model, [5, 6, 7], 16, SamplingSettings(temperature=2.0, top_k=1), torch.Generator().manual_seed(1))]
    assert greedy == topk


@settings(max_examples=60, deadline=None)
@given(
    temp=st.floats(0, 5, allow_nan=False),
    top_k=st.integers(0, 10),
    top_p=st.floats(0.001, 1.0),
    min_p=st.floats(0, 1),
    penalty=st.floats(0.1, 3.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_any_valid_settings_give_a_valid_token(temp, top_k, top_p, min_p, penalty, seed):
    s = SamplingSettings(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=penalty)
    assert s.check() == []
    logits = torch.randn(50, generator=torch.Generator().manual_seed(seed)) * 5
    tok = sample(logits, s, torch.tensor([1, 2, 3]), torch.Generator().manual_seed(seed)).item()
    assert 0 <= tok < 50


@pytest.mark.parametrize(
    "kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-3), dict(min_p=2), dict(repeat_penalty=0), dict(temperature=math.nan)]
)
def test_invalid_settings_are_rejected(kw):
    assert SamplingSettings(**kw).check()
