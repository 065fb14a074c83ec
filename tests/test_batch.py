"""Many prompts in one batch (model/generate.py `decode`, model/engine.py `run_batch`) against each
prompt run alone: transformers on the same files, or the same request as a batch of one."""

from __future__ import annotations

import pytest
import torch

from model.engine import Generation, Request, run_batch
from model.generate import Sequence, decode, generate
from model.loading import load_model
from model.sampling import SamplingSettings
from model.tokenizer import Tokenizer
from tests.conftest import KINDS

GREEDY = SamplingSettings(temperature=0)
LENGTHS = [3, 11, 1, 17, 7, 9, 2]  # prompt lengths: longer than the windowed kinds' windows (5, 6) and shorter


def prompts(model, lengths=LENGTHS, seed: int = 4) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, model.cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """transformers' log-probabilities (T, V) of the next token after each prefix of `ids`."""
    return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


@pytest.mark.parametrize("kind", KINDS)
def test_batched_step_logits_equal_one_at_a_time(tiny_models, kind):
    """Rows at different positions in one step: each row's logits are its own sequence's, alone (transformers)."""
    path, hf = tiny_models[kind]
    model = load_model(path)
    ps = prompts(model, [3, 11, 1, 17])
    model.setup_cache(40, batch=4)
    feed = torch.randint(3, model.cfg.vocab_size, (4, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for b, p in enumerate(ps):  # each prompt into its own cache row
            last = model(torch.tensor([p]), 0, last_only=True, row=b)[0, -1]
            assert (last.float().log_softmax(-1) - hf_logprobs(hf, p)[-1]).abs().max().item() <= 1e-4
        for t in range(feed.shape[1]):
            pos = torch.tensor([len(p) + t for p in ps])
            keys = None if t % 2 else int(pos.max()) + 1  # the whole cache (static shapes) and a bounded read
            got = model.step(feed[:, t : t + 1], pos, keys)[:, -1].float().log_softmax(-1)  # (4, V)
            for b, p in enumerate(ps):
                ref = hf_logprobs(hf, p + feed[b, : t + 1].tolist())[-1]
                assert (got[b] - ref).abs().max().item() <= 1e-4, (b, t)


@pytest.mark.parametrize("kind", KINDS)
def test_decode_with_refills_equals_transformers_greedy(tiny_models, kind):
    """More prompts than slots, rows ending at different steps: each row's tokens and log-probabilities
    are those of its prompt alone (transformers' greedy generate and logits)."""
    path, hf = tiny_models[kind]
    model = load_model(path)
    ps = prompts(model)
    max_new = [5, 12, 1, 9, 3, 7, 10]
    seqs = [Sequence(p, n, GREEDY, want_logprobs=True) for p, n in zip(ps, max_new)]
    got: dict[int, list] = {i: [] for i in range(len(seqs))}
    index = {id(s): i for i, s in enumerate(seqs)}
    for seq, step in decode(model, seqs, slots=3, max_len=32, chunk=4):  # a small chunk: prompts over several steps
        got[index[id(seq)]].append(step)
    for i, (p, n) in enumerate(zip(ps, max_new)):
        ids = [s.id for s in got[i]]
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert ids == ref[0, len(p) :].tolist(), i
        lp = hf_logprobs(hf, p + ids[:-1])[len(p) - 1 :]  # (n, V): before each generated token
        assert (torch.stack([s.logprobs for s in got[i]]) - lp).abs().max().item() <= 1e-4, i


def test_batch_of_one_equals_generate(tiny_llama):
    model = load_model(tiny_llama)
    p = prompts(model)[1]
    alone = [s.id for s in generate(model, p, 10, GREEDY)]
    seq = Sequence(p, 10, GREEDY)
    assert [s.id for _, s in decode(model, [seq], slots=4, max_len=64)] == alone


def test_seeds_reproduce_whatever_else_is_in_the_batch(tiny_llama):
    """A sampled row draws only from its own generator: the same tokens alone and beside other rows."""
    model = load_model(tiny_llama)
    ps = prompts(model)
    settings = [SamplingSettings(temperature=1.0), SamplingSettings(temperature=0.7, top_k=5), GREEDY,
                SamplingSettings(temperature=1.3, top_p=0.8, repeat_penalty=1.2), SamplingSettings(temperature=1.0, min_p=0.1)]

    def seq(i: int, seed: int) -> Sequence:
        return Sequence(ps[i], 12, settings[i], torch.Generator().manual_seed(seed))

    alone = {i: [s.id for s in generate(model, ps[i], 12, settings[i], torch.Generator().manual_seed(100 + i))] for i in range(5)}
    for order in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0]):
        seqs = [seq(i, 100 + i) for i in order]
        got: dict[int, list[int]] = {}
        for s, step in decode(model, seqs, slots=3, max_len=40):
            got.setdefault(order[seqs.index(s)], []).append(step.id)
        assert got == alone
    assert alone[0] != [s.id for s in generate(model, ps[0], 12, settings[0], torch.Generator().manual_seed(7))]


