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

Every measure is kept as sums over rows (`Moments`), so the same numbers come out for one prompt
and for a dataset: over many prompts (`head_stats` with a list) each is the mean over all rows of
all prompts, with its spread (standard deviation over those rows) and the number of rows. The
previous-token detector, a ratio of sums, is the mean of the per-row ratios α_i,i−1 / Σ_{j≥1} α_ij
weighted by their denominators (the same number), and its spread is weighted alike. The prompts
run in batches, right-padded: causal attention never lets a real token see the padding after it,
and the padding's own rows are left out.

Patterns are reduced layer by layer inside the probe, so memory stays at one layer's (B, H, T, T).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.decoder import Attention, Decoder

MEASURES = ("entropy", "distance", "first", "previous", "self")
DETECTORS = ("previous_token", "duplicate_token", "induction")
SINK_ONLY = 0.01  # previous_token is NaN for a head with less than this share of its weight off the first token


@dataclass
class HeadStats:
    """Per (layer, head) measures (L, H) tensors; a detector that was not run is None.

    `sd` holds each measure's standard deviation over the rows it averages, `n` how many rows
    that is per layer (L,); `prompts` and `tokens` say what the rows came from.
    """

    entropy: torch.Tensor
    distance: torch.Tensor
    first: torch.Tensor
    previous: torch.Tensor
    self_: torch.Tensor
    previous_token: torch.Tensor | None = None
    duplicate_token: torch.Tensor | None = None
    induction: torch.Tensor | None = None
    sd: dict[str, torch.Tensor] = field(default_factory=dict)
    n: dict[str, torch.Tensor] = field(default_factory=dict)
    prompts: int = 1
    tokens: int = 0

    def get(self, name: str) -> torch.Tensor | None:
        return getattr(self, "self_" if name == "self" else name)


