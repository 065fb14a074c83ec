"""Sampling: one pure function of logits, the settings, the recent tokens and a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.8  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repeat_penalty: float = 1.0  # 1 = off
    repeat_last_n: int = 64  # how many recent tokens the penalty looks at (0 = none, -1 = all)

    def check(self) -> list[str]:
        """Problems with these values, as the CLI words them."""
        bad = []
        if not 0 <= self.temperature < float("inf"):
            bad.append(f"--temp must be >= 0 and finite (got {self.temperature})")
        if self.top_k < 0:
            bad.append(f"--top-k must be >= 0 (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            bad.append(f"--top-p must be in (0, 1] (got {self.top_p})")
        if not 0 <= self.min_p <= 1:
            bad.append(f"--min-p must be in [0, 1] (got {self.min_p})")
        if not 0 < self.repeat_penalty < float("inf"):
            bad.append(f"--repeat-penalty must be > 0 and finite (got {self.repeat_penalty})")
        if self.repeat_last_n < -1:
            bad.append(f"--repeat-last-n must be >= -1 (got {self.repeat_last_n})")
        return bad


def apply_repeat_penalty(logits: torch.Tensor, recent: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens seen recently: positive logits divided, negative multiplied."""
    if penalty == 1.0 or recent.numel() == 0:
        return logits
    seen = logits.gather(-1, recent)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, recent, seen)


def filter_logits(logits: torch.Tensor, s: SamplingSettings) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p (in that order); removed tokens get -inf. logits: (…, V), per row."""
    # Shift so the top logit is 0 first: a tiny temperature then sends the rest to -inf, never to +inf/NaN.
    logits = (logits - logits.max(-1, keepdim=True).values) / s.temperature
    if s.top_k > 0 and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p; the top token always stays.
        drop = (probs.cumsum(-1) - probs) >= s.top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if s.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < s.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, s: SamplingSettings, recent: torch.Tensor | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token id (a 0-d tensor, no host sync) from logits (V,)."""
    return sample_rows(logits[None], [s], [recent], [generator])[0]


def sample_rows(
    logits: torch.Tensor,
    settings: list[SamplingSettings],
    recent: list[torch.Tensor | None],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V), each row with its own settings, recent tokens and generator.

    Row b's token is the one `sample` gives for that row alone, whatever the other rows hold: rows
    with equal settings are filtered together (the same per-row arithmetic), and each row draws
    its noise from its own generator, so a request's seed reproduces its text in any batch.
    """
    logits = logits.float()
    penalized = [b for b, (s, r) in enumerate(zip(settings, recent)) if r is not None and s.repeat_penalty != 1.0]
    if penalized:
        logits = logits.clone()  # the caller's logits stay as they were (log-probabilities are of the raw ones)
        for b in penalized:
            logits[b] = apply_repeat_penalty(logits[b], recent[b], settings[b].repeat_penalty)
    # Greedy for every row first (0 is greedy; so is its limit, below what float32 logits can resolve);
    # max's first-of-ties index, 25 µs against argmax's 75 on a 49k vocabulary (CPU).
    out = logits.max(-1).indices
    groups: dict[SamplingSettings, list[int]] = {}
    for b, s in enumerate(settings):
        if s.temperature >= 1e-6:
            groups.setdefault(s, []).append(b)
    for s, rows in groups.items():
        idx = torch.tensor(rows, device=logits.device)
        probs = filter_logits(logits[idx], s).softmax(-1)  # (n, V)
        # torch.multinomial(p, 1) is argmax(p / q) with q ~ Exp(1) drawn for every token; drawn here
        # row by row from each row's own generator, it gives the same token multinomial gives.
        q = torch.empty_like(probs)
        for j, b in enumerate(rows):
            q[j].exponential_(1, generator=generators[b])
        out[idx] = (probs / q).argmax(-1)
    return out
