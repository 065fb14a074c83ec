"""Attention capture: a probe that keeps one query row (or one key column) of the chosen layers.

The decoder calls `observe` from `Attention.forward` for the layers a probe names, with the
rotated queries and the cached keys and values; everything here is recomputed on the explicit
path (`attention_scores`, softmax in float32) while the model itself keeps the fused kernel.
Only what was asked is kept: for `from`, one row per head (the chosen token as query); for `to`,
one column per head (every later token's weight on the chosen one), computed over row chunks so
no (T, S) matrix of a long prompt is ever alive at once. The forward pass stops after the last
probed layer, so later layers and the output head never run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from model.decoder import Attention, Decoder
from model.errors import check_finite

DIRECTIONS = ("from", "to")
VIEWS = ("weights", "scores", "value-norms")

# Float32 elements one chunk of `to` rows may hold in its (heads, rows, S) scores (1 MiB). Small on
# purpose: with larger blocks glibc's per-thread arenas kept ~300 MiB of freed chunks resident (2,048 tokens).
CHUNK_ELEMENTS = 1 << 18


@dataclass
class LayerCapture:
    """One layer's capture for the chosen heads, aligned with `Capture.positions`."""

    values: torch.Tensor  # (h, P) the asked view: weights, scores or value norms
    weights: torch.Tensor  # (h, P) the softmax weights of the same entries
    sink: torch.Tensor  # (h, P) weight the query row of each entry puts on position 0
    masked: torch.Tensor  # (P,) bool: entries the layer's sliding window hides (weight 0, score -inf)
    # (h, P) float64: what that row puts on every other position, summed. Not 1 − sink: when the sink
    # takes ≈ all of a row, 1 − sink in float32 is rounding noise (and dividing by it gave weights > 1).
    rest: torch.Tensor


PER_HEAD = ("values", "weights", "sink", "rest")  # LayerCapture's fields with one row per head


@dataclass
class Capture:
    """What a probed forward pass kept: per layer, the chosen heads' row or column."""

    query: int
    direction: str
    view: str
    heads: list[int]  # query heads, in the order of the rows of every tensor
    kv_heads: list[int]  # the KV head each of `heads` reads
    positions: list[int]  # token indices the values are aligned with
    layers: dict[int, LayerCapture] = field(default_factory=dict)


