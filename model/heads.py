"""What every head does, in numbers: attention measures over a sequence and head-detector scores.

Measures, over the rows i of each head's attention pattern α (row 0 left out: it can only see itself):

    entropy   mean_i −Σ_j α_ij log2 α_ij                      (bits)
    distance  mean_i Σ_j α_ij (i − j)                          (tokens)
    first     mean_i α_i0                                      the "attention sink"
    previous  mean_{i≥2} α_i,i−1                               row 1 left out: its previous token is the first
    self      mean_i α_ii

Detectors say whether a head *is* of a kind. Duplicate-token and induction follow TransformerLens's
`detect_head` ("mul" measure): a detection pattern marks the keys a head of that kind would attend to,
and the score is the attention on those keys, averaged over the rows where the pattern marks any key
(a perfect head scores 1): duplicate-token (earlier copies of token i), induction (the token after an
earlier copy of token i), measured on a random token sequence repeated twice (Olsson et al. 2022, "In-
context learning and induction heads"), which `induction_sequence` builds. The previous-token
detector is the share of the attention *not* parked on the first token that goes to the previous one,

    previous_token  Σ_{i≥2} α_i,i−1 / Σ_{i≥2} Σ_{j≥1} α_ij

so a head that also sinks most of its weight scores as the previous-token head it is (`previous`
gives the raw share), and a head with under 1% of its weight off the first token gets NaN: what is
left is too little to say anything (the same rule as inspect --skip-first).

Patterns are reduced layer by layer inside the probe, so memory stays at one layer's (H, T, T).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.decoder import Attention, Decoder

MEASURES = ("entropy", "distance", "first", "previous", "self")
DETECTORS = ("previous_token", "duplicate_token", "induction")
SINK_ONLY = 0.01  # previous_token is NaN for a head with less than this share of its weight off the first token


@dataclass
class HeadStats:
    """Per (layer, head) measures (L, H) tensors; a detector that was not run is None."""

    entropy: torch.Tensor
    distance: torch.Tensor
    first: torch.Tensor
    previous: torch.Tensor
    self_: torch.Tensor
    previous_token: torch.Tensor | None = None
    duplicate_token: torch.Tensor | None = None
    induction: torch.Tensor | None = None

    def get(self, name: str) -> torch.Tensor | None:
        return getattr(self, "self_" if name == "self" else name)


# --- detection patterns: (T, T) float masks, row i marks the keys a head of that kind attends to ---


def duplicate_pattern(ids: list[int]) -> torch.Tensor:
    t = torch.tensor(ids)
    same = t[:, None] == t[None, :]
    return (same & torch.ones(len(ids), len(ids), dtype=torch.bool).tril(-1)).float()


def induction_pattern(ids: list[int]) -> torch.Tensor:
    """Row i marks j+1 for every earlier copy j of token i (j+1 < i: the token that followed it)."""
    dup = duplicate_pattern(ids)  # (T, T): [i, j] = token j is an earlier copy of token i
    shifted = torch.zeros_like(dup)
    shifted[:, 1:] = dup[:, :-1]
    return shifted * torch.ones_like(dup).tril(-1)  # the follower must itself be in the past


def previous_token_score(w: torch.Tensor) -> torch.Tensor:
    """Σ_{i≥2} α_i,i−1 / Σ_{i≥2} Σ_{j≥1} α_ij per head, NaN where that denominator is under SINK_ONLY per row: (H, T, T) → (H,)."""
    T = w.shape[-1]
    i = torch.arange(2, T)
    w = w.double()
    prev = w[:, i, i - 1].sum(-1)
    off_first = w[:, 2:, 1:].sum((-2, -1))  # summed, not 1 − α_i0: exact when the first token takes ≈ all
    score = prev / off_first.clamp_min(1e-300)
    return torch.where(off_first >= SINK_ONLY * (T - 2), score, torch.full_like(score, float("nan"))).float()


def detector_score(weights: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor | None:
    """Mean attention on the pattern's keys over rows where it marks any: (..., T, T), (T, T) → (...)."""
    rows = pattern.sum(-1) > 0
    if not rows.any():
        return None
    return (weights * pattern).sum(-1)[..., rows].mean(-1)


# --- the probe -------------------------------------------------------------------------------------


