"""Tokens sampled after a prompt, for the commands that then look at the whole text (inspect, explore)."""

from __future__ import annotations

import torch

from cli.models import Loaded
from model.errors import AttnError
from model.generate import NonFiniteLogits, generate
from model.sampling import SamplingSettings


def run_generation(m: Loaded, ids: list[int], n: int, settings: SamplingSettings, seed: int, ignore_eos: bool) -> list[int]:
    """Sample up to n tokens after the prompt (stopping at end-of-sequence unless told not to)."""
    if len(ids) + n > m.cfg.max_len:
        raise AttnError(f"prompt ({len(ids)} tokens) + --generate ({n}) exceeds the context ({m.cfg.max_len} tokens)")
    eos = set(m.cfg.eos_token_ids)
    generator = torch.Generator(device=m.device).manual_seed(seed)
    new: list[int] = []
    steps = generate(m.model, ids, n, settings, generator)
    try:
        for step in steps:
            if step.id in eos and not ignore_eos:
                break
            new.append(step.id)
    except NonFiniteLogits as e:
        raise AttnError(f"{e}; try --dtype float32") from None
    finally:
        steps.close()
    return new