class Moments:
    """Sums over rows of attention patterns, per (layer, head): a measure's (weighted) mean and spread.

    `floor`: the mean is NaN where the rows' total weight is under floor × their number (the
    previous-token detector's SINK_ONLY rule).
    """

    def __init__(self, L: int, H: int, floor: float | None = None) -> None:
        self.floor = floor
        self.n = torch.zeros(L, dtype=torch.long)  # rows
        self.w = torch.zeros(L, H, dtype=torch.float64)  # Σ weight (the rows, unweighted)
        self.s = torch.zeros(L, H, dtype=torch.float64)  # Σ weight · value
        self.ss = torch.zeros(L, H, dtype=torch.float64)  # Σ weight · value²

    def add(self, layer: int, values: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """values (H, R): the measure on R rows of one prompt; weights (H, R) when they are weighted."""
        v = values.double()
        w = torch.ones_like(v) if weights is None else weights.double()
        self.n[layer] += v.shape[-1]
        self.w[layer] += w.sum(-1)
        self.s[layer] += (w * v).sum(-1)
        self.ss[layer] += (w * v * v).sum(-1)

    def merge(self, other: Moments) -> None:
        for name in ("n", "w", "s", "ss"):
            getattr(self, name).add_(getattr(other, name))

    def mean(self) -> torch.Tensor | None:
        """(L, H) float32, or None when some layer had no rows (a detector with nothing to score)."""
        if (self.n == 0).any():
            return None
        mean = self.s / self.w.clamp_min(1e-300)
        if self.floor is not None:
            mean = torch.where(self.w >= self.floor * self.n[:, None], mean, torch.full_like(mean, float("nan")))
        return mean.float()

    def sd(self) -> torch.Tensor | None:
        """Standard deviation over the rows (weighted alike), (L, H)."""
        if (self.n == 0).any():
            return None
        w = self.w.clamp_min(1e-300)
        mean = self.s / w
        return (self.ss / w - mean * mean).clamp_min(0).sqrt().float()


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


def previous_token_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows i ≥ 2 of patterns (H, T, T): the ratios α_i,i−1 / Σ_{j≥1} α_ij and their weights Σ_{j≥1} α_ij, (H, T-2) each.

    Their weighted mean is Σ_i α_i,i−1 / Σ_i Σ_{j≥1} α_ij (the previous-token detector); the
    denominator is summed, not 1 − α_i0: exact when the first token takes ≈ all.
    """
    T = w.shape[-1]
    i = torch.arange(2, T)
    w = w.double()
    off_first = w[:, 2:, 1:].sum(-1)  # (H, T-2)
    return w[:, i, i - 1] / off_first.clamp_min(1e-300), off_first


def previous_token_score(w: torch.Tensor) -> torch.Tensor:
    """Σ_{i≥2} α_i,i−1 / Σ_{i≥2} Σ_{j≥1} α_ij per head, NaN where that denominator is under SINK_ONLY per row: (H, T, T) → (H,)."""
    mo = Moments(1, w.shape[0], floor=SINK_ONLY)
    mo.add(0, *previous_token_rows(w))
    return mo.mean()[0]


def detector_rows(weights: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor | None:
    """Attention on the pattern's keys in each row where it marks any: (..., T, T), (T, T) → (..., R)."""
    rows = pattern.sum(-1) > 0
    if not rows.any():
        return None
    return (weights * pattern).sum(-1)[..., rows]


def detector_score(weights: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor | None:
    """Mean attention on the pattern's keys over rows where it marks any: (..., T, T), (T, T) → (...)."""
    rows = detector_rows(weights, pattern)
    return None if rows is None else rows.mean(-1)


# --- the probe -------------------------------------------------------------------------------------


class PatternProbe:
    """A Probe on every layer: full attention patterns of all heads of a batch of prompts (right-padded),
    reduced at once to sums over each prompt's rows."""

    def __init__(self, n_layers: int, n_heads: int, prompts: list[list[int]], detectors: bool) -> None:
        self.layers = frozenset(range(n_layers))
        self.lengths = [len(p) for p in prompts]
        self.detectors = detectors
        self.patterns = [{"duplicate_token": duplicate_pattern(p), "induction": induction_pattern(p)} if detectors else {} for p in prompts]
        self.moments = new_moments(n_layers, n_heads, detectors)

    def observe(self, layer: int, attn: Attention, q, k, v, start: int) -> None:
        T = q.shape[2]
        pos = torch.arange(start, start + T, device=q.device)
        w = attn.scores(q, k, pos).softmax(-1).cpu()  # (B, H, T, S), rows sum to 1
        # A sliding window hides the oldest keys: a measure or detector only counts keys the head can see.
        visible = attn.visible(pos, k.shape[2]).cpu()  # (T, S)
        for b, n in enumerate(self.lengths):
            wb, vis = w[b, :, :n, :n], visible[:n, :n]  # this prompt's rows and keys: the padding left out
            for name, rows in row_measures(wb, vis).items():
                self.moments[name].add(layer, rows)
            if self.detectors:
                # masked keys have weight 0: nothing to mask
                self.moments["previous_token"].add(layer, *previous_token_rows(wb))
            for name, p in self.patterns[b].items():
                rows = detector_rows(wb, p * vis)
                if rows is not None:  # rows where the pattern marks a key this layer can see
                    self.moments[name].add(layer, rows)


def new_moments(L: int, H: int, detectors: bool) -> dict[str, Moments]:
    out = {name: Moments(L, H) for name in MEASURES}
    if detectors:
        out |= {"previous_token": Moments(L, H, floor=SINK_ONLY), "duplicate_token": Moments(L, H), "induction": Moments(L, H)}
    return out


def row_measures(w: torch.Tensor, visible: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The five measures of patterns (H, T, T) on each row they average: (H, R) each (rows 1..T-1;
    `previous`: rows 2..T-1).

    `visible` (T, T) is the layer's mask: with a sliding window, the first-token share is taken
    on the rows that can still see the first token (elsewhere it is masked, not a zero share).
    """
    T = w.shape[-1]
    i = torch.arange(T)
    rows = w[:, 1:]  # (H, T-1, T)
    dist = (i[:, None] - i[None, :]).clamp_min(0).float()[1:]  # (T-1, T)
    sees_first = visible[1:, 0] if visible is not None else torch.ones(T - 1, dtype=torch.bool)
    return {
        "entropy": -(rows * torch.log2(rows.clamp_min(1e-30))).sum(-1),
        "distance": (rows * dist).sum(-1),
        "first": rows[:, sees_first, 0],
        "previous": w[:, i[2:], i[2:] - 1],
        "self": w[:, i[1:], i[1:]],
    }


def pattern_measures(w: torch.Tensor, visible: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The five measures of patterns (H, T, T), averaged over their rows (see row_measures)."""
    return {name: rows.mean(-1) for name, rows in row_measures(w, visible).items()}


# Attention patterns held at once while a batch of prompts is measured: B × H × T² float32 values.
PATTERN_BUDGET = 2**26


@torch.inference_mode()
def head_moments(model: Decoder, prompts: list[list[int]], detectors: bool = True, parallel: int = 16) -> dict[str, Moments]:
    """Forward passes over `prompts`, a batch at a time: each measure's sums over every row of every prompt."""
    if any(len(p) < 3 for p in prompts):
        raise ValueError("need at least three tokens")
    cfg = model.cfg
    moments = new_moments(cfg.n_layers, cfg.n_heads, detectors)
    todo = sorted(prompts, key=len, reverse=True)  # similar lengths together: little padding
    while todo:
        T = len(todo[0])
        B = max(1, min(parallel, len(todo), PATTERN_BUDGET // (cfg.n_heads * T * T)))
        batch, todo = todo[:B], todo[B:]
        if model.cache_len < T or model.cache_rows < B:
            model.setup_cache(max(T, model.cache_len), max(B, model.cache_rows))
        ids = torch.zeros(B, T, dtype=torch.long)  # right-padded with token 0 (its rows are never read)
        for b, p in enumerate(batch):
            ids[b, : len(p)] = torch.tensor(p)
        probe = PatternProbe(cfg.n_layers, cfg.n_heads, batch, detectors)
        model(ids.to(model.device), 0, probe=probe)
        for name, mo in probe.moments.items():
            moments[name].merge(mo)
    if model.shard is not None:  # tensor parallel: each rank measured its heads; every head's sums on every rank
        sums = [(mo, f) for mo in moments.values() for f in ("w", "s", "ss")]
        every = model.shard.gather_heads(torch.stack([getattr(mo, f) for mo, f in sums]), 2)  # (3M, L, H) in one collective
        for (mo, f), t in zip(sums, every.unbind(0)):
            setattr(mo, f, t)
    return moments


def head_patterns(model: Decoder, ids: list[int], detectors: bool = True) -> dict[str, torch.Tensor | None]:
    """One forward pass over `ids`: every measure (and detector, if asked) as an (L, H) tensor, or None."""
    return {n: mo.mean() for n, mo in head_moments(model, [ids], detectors).items()}


def induction_sequence(candidates: list[int], length: int, seed: int, prefix: list[int] | None = None) -> list[int]:
    """`prefix` + `length` distinct random tokens from `candidates`, then the same tokens again."""
    if length > len(candidates):
        raise ValueError(f"only {len(candidates)} candidate tokens for a sequence of {length}")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(candidates), generator=g)[:length]
    half = [candidates[i] for i in pick.tolist()]
    return list(prefix or []) + half + half


def head_stats(model: Decoder, prompts: list[list[int]] | None, probe_ids: list[int] | None, parallel: int = 16) -> HeadStats:
    """Measures over `prompts` (one, or a dataset; the probe when there are none); detectors on the
    probe when given, else on the prompts.

    Induction is reported only from the probe: on free text, accidental repeats make it noise.
    A measure is None where some layer had no row for it (no repeated token for the duplicate
    detector; rows whose copies a sliding window hides).
    """
    texts = prompts if prompts is not None else [probe_ids]
    main = head_moments(model, texts, detectors=probe_ids is None or prompts is None, parallel=parallel)
    det = main
    if probe_ids is not None and prompts is not None:
        det = head_moments(model, [probe_ids], detectors=True)
    got = {name: main[name] for name in MEASURES} | {name: det[name] for name in DETECTORS if name in det}
    if probe_ids is None:
        got.pop("induction", None)
    return HeadStats(
        **{("self_" if n == "self" else n): mo.mean() for n, mo in got.items()},
        sd={n: sd for n, mo in got.items() if (sd := mo.sd()) is not None},
        n={n: mo.n for n, mo in got.items()},
        prompts=len(texts),
        tokens=sum(len(p) for p in texts),
    )