class PatternProbe:
    """A Probe on every layer: full attention patterns of all heads, reduced at once to measures."""

    def __init__(self, n_layers: int, ids: list[int], detectors: bool) -> None:
        self.layers = frozenset(range(n_layers))
        self.patterns = {}
        self.detectors = detectors
        if detectors:
            self.patterns = {"duplicate_token": duplicate_pattern(ids), "induction": induction_pattern(ids)}
        self.out: dict[str, list[torch.Tensor | None]] = {}

    def observe(self, layer: int, attn: Attention, q, k, v, start: int) -> None:
        T = q.shape[2]
        pos = torch.arange(start, start + T, device=q.device)
        w = attn.scores(q, k, pos).softmax(-1)[0].cpu()  # (H, T, S), rows sum to 1
        # A sliding window hides the oldest keys: a measure or detector only counts keys the head can see.
        visible = attn.visible(pos, k.shape[2]).cpu()  # (T, S)
        detected = {n: detector_score(w, p * visible) for n, p in self.patterns.items()}
        if self.detectors:
            detected["previous_token"] = previous_token_score(w)  # masked keys have weight 0: nothing to mask
        for name, value in {**pattern_measures(w, visible), **detected}.items():
            self.out.setdefault(name, []).append(value)


def pattern_measures(w: torch.Tensor, visible: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The five measures of patterns (H, T, T), averaged over rows 1..T-1 (`previous`: rows 2..T-1).

    `visible` (T, T) is the layer's mask: with a sliding window, the first-token share is averaged
    over the rows that can still see the first token (elsewhere it is masked, not a zero share).
    """
    T = w.shape[-1]
    i = torch.arange(T)
    rows = w[:, 1:]  # (H, T-1, T)
    dist = (i[:, None] - i[None, :]).clamp_min(0).float()[1:]  # (T-1, T)
    sees_first = visible[1:, 0] if visible is not None else torch.ones(T - 1, dtype=torch.bool)
    return {
        "entropy": -(rows * torch.log2(rows.clamp_min(1e-30))).sum(-1).mean(-1),
        "distance": (rows * dist).sum(-1).mean(-1),
        "first": rows[:, sees_first, 0].mean(-1),
        "previous": w[:, i[2:], i[2:] - 1].mean(-1),
        "self": w[:, i[1:], i[1:]].mean(-1),
    }


@torch.inference_mode()
def head_patterns(model: Decoder, ids: list[int], detectors: bool = True) -> dict[str, torch.Tensor | None]:
    """One forward pass over `ids`: every measure (and detector, if asked) as an (L, H) tensor, or None."""
    if len(ids) < 3:
        raise ValueError("need at least three tokens")
    probe = PatternProbe(model.cfg.n_layers, ids, detectors)
    if model.cache_len < len(ids):
        model.setup_cache(len(ids))
    model(torch.tensor([ids], device=model.device), 0, probe=probe)
    return {n: None if any(v is None for v in vs) else torch.stack(vs) for n, vs in probe.out.items()}


def induction_sequence(candidates: list[int], length: int, seed: int, prefix: list[int] | None = None) -> list[int]:
    """`prefix` + `length` distinct random tokens from `candidates`, then the same tokens again."""
    if length > len(candidates):
        raise ValueError(f"only {len(candidates)} candidate tokens for a sequence of {length}")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(candidates), generator=g)[:length]
    half = [candidates[i] for i in pick.tolist()]
    return list(prefix or []) + half + half


def head_stats(
    model: Decoder, ids: list[int] | None, probe_ids: list[int] | None
) -> HeadStats:
    """Measures over `ids` (or the probe when there are none); detectors on the probe when given, else on `ids`.

    Induction is reported only from the probe: on free text, accidental repeats make it noise.
    """
    main = head_patterns(model, ids if ids is not None else probe_ids, detectors=probe_ids is None or ids is None)
    det = main
    if probe_ids is not None and ids is not None:
        det = head_patterns(model, probe_ids, detectors=True)
    return HeadStats(
        entropy=main["entropy"],
        distance=main["distance"],
        first=main["first"],
        previous=main["previous"],
        self_=main["self"],
        previous_token=det.get("previous_token"),
        duplicate_token=det.get("duplicate_token"),
        induction=det.get("induction") if probe_ids is not None else None,
    )
