"""The generation loop every command drives: requests in, token events and finished records out.

`decode` (model/generate.py) samples token ids for many prompts at once, one per KV-cache row;
a `Generation` turns one request's ids into what a user asked for: text through `DecodeStream`,
end-of-sequence by one rule (`eos_ids`), stop strings matched on the text and held back while
partial, optional log-probabilities, and the timings `--json` and `--stats` report. `run_batch`
drives many generations through one `decode` (`attn batch`, `attn bench --batch`); iterating a
single `Generation` runs it as a batch of one (`generate`, `inspect --generate`, `bench`). It
never prints: commands iterate it and render what it yields.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from model.config import ModelConfig
from model.decoder import Decoder
from model.generate import PREFILL_CHUNK, NonFiniteLogits, Sequence, Step, decode
from model.sampling import SamplingSettings
from model.tokenizer import TextStream, Tokenizer


def eos_ids(cfg: ModelConfig, tokenizer: Tokenizer) -> set[int]:
    """The one end-of-sequence rule: the config's and generation_config's ids, and the tokenizer's EOS token."""
    ids = set(cfg.eos_token_ids)
    if tokenizer.eos_token is not None:
        tid = tokenizer.tk.token_to_id(tokenizer.eos_token)
        if tid is not None:
            ids.add(tid)
    return ids


@dataclass
class Request:
    """What to generate after a prompt, and when to stop."""

    prompt_ids: list[int]
    max_new_tokens: int
    settings: SamplingSettings
    seed: int = 0
    stops: list[str] = field(default_factory=list)  # stop strings, matched on the generated text
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; K ≥ 0: each token's log-probability and the top K alternatives


@dataclass
class Token:
    """One generated token: its id, the text that became visible with it, its log-probabilities if asked."""

    id: int | None  # None: text held back for a stop string that never completed, released at the end
    text: str  # may be "" (a multi-byte character not yet complete, or text held back by a stop string)
    logprob: dict | None = None


