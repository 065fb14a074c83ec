"""Generation: prompts decoded together, one per row ("slot") of the KV cache; yields token ids and never prints.

A `Sequence` is a prompt and how to sample after it. `decode` keeps up to `slots` of them in the
cache at once and gives a slot to the next waiting prompt as soon as its sequence ends
(continuous batching); the cache is set up once and its rows are reused. Each iteration

1. prefills waiting prompts into their rows — all of them while no row is decoding, else at most
   `chunk` tokens, so a long prompt holds up the decoding rows for one chunk at a time;
2. runs one step for every decoding row at once, each row at its own position (`Decoder.step`
   with a (B,) position tensor; a batch of one uses the plain integer position, and the compiled
   step when `--compile` built one);
3. samples every row with its own settings and generator (`sample_rows`) and reads the tokens
   back with one host sync.

Why per-row positions rather than left padding: rows join at any step, and with left padding
every row would need its cache shifted to line up with the newcomer's; with per-row positions a
row keeps its own positions 0.. and its own causal (and sliding-window) mask, so what it attends
to is exactly what it would attend to alone. Rows in a step's range that are not decoding (a
slot being prefilled, or free) carry a dummy token at the cache's last position, which no real
row ever reads; once no prompt waits, the last rows move down into free slots, so the steps of
the batch's tail run on as many rows as are left.

A single prompt is a batch of one: `generate`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from model.compile import decode_step
from model.decoder import Decoder
from model.sampling import SamplingSettings, sample_rows

PREFILL_CHUNK = 256  # prompt tokens prefilled per step while other rows decode: ≈ 0.7 s of prefill on 2 CPU cores (not tuned)


class NonFiniteLogits(ArithmeticError):
    """The model produced NaN or infinite logits (e.g. float16 overflow)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"the model produced NaN/inf logits at generation step {step}")
        self.step = step


@dataclass
class Step:
    """One generated token: its id, and (when asked) the log-probabilities it was drawn from."""

    id: int
    logprobs: torch.Tensor | None = None  # (V,) log-softmax of the raw logits


@dataclass(eq=False)
class Sequence:
    """A prompt and how to continue it. Whoever consumes `decode` sets `done` to end it early (EOS, a stop string)."""

    prompt_ids: list[int]
    max_new_tokens: int
    settings: SamplingSettings
    generator: torch.Generator | None = None  # on the model's device; None: the global one
    want_logprobs: bool = False
    done: bool = False
    error: NonFiniteLogits | None = None  # why it ended, when it ended on NaN/inf logits


@dataclass(eq=False)
class _Row:
    """A sequence in its cache row: how much of the prompt is in, the token to feed next."""

    seq: Sequence
    slot: int
    order: int  # admission order: the oldest waiting prompt is prefilled first
    prefilled: int = 0
    generated: int = 0
    last: int | None = None  # sampled, not yet in the cache: the next step feeds it at `pos`
    history: list[int] = field(default_factory=list)  # prompt + generated, for the repeat penalty

    @property
    def pos(self) -> int:
        return len(self.seq.prompt_ids) + self.generated - 1


@torch.inference_mode()
def generate(
    model: Decoder,
    prompt_ids: list[int],
    max_new_tokens: int,
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
    want_logprobs: bool = False,
) -> Iterator[Step]:
    """Sample up to `max_new_tokens` tokens after `prompt_ids`. The caller stops early by not asking for more."""
    seq = Sequence(prompt_ids, max_new_tokens, settings, generator, want_logprobs)
    for _, step in decode(model, [seq], slots=1, max_len=len(prompt_ids) + max_new_tokens):
        if step is None:
            raise seq.error
        yield step


