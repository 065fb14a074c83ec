"""Whole attention matrices: every query row of the chosen layers, handed to a sink chunk by chunk.

`attn explore` needs the full T×T pattern of every head, not one row. The probe recomputes it on
the explicit path (`attention_scores`, the decoder's one mask rule, softmax in float32) while the
model keeps its fused kernel, a block of query rows at a time, and hands each block to a sink that
keeps what it stores (the page writer keeps float16 copies of the lower triangle). So no (H, T, T)
float32 block of a long prompt is ever alive at once, and only the probed layers cost anything.

Masked keys come out as they are computed: score -inf and weight 0 — never dropped or filled, so a
mask that hides more than the future (a sliding window) reaches the page as masked.

Value norms are kept per head and source only: the contribution of source j to head h's output is
α_ij·v_j·W_O^h, and since α_ij ≥ 0, its norm is α_ij·‖v_j·W_O^h‖ — one (H, T) table per layer
gives the norm of every (i, j) pair.
"""

from __future__ import annotations

from typing import Protocol

import torch

from model.decoder import Attention, Decoder, attention_scores
from model.probe import value_norms

# Float32 elements one block of rows may hold in its (H, rows, S) scores (1 MiB), as model/probe.py.
CHUNK_ELEMENTS = 1 << 18


class MatrixSink(Protocol):
    """Receives the attention of the probed layers, a block of query rows at a time."""

    def rows(self, layer: int, first: int, scores: torch.Tensor, weights: torch.Tensor) -> None:
        """Query rows first..first+n-1 against keys 0..first+n-1: scores and weights (H, n, first+n), float32.

        Masked entries are -inf in `scores` and 0 in `weights` (the future of every row included).
        """

    def norms(self, layer: int, norms: torch.Tensor) -> None:
        """‖v_j·W_O^h‖ for every head h and source j: (H, T), float32."""


class MatrixProbe:
    """A Probe (model/decoder.py) that passes every query row of `layers` to `sink`."""

    def __init__(self, layers: list[int], sink: MatrixSink, group: int) -> None:
        self.layers = frozenset(layers)
        self.sink = sink
        self.group = group

    def observe(self, layer: int, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """q: (B, H, T, D) at positions start..start+T-1; k, v: (B, G, S, D), S = start + T."""
        if start:
            raise ValueError("a whole matrix needs the pass to start at position 0")
        H, T = q.shape[1], q.shape[2]
        rows = max(1, CHUNK_ELEMENTS // (H * T))
        for a in range(0, T, rows):
            b = min(a + rows, T)
            # Keys past the block's last row are masked for all its rows: leave them out of the work.
            scores = attention_scores(q[:1, :, a:b], k[:1, :, :b], torch.arange(a, b, device=q.device))[0]  # (H, n, b)
            self.sink.rows(layer, a, scores, scores.softmax(dim=-1))
            del scores
        kv = torch.arange(H, device=q.device) // self.group  # the KV head each query head reads
        w_o = attn.o.dense_weight().reshape(attn.n_heads, attn.head_dim, -1)  # (H, D, C): W_O^h
        C = w_o.shape[-1]
        step = max(1, CHUNK_ELEMENTS // (H * C))  # v·W_O is (H, n, C): bounded like the scores
        norms = torch.cat([value_norms(v[0, kv, a : a + step], w_o) for a in range(0, T, step)], dim=1)  # (H, T)
        self.sink.norms(layer, norms)


@torch.inference_mode()
def capture_matrices(model: Decoder, ids: list[int], layers: list[int], sink: MatrixSink) -> None:
    """Run `ids` from position 0 and pass the attention of every head of `layers` to `sink`.

    The pass stops after the last of `layers` (later layers and the output head never run).
    """
    if not layers:
        raise ValueError("no layers to capture")
    if model.cache_len < len(ids):
        model.setup_cache(len(ids))
    x = torch.tensor(ids, dtype=torch.long, device=model.device)[None]  # (1, T)
    model(x, 0, probe=MatrixProbe(layers, sink, model.cfg.group))