class AttentionProbe:
    """Keeps the attention of `query` (as query for `from`, as key for `to`) in `layers`."""

    def __init__(self, layers: list[int], query: int, direction: str, view: str, heads: list[int], group: int) -> None:
        if direction not in DIRECTIONS or view not in VIEWS:
            raise ValueError(f"direction {direction!r} / view {view!r}")
        self.layers = frozenset(layers)
        self.query, self.direction, self.view = query, direction, view
        self.heads = list(heads)
        self.kv_heads = [h // group for h in heads]
        self.captured: dict[int, LayerCapture] = {}

    def observe(self, layer: int, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """q: (B, H, T, D) at positions start..start+T-1; k, v: (B, G, S, D)."""
        T = q.shape[2]
        if not start <= self.query < start + T:
            raise ValueError(f"the probed chunk {start}..{start + T - 1} does not hold the query {self.query}")
        hs = torch.tensor(self.heads, dtype=torch.long, device=q.device)
        gs = torch.tensor(self.kv_heads, dtype=torch.long, device=q.device)
        # Pair every chosen query head with its own KV head, so the explicit path sees h == G (no grouping).
        q, k, v = q[:1, hs], k[:1, gs], v[:1, gs]  # (1, h, T, D), (1, h, S, D), (1, h, S, D)
        w_o = attn.o.dense_weight().reshape(attn.n_heads, attn.head_dim, -1)[hs.to(q.device)]  # (h, D, C): W_O^h
        if self.direction == "from":
            self.captured[layer] = self._row(attn, q, k, v, w_o, start)
        else:
            self.captured[layer] = self._column(attn, q, k, v, w_o, start)

    def _row(self, attn: Attention, q, k, v, w_o, start: int) -> LayerCapture:
        i = self.query
        S = i + 1  # keys after the query are masked: leave them out rather than carry -inf
        q_pos = torch.tensor([i], device=q.device)
        scores = attn.scores(q[:, :, i - start : i - start + 1], k[:, :, :S], q_pos)[0, :, 0]  # (h, S)
        weights = scores.softmax(dim=-1)
        if self.view == "scores":
            values = scores
        elif self.view == "value-norms":
            values = weights * value_norms(v[0, :, :S], w_o)  # α ≥ 0, so ‖α·v·W_O‖ = α·‖v·W_O‖
        else:
            values = weights
        rest = weights[:, 1:].double().sum(dim=-1, keepdim=True)  # (h, 1)
        return LayerCapture(values, weights, weights[:, :1].expand_as(weights), ~attn.visible(q_pos, S)[0], rest.expand_as(weights))

    def _column(self, attn: Attention, q, k, v, w_o, start: int) -> LayerCapture:
        c = self.query
        h, T, S = q.shape[1], q.shape[2], k.shape[2]
        rows = max(1, CHUNK_ELEMENTS // (h * S))
        col_scores, col_weights, sinks, rests = [], [], [], []
        for a in range(c - start, T, rows):  # rows c..S-1: the tokens that can see the chosen one
            b = min(a + rows, T)
            scores = attn.scores(q[:, :, a:b], k, torch.arange(start + a, start + b, device=q.device))[0]  # (h, n, S)
            weights = scores.softmax(dim=-1)
            # Copies, not views: a view would keep this chunk's whole (h, n, S) block alive.
            col_scores.append(scores[:, :, c].clone())
            col_weights.append(weights[:, :, c].clone())
            sinks.append(weights[:, :, 0].clone())
            rests.append(weights[:, :, 1:].double().sum(dim=-1))
            del scores, weights
        scores, weights, sink, rest = (torch.cat(t, dim=1) for t in (col_scores, col_weights, sinks, rests))  # (h, P) each
        if self.view == "scores":
            values = scores
        elif self.view == "value-norms":
            values = weights * value_norms(v[0, :, c : c + 1], w_o)  # (h, P) · (h, 1)
        else:
            values = weights
        rows_pos = torch.arange(c, start + T, device=q.device)  # the later tokens, as queries of column c
        return LayerCapture(values, weights, sink, ~attn.visible(rows_pos, c + 1)[:, c], rest)


def value_norms(v: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """‖v_j · W_O^h‖ for every head and source: v (h, S, D), w_o (h, D, C) → (h, S), in float32."""
    return (v.float() @ w_o.float()).norm(dim=-1)


@torch.inference_mode()
def capture(
    model: Decoder,
    ids: list[int],
    query: int,
    layers: list[int],
    heads: list[int],
    direction: str = "from",
    view: str = "weights",
    cached: int = 0,
) -> Capture:
    """Run `ids` through the model with a probe and return what it kept.

    `cached` says how many leading positions already have their K, V in the model's cache for
    every probed layer (after generation): the pass then starts there (or at the query, if
    earlier) instead of at 0. For `from` nothing after the query is fed: it cannot be seen.
    """
    N = len(ids)
    if not 0 <= query < N:
        raise ValueError(f"query {query} outside 0..{N - 1}")
    cfg = model.cfg
    shard = model.shard
    # Tensor parallel: each rank probes the asked heads it holds (one of its own, discarded, if none: every rank runs the pass).
    own = shard.local_heads(heads) if shard is not None else heads
    probe = AttentionProbe(layers, query, direction, view, own or [0], cfg.group)
    end = query + 1 if direction == "from" else N
    start = min(cached, query)
    if model.cache_len < end:
        if start:
            raise ValueError("the KV cache is too short for the cached positions it is said to hold")
        model.setup_cache(end)
    device = model.device
    x = torch.tensor(ids[start:end], dtype=torch.long, device=device)[None]  # (1, T)
    model(x, start, probe=probe)
    positions = list(range(end)) if direction == "from" else list(range(query, N))
    out = Capture(query, direction, view, probe.heads, probe.kv_heads, positions)
    out.layers = {i: probe.captured[i] for i in sorted(probe.captured)}
    for i, lc in out.layers.items():
        check_finite(f"layer {i}'s attention", *(getattr(lc, f) for f in PER_HEAD))
    if shard is not None:  # every rank's rows, in the asked order, on every rank
        rows = shard.gather_rows({(i, f): getattr(lc, f)[: len(own)] for i, lc in out.layers.items() for f in PER_HEAD}, heads)
        out.layers = {i: replace(lc, **{f: rows[i, f] for f in PER_HEAD}) for i, lc in out.layers.items()}
        out.heads, out.kv_heads = list(heads), [h // cfg.group for h in heads]
    return out
