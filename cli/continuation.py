"""Tokens sampled after a prompt, for the commands that then look at the whole text (inspect, explore)."""

from __future__ import annotations

from cli.models import Loaded
from cli.prompt import counted
from model.engine import Generation, Request, eos_ids
from model.errors import AttnError
from model.generate import NonFiniteLogits
from model.sampling import SamplingSettings


def run_generation(m: Loaded, ids: list[int], n: int, settings: SamplingSettings, seed: int, ignore_eos: bool, chat: bool = False) -> list[int]:
    """Sample up to n tokens after the prompt, stopping at end-of-sequence (the rule generate uses) unless told not to."""
    if len(ids) + n > m.cfg.max_len:
        raise AttnError(f"prompt ({counted(len(ids), chat)}) + --generate ({n}) exceeds the context ({m.cfg.max_len} tokens)")
    gen = Generation(m.model, m.tokenizer, Request(ids, n, settings, seed, ignore_eos=ignore_eos), eos_ids(m.cfg, m.tokenizer))
    try:
        return [tok.id for tok in gen if tok.id is not None]
    except NonFiniteLogits as e:
        raise AttnError(f"{e}; try --dtype float32") from None
