"""The default model, greedy, 64 prompts: decoded together (16 rows, refilled) against each alone.

A batch changes only the order of floating-point sums (rows at other positions share the
matrix products; the per-row mask reads more of the cache), so a token can differ only where
the top two logits are nearly tied. `divergences` reports every prompt whose tokens differ, the
step, and the top-2 logit gap there, in both runs.
"""

from __future__ import annotations

import pytest
import torch

from model.generate import Sequence, decode
from model.loading import load_model
from model.sampling import SamplingSettings
from model.tokenizer import Tokenizer

SUBJECTS = ["the sea", "a library", "winter", "bees", "a bicycle", "the moon", "bread", "a violin", "rain", "mountains",
            "a lighthouse", "coffee", "trains", "a garden", "the desert", "an owl"]
PROMPTS = (
    [f"Write one sentence about {s}." for s in SUBJECTS]
    + [f"What is {a} plus {b}?" for a, b in zip(range(3, 19), range(40, 120, 5))]
    + [f"Translate to French: I like {s}." for s in SUBJECTS]
    + [f"Give me a name for a cat that loves {s}." for s in SUBJECTS]
)
NEW_TOKENS = 16
NEAR_TIE = 1e-3


def top2_gap(logprobs: torch.Tensor) -> float:
    """The gap between the two largest logits (log-softmax differs from the logits by a constant)."""
    top = torch.topk(logprobs.double(), 2).values
    return float(top[0] - top[1])


def divergences(alone: list[list], together: list[list]) -> list[dict]:
    """Each prompt whose greedy tokens differ: where, which tokens, and the top-2 gap there in both runs."""
    out = []
    for i, (a, b) in enumerate(zip(alone, together)):
        ids_a, ids_b = [s.id for s in a], [s.id for s in b]
        if ids_a == ids_b:
            continue
        k = next((j for j, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))
        out.append({"prompt": i, "step": k, "alone": ids_a[k : k + 1], "batch": ids_b[k : k + 1],
                    "gap_alone": top2_gap(a[k].logprobs) if k < len(a) else None,
                    "gap_batch": top2_gap(b[k].logprobs) if k < len(b) else None})
    return out


@pytest.mark.slow
def test_greedy_batch_equals_each_prompt_alone(real_model_dir):
    model, tok = load_model(real_model_dir), Tokenizer(real_model_dir)
    assert len(PROMPTS) == 64
    ids = [tok.encode(tok.render_chat([{"role": "user", "content": p}]), add_special_tokens=False) for p in PROMPTS]
    greedy = SamplingSettings(temperature=0)
    max_len = max(len(p) for p in ids) + NEW_TOKENS
    alone = [[s for _, s in decode(model, [Sequence(p, NEW_TOKENS, greedy, want_logprobs=True)], slots=1, max_len=max_len)] for p in ids]
    seqs = [Sequence(p, NEW_TOKENS, greedy, want_logprobs=True) for p in ids]
    together: dict[int, list] = {i: [] for i in range(len(seqs))}
    index = {id(s): i for i, s in enumerate(seqs)}
    for seq, step in decode(model, seqs, slots=16, max_len=max_len):
        together[index[id(seq)]].append(step)
    report = divergences(alone, [together[i] for i in range(len(seqs))])
    print(f"\n{len(PROMPTS) - len(report)}/{len(PROMPTS)} prompts identical; divergences: {report}")
    assert len(report) <= 2, report
    assert all(d["gap_alone"] is not None and d["gap_alone"] < NEAR_TIE for d in report), report
