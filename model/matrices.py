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

from model.decoder import Attention, Decoder

# Float32 elements one block of rows may hold in its (H, rows, S) scores (1 MiB), as model/probe.py.
CHUNK_ELEMENTS = 1 << 18


class MatrixSink(Protocol):
    """Receives the attention of the probed layers, a block of query rows at a time."""

    def rows(self, layer: int, first: int, scores: torch.Tensor) -> None:
        """Pre-softmax scores (H, n, first+n), float32, of query rows first..first+n-1 against keys 0..first+n-1.

        Masked keys (the future of every row included) are -inf; the weights are `scores.softmax(-1)`.
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
            scores = attn.scores(q[:1, :, a:b], k[:1, :, :b], torch.arange(a, b, device=q.device))[0]  # (H, n, b); window: -inf
            self.sink.rows(layer, a, scores)
            del scores
        self.sink.norms(layer, value_norms(attn, v[0], self.group))


def value_norms(attn: Attention, v: torch.Tensor, group: int) -> torch.Tensor:
    """‖v_j·W_O^h‖ for every query head h and source j: v (G, S, D) → (H, S), float32.

    Through the Gram matrix of each head's rows of W_O: ‖v·W‖² = v·(W·Wᵀ)·vᵀ, which costs D² per
    source instead of D·C, and no (H, S, C) product of a long prompt is ever made.
    """
    H, D = attn.n_heads, attn.head_dim
    w_o = attn.o.dense_weight().float().reshape(H, D, -1)  # (H, D, C): W_O^h
    gram = w_o @ w_o.transpose(1, 2)  # (H, D, D)
    vh = v.float()[torch.arange(H, device=v.device) // group]  # (H, S, D): the values each query head reads
    return ((vh @ gram) * vh).sum(-1).clamp_min(0).sqrt()  # rounding can take a zero norm a hair below 0


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