@torch.inference_mode()
def decode(
    model: Decoder, sequences: Iterable[Sequence], slots: int, max_len: int, chunk: int = PREFILL_CHUNK
) -> Iterator[tuple[Sequence, Step | None]]:
    """Decode `sequences` (taken in order as slots free up), `slots` at a time, in a cache of `max_len`
    positions (≥ every prompt + its max_new_tokens). Yields (sequence, its next token) as tokens are
    sampled, and (sequence, None) when a sequence ends on NaN/inf logits (its `error` says which step)."""
    if model.cache_len < max_len or model.cache_rows < slots:
        model.setup_cache(max(max_len, model.cache_len if model.cache_rows >= slots else 0), slots)
    device, scratch = model.device, model.cache_len - 1  # no sequence reaches the last position (see _admit)
    step_one = decode_step(model)  # the compiled one-token step when `--compile` built one
    rows: list[_Row | None] = [None] * slots
    waiting, order, drained = iter(sequences), itertools.count(), False
    while True:
        for r in rows:  # ended by the consumer since the last step
            if r is not None and r.seq.done:
                rows[r.slot] = None
        for slot in range(slots):
            if rows[slot] is None and not drained:
                seq = next(waiting, None)
                if seq is None:
                    drained = True
                    break
                rows[slot] = _admit(model, seq, slot, next(order))
        if drained:
            _compact(model, rows)
        live = [r for r in rows if r is not None]
        if not live:
            return
        ready: list[tuple[_Row, torch.Tensor]] = []  # rows whose next token's logits (V,) are at hand
        decoding = [r for r in live if r.last is not None]

        budget = chunk if decoding else None
        for r in sorted((r for r in live if r.last is None), key=lambda r: r.order):
            prompt = r.seq.prompt_ids
            n = len(prompt) - r.prefilled if budget is None else min(len(prompt) - r.prefilled, budget)
            if n <= 0:
                break
            x = torch.tensor(prompt[r.prefilled : r.prefilled + n], dtype=torch.long, device=device)[None]  # (1, n)
            logits = model(x, r.prefilled, last_only=True, row=r.slot)  # (1, 1, V)
            r.prefilled += n
            if budget is not None:
                budget -= n
            if r.prefilled == len(prompt):
                ready.append((r, logits[0, -1]))

        if decoding:
            n = max(r.slot for r in decoding) + 1  # rows 0..n-1 step together
            if n == 1:
                r = decoding[0]
                x = torch.tensor([[r.last]], dtype=torch.long, device=device)  # (1, 1)
                ready.append((r, step_one(x, r.pos)[0, -1]))
            else:
                ids, pos = [0] * n, [scratch] * n
                for r in decoding:
                    ids[r.slot], pos[r.slot] = r.last, r.pos
                keys = max(r.pos for r in decoding) + 1
                x = torch.tensor(ids, dtype=torch.long, device=device)[:, None]  # (n, 1)
                logits = model.step(x, torch.tensor(pos, dtype=torch.long, device=device), keys)  # (n, 1, V)
                ready += [(r, logits[r.slot, -1]) for r in decoding]
        if not ready:
            continue

        logits = torch.stack([lg for _, lg in ready])  # (m, V)
        # One reduction per row for the NaN/inf check (a sum of finite logits overflows only past 1e33 each);
        # sampling sees the logits with any NaN/inf zeroed so that it cannot fail before the error is raised.
        finite = torch.isfinite(logits.sum(-1))
        seqs = [r.seq for r, _ in ready]
        tok = sample_rows(
            logits.nan_to_num(0.0, 0.0, 0.0), [s.settings for s in seqs], [_recent(r, device) for r, _ in ready], [s.generator for s in seqs]
        )
        tids, oks = torch.stack([tok, finite.long()]).tolist()  # the one host sync per step
        for (r, lg), tid, ok in zip(ready, tids, oks):
            seq = r.seq
            if not ok:
                seq.error, seq.done, rows[r.slot] = NonFiniteLogits(r.generated), True, None
                yield seq, None
                continue
            r.generated += 1
            yield seq, Step(tid, lg.float().log_softmax(-1) if seq.want_logprobs else None)
            if seq.done or r.generated == seq.max_new_tokens:
                seq.done, rows[r.slot] = True, None
            else:
                r.last = tid
                r.history.append(tid)


def _admit(model: Decoder, seq: Sequence, slot: int, order: int) -> _Row:
    if not seq.prompt_ids or seq.max_new_tokens < 1:
        raise ValueError("a sequence needs a prompt and at least one new token")
    if len(seq.prompt_ids) + seq.max_new_tokens > model.cache_len:
        raise ValueError(f"prompt ({len(seq.prompt_ids)}) + new tokens ({seq.max_new_tokens}) exceed the cache of {model.cache_len}")
    # The last token sampled is never fed back: positions go up to prompt + max_new_tokens - 2 at most,
    # so the cache's last position is free for the dummy rows of a step (decode's `scratch`).
    return _Row(seq, slot, order, history=list(seq.prompt_ids))


def _compact(model: Decoder, rows: list[_Row | None]) -> None:
    """Move the highest rows into the free slots below them (their cache rows with them)."""
    while True:
        taken = [r.slot for r in rows if r is not None]
        free = [s for s, r in enumerate(rows) if r is None]
        if not taken or not free or free[0] > max(taken):
            return
        r, hole = rows[max(taken)], free[0]
        length = r.prefilled if r.last is None else r.pos  # positions in the cache so far
        for block in model.layers:
            block.attn.cache.move_row(r.slot, hole, length)
        rows[hole], rows[r.slot], r.slot = r, None, hole


def _recent(r: _Row, device: torch.device) -> torch.Tensor | None:
    """The tokens the repeat penalty looks at for this row (None when it is off)."""
    s = r.seq.settings
    if s.repeat_penalty == 1.0 or s.repeat_last_n == 0:
        return None
    h = r.history if s.repeat_last_n < 0 else r.history[-s.repeat_last_n :]
    return torch.tensor(h, dtype=torch.long, device=device)
