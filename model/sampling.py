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
        if not self.temperature >= 0:
            bad.append(f"--temp must be >= 0 (got {self.temperature})")
        if self.top_k < 0:
            bad.append(f"--top-k must be >= 0 (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            bad.append(f"--top-p must be in (0, 1] (got {self.top_p})")
        if not 0 <= self.min_p <= 1:
            bad.append(f"--min-p must be in [0, 1] (got {self.min_p})")
        if not self.repeat_penalty > 0:
            bad.append(f"--repeat-penalty must be > 0 (got {self.repeat_penalty})")
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
    """Temperature, then top-k, top-p, min-p (in that order); removed tokens get -inf. logits: (V,)."""
    # Shift so the top logit is 0 first: a tiny temperature then sends the rest to -inf, never to +inf/NaN.
    logits = (logits - logits.max()) / s.temperature
    if s.top_k > 0 and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p; the top token always stays.
        drop = (probs.cumsum(-1) - probs) >= s.top_p
        drop[0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if s.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < s.min_p * probs.max(), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, s: SamplingSettings, recent: torch.Tensor | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token id (a 0-d tensor, no host sync) from logits (V,)."""
    logits = logits.float()
    if recent is not None:
        logits = apply_repeat_penalty(logits, recent, s.repeat_penalty)
    if s.temperature < 1e-6:  # 0 is greedy; so is its limit, below what float32 logits can resolve
        return logits.max(-1).indices  # argmax's first-of-ties index; 25 µs against argmax's 75 on a 49k vocabulary (CPU)
    probs = filter_logits(logits, s).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[0]