def test_a_long_prompt_is_prefilled_in_chunks_between_steps(tiny_llama):
    """While a row decodes, a newcomer's long prompt goes in `chunk` tokens per step (the decoding row
    gets a token after each chunk), and the result is the same as prefilling it at once."""
    model = load_model(tiny_llama)
    a, b, long = prompts(model, [4, 5, 60])
    events = []
    real_forward = model.forward
    model.forward = lambda ids, *args, **kw: events.append(ids.shape[1]) or real_forward(ids, *args, **kw)
    seqs = [Sequence(a, 2, GREEDY), Sequence(b, 30, GREEDY), Sequence(long, 5, GREEDY)]
    out: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for s, step in decode(model, seqs, slots=2, max_len=80, chunk=16):
        out[seqs.index(s)].append(step.id)
        events.append(f"token {seqs.index(s)}")
    model.forward = real_forward
    # Both first prompts at once (nothing was decoding), then the long one 16 tokens at a time, row 1 on the move.
    assert events[:12] == [4, 5, "token 0", "token 1", "token 0", "token 1",
                           16, "token 1", 16, "token 1", 16, "token 1"]
    assert events[12:15] == [12, "token 2", "token 1"]
    assert out[1] == [s.id for s in generate(model, b, 30, GREEDY)]
    assert out[2] == [s.id for s in generate(model, long, 5, GREEDY)]


def test_consumer_ends_a_row_early_and_its_slot_is_refilled(tiny_llama):
    model = load_model(tiny_llama)
    ps = prompts(model)[:4]
    seqs = [Sequence(p, 20, GREEDY) for p in ps]
    counts = [0] * 4
    slots_used = []
    for s, step in decode(model, seqs, slots=2, max_len=40):
        i = seqs.index(s)
        counts[i] += 1
        if i in (0, 2) and counts[i] == 3:
            s.done = True  # as an EOS or a stop string would
        slots_used.append(i)
    assert counts == [3, 20, 3, 20]
    assert slots_used.index(2) < slots_used.index(3)  # the third prompt took the first freed slot


# --- requests: text, stops, EOS, order of completion ---------------------------------------------


def test_run_batch_texts_stops_and_eos_per_row(tiny_llama):
    model, tok = load_model(tiny_llama), Tokenizer(tiny_llama)
    texts = ["hello world", "a fluffy blue creature", "def main():", "Spaces:", "Summarize: attention"]
    alone = []
    for t in texts:
        g = Generation(model, tok, Request(tok.encode(t), 16, GREEDY), set())
        alone.append("".join(x.text for x in g))
    stop = alone[1][4:7]
    seq3 = [s.id for s in generate(model, tok.encode(texts[3]), 8, GREEDY)]
    at = next(i for i in range(1, 8) if seq3[i] not in seq3[:i])  # a token the row meets first at step `at`
    eos = {seq3[at]}
    reqs = [Request(tok.encode(t), 16, GREEDY, stops=[stop] if i == 1 else []) for i, t in enumerate(texts)]
    gens = [Generation(model, tok, r, eos if i == 3 else set()) for i, r in enumerate(reqs)]
    ended = []
    for g, token in run_batch(model, gens, slots=2, max_len=64):
        if token is None:
            ended.append(gens.index(g))
    assert sorted(ended) == list(range(5))
    assert gens[1].finish_reason == "stop" and gens[1].text == alone[1][: alone[1].index(stop)]
    assert gens[3].finish_reason == "eos" and gens[3].ids == seq3[: at + 1]
    for i in (0, 2, 4):
        assert gens[i].text == alone[i] and gens[i].finish_reason == "length"


def test_the_tail_of_a_batch_steps_only_the_rows_left(tiny_llama):
    """Once nothing waits, rows move down into freed slots: each step runs on as many rows as are decoding."""
    model = load_model(tiny_llama)
    ps = prompts(model)[:5]
    max_new = [3, 12, 6, 9, 2]
    seqs = [Sequence(p, n, GREEDY) for p, n in zip(ps, max_new)]
    sizes = []
    real_step = model.step
    model.step = lambda ids, *a: sizes.append(ids.shape[0]) or real_step(ids, *a)
    got: dict[int, list[int]] = {i: [] for i in range(5)}
    for s, step in decode(model, seqs, slots=4, max_len=40):
        got[seqs.index(s)].append(step.id)
    model.step = real_step
    assert got == {i: [t.id for t in generate(model, p, n, GREEDY)] for i, (p, n) in enumerate(zip(ps, max_new))}
    # 4 rows, then 3 once the fifth prompt has ended and the last row moved into its slot, then 2, and the
    # longest alone (slot 0: the plain one-row step) for its last three tokens.
    assert sizes == sorted(sizes, reverse=True) and {4, 3, 2} <= set(sizes) and sizes[-3:] == [1, 1, 1], sizes


def test_a_row_with_nan_logits_fails_alone_and_its_slot_is_refilled(tiny_llama):
    """NaN/inf logits in one row end that request with an error (its record in `attn batch`); the
    other rows, and the request that takes the freed slot, decode as they would alone."""
    from cli.batch import record
    from cli.requests import Item

    model, tok = load_model(tiny_llama), Tokenizer(tiny_llama)
    texts = ["hello world", "a fluffy blue creature", "def main():", "Spaces:"]
    gens = [Generation(model, tok, Request(tok.encode(t), 8, GREEDY), set()) for t in texts]
    calls = []
    real_step = model.step

    def step(ids, pos, keys=None):
        out = real_step(ids, pos, keys)
        calls.append(ids.shape[0])
        if len(calls) == 3:  # the third batched step: row 1 (the second request) overflows
            out[1] = float("nan")
        return out

    model.step = step
    for _ in run_batch(model, gens, slots=2, max_len=64):
        pass
    model.step = real_step
    assert gens[1].finish_reason == "error" and gens[1].error.step == 3 and len(gens[1].ids) == 3
    rec = record(Item(1, 2, "b"), gens[1])
    assert set(rec) == {"id", "line", "error"} and "NaN/inf logits at generation step 3" in rec["error"]
    for i in (0, 2, 3):
        alone = Generation(model, tok, Request(tok.encode(texts[i]), 8, GREEDY), set())
        assert "".join(t.text for t in alone) == gens[i].text and gens[i].finish_reason == "length", i
