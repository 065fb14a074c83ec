"""Generation: prefill the prompt, then one-token steps; yields token ids and never prints."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from model.compile import decode_step
from model.decoder import Decoder
from model.sampling import SamplingSettings, sample


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
    device = model.device
    total = len(prompt_ids) + max_new_tokens
    if model.cache_len < total:
        model.setup_cache(total)
    tokens = torch.empty(total, dtype=torch.long, device=device)  # prompt + generated, for the repeat penalty
    tokens[: len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
    pos = len(prompt_ids)
    logits = model(tokens[None, :pos], 0, last_only=True)[0, -1]
    step = decode_step(model)  # the compiled one-token step when `--compile` built one
    window = settings.repeat_last_n
    for i in range(max_new_tokens):
        recent = None
        if settings.repeat_penalty != 1.0 and window != 0:
            recent = tokens[: pos] if window < 0 else tokens[max(0, pos - window) : pos]
        # One reduction for the NaN/inf check (a sum of finite logits overflows only past 1e33 each);
        # sampling sees the logits with any NaN/inf zeroed so that it cannot fail before the error is raised.
        finite = torch.isfinite(logits.sum())
        tok = sample(logits.nan_to_num(0.0, 0.0, 0.0), settings, recent, generator)
        tid, ok = torch.stack([tok, finite.long()]).tolist()  # the one host sync per token
        if not ok:
            raise NonFiniteLogits(i)
        yield Step(tid, logits.float().log_softmax(-1) if want_logprobs else None)
        if i == max_new_tokens - 1:
            return
        tokens[pos] = tok
        logits = step(tokens[pos : pos + 1][None], pos)[0, -1]  # (1, 1): the same strides every step
        pos += 1