class Generation:
    """One request through the model. Iterate it for `Token`s (a batch of one), or pass many to
    `run_batch`; afterwards (or after an interruption, see `interrupted`) `finish_reason`, `text`,
    `stop_sequence` and the timings describe the run, and `error` says why it failed, if it did."""

    def __init__(self, model: Decoder, tokenizer: Tokenizer, request: Request, eos: set[int]) -> None:
        self.model, self.tokenizer, self.request = model, tokenizer, request
        self.eos = set() if request.ignore_eos else eos
        self.stops = StopStrings(request.stops)
        self.pieces: list[str] = []
        self.ids: list[int] = []  # generated ids, EOS and stop-string tokens included
        self.logprobs: list[dict] = []
        self.finish_reason = "length"
        self._text: TextStream | None = None  # the generated text as it streams (from `_start`)
        self.error: NonFiniteLogits | None = None
        self.t0 = self.t_first = self.t_end = 0.0

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def stop_sequence(self) -> str | None:
        return self.stops.matched

    def __iter__(self) -> Iterator[Token]:
        max_len = len(self.request.prompt_ids) + self.request.max_new_tokens
        try:
            for _, tok in run_batch(self.model, [self], slots=1, max_len=max_len):
                if tok is not None:
                    yield tok
        finally:
            if not self.t_end:  # stopped early by the caller
                self._end()
        if self.error is not None:
            raise self.error

    def _start(self) -> Sequence:
        """The token-level sequence of this request, as it takes a cache row (its clock starts)."""
        req = self.request
        self.t0 = time.perf_counter()
        self._text = self.tokenizer.stream(req.prompt_ids)
        generator = torch.Generator(device=self.model.device).manual_seed(req.seed)
        self.seq = Sequence(req.prompt_ids, req.max_new_tokens, req.settings, generator, req.logprobs is not None)
        return self.seq

    def _accept(self, step: Step) -> list[Token]:
        """What one sampled token shows; ends the sequence (`seq.done`) at EOS, a stop string or the length."""
        self.ids.append(step.id)
        if len(self.ids) == 1:
            self.t_first = time.perf_counter()
        out = []
        if step.id in self.eos:
            self.finish_reason = "eos"
        else:
            visible = self.stops.push(self._text.push(step.id))
            lp = self._logprob_entry(step.id, step.logprobs) if step.logprobs is not None else None
            if lp is not None:
                self.logprobs.append(lp)
            self.pieces.append(visible)
            out.append(Token(step.id, visible, lp))
            if self.stops.matched is not None:
                self.finish_reason = "stop"
        if self.finish_reason != "length" or len(self.ids) == self.request.max_new_tokens:
            self.seq.done = True
            if self.stops.matched is None:
                rest = self._held()
                if rest:
                    self.pieces.append(rest)
                    out.append(Token(None, rest))
            self._end()
        return out

    def interrupted(self) -> str:
        """Record that the caller stopped the run (Ctrl-C); returns the text held back for a stop string,
        which now stands as part of the output."""
        self.finish_reason = "interrupted"
        self._end()
        rest = self._held() if self.stops.matched is None else ""
        if rest:
            self.pieces.append(rest)
        return rest

    def _held(self) -> str:
        """At the end, the text held back: by the decoder (a U+FFFD token, a character cut by the end) and for a
        stop string that never completed."""
        tail = self._text.flush() if self._text is not None else ""
        visible = self.stops.push(tail) if tail else ""
        if self.stops.matched is not None:  # completed by that text
            if self.finish_reason != "interrupted":
                self.finish_reason = "stop"
            return visible
        return visible + self.stops.flush()

    def _end(self) -> None:
        self.t_end = time.perf_counter()
        if not self.ids:
            self.t_first = self.t_end

    def _logprob_entry(self, token_id: int, lp: torch.Tensor) -> dict:
        tk = self.tokenizer
        entry = {"id": token_id, "text": tk.token_label(token_id), "logprob": float(lp[token_id]), "bytes": list(tk.token_bytes(token_id))}
        k = self.request.logprobs
        if k:
            top = torch.topk(lp, k)
            entry["top_logprobs"] = [
                {"id": int(i), "text": tk.token_label(int(i)), "logprob": float(v), "bytes": list(tk.token_bytes(int(i)))}
                for v, i in zip(top.values.tolist(), top.indices.tolist())
            ]
        return entry

    def timings(self) -> dict[str, float]:
        """Prefill (to the first token) and decode (the rest) in ms and tokens per second."""
        prompt_ms = (self.t_first - self.t0) * 1e3
        decode_ms = (self.t_end - self.t_first) * 1e3
        decoded = max(len(self.ids) - 1, 0)
        n_prompt = len(self.request.prompt_ids)
        return {
            "ttft_ms": prompt_ms,
            "prompt_ms": prompt_ms,
            "prompt_tps": n_prompt / (prompt_ms / 1e3) if prompt_ms > 0 else 0.0,
            "decode_ms": decode_ms,
            "decode_tps": decoded / (decode_ms / 1e3) if decode_ms > 0 and decoded else 0.0,
            "run_ms": (self.t_end - self.t0) * 1e3,
        }


def run_batch(
    model: Decoder, generations: Iterable[Generation], slots: int, max_len: int, chunk: int = PREFILL_CHUNK
) -> Iterator[tuple[Generation, Token | None]]:
    """Run `generations` through one `decode`, `slots` at a time in a cache of `max_len` positions
    (≥ every prompt + its max tokens), taking them in order as slots free up. Yields (generation,
    token) as text appears and (generation, None) once a generation has ended (finished, or failed:
    its `error`). Stopping the iteration (Ctrl-C) leaves the unfinished ones as they are: see `interrupted`."""
    running: dict[Sequence, Generation] = {}

    def admitted() -> Iterator[Sequence]:
        for g in generations:
            seq = g._start()
            running[seq] = g
            yield seq

    steps = decode(model, admitted(), slots, max_len, chunk)
    try:
        for seq, step in steps:
            g = running[seq]
            if step is None:
                g.error, g.finish_reason = seq.error, "error"
                g._end()
            else:
                for tok in g._accept(step):
                    yield g, tok
            if seq.done:
                del running[seq]
                yield g, None
    finally:
        steps.close()


class StopStrings:
    """Matches stop strings on the streamed text: text that may be the start of one is held back."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.matched: str | None = None

    def push(self, chunk: str) -> str:
        """Text that is safe to show now; sets `matched` (and returns the text before it) on a stop."""
        self.pending += chunk
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            at, self.matched = min(hits)
            out, self.pending = self.pending[:at], ""
            return out
        keep = next((i for i in range(len(self.pending)) if any(s.startswith(self.pending[i:]) for s in self.stops)), None)
        if keep is None:
            out, self.pending = self.pending, ""
        else:
            out, self.pending = self.pending[:keep], self.pending[keep:]
        return out

    def flush(self) -> str:
        """What was held back, when generation ends without completing a stop string."""
        out, self.pending = self.pending, ""
        return out
