"""One attention head's computation for one token, stage by stage, with the model's own numbers.

The stages follow the classic account (Vaswani et al.; Jay Alammar's "Illustrated Transformer"):
normed input x → Q = x·Wq, K_j → (RoPE) → Q·K_j → ×1/√d_k → causal mask → softmax → Σ α_j V_j →
through the head's rows of W_O → added to the residual stream. Q, K and V are the decoder's own
(`Attention.project`, seen through a Probe), and scores come from `attention_scores`, so every number
is the one the model computes — the same ones `attn inspect` reports. Everything here is float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.decoder import Attention, Decoder


@dataclass
class Explanation:
    """Every stage for query token `query` through (layer, head); vectors are float32, keys indexed 0..query."""

    layer: int
    head: int
    kv_head: int
    shared_with: list[int]  # the other query heads that read the same KV head (grouped-query attention)
    query: int  # index of the query token; it sees positions 0..query
    n_tokens: int  # length of the sequence; positions query+1..n_tokens-1 are masked (future)
    d_k: int
    scale: float  # 1/√d_k
    rope: bool
    resid: torch.Tensor  # (C,) residual stream entering the layer
    x: torch.Tensor  # (C,) the layer's normed input: what Wq, Wk, Wv see
    q: torch.Tensor  # (D,) x·Wq (+ bias), before rotation
    keys: torch.Tensor  # (S, D) K_j = x_j·Wk (+ bias), before rotation; S = query + 1
    q_rot: torch.Tensor  # (D,) as the scores use it (== q without RoPE)
    keys_rot: torch.Tensor  # (S, D)
    dots: torch.Tensor  # (S,) Q·K_j of the rotated vectors
    scores: torch.Tensor  # (S,) dots × scale: what the softmax sees
    scores_unrotated: torch.Tensor | None  # (S,) the same without RoPE: what position adds is the difference
    weights: torch.Tensor  # (S,) softmax(scores)
    entropy: float  # of the weights, in bits
    values: torch.Tensor  # (S, D) V_j
    mixed: torch.Tensor  # (D,) Σ α_j V_j
    update: torch.Tensor  # (C,) mixed through this head's rows of W_O: what the head adds to the stream
    value_norms: torch.Tensor  # (S,) ‖α_j · V_j · W_O^h‖, as inspect's --values value-norms
    window: int | None = None  # the layer's sliding window (None: the query sees every earlier token)
    masked: torch.Tensor | None = None  # (S,) bool: earlier keys outside the window (score -inf, weight 0)

    @property
    def update_ratio(self) -> float:
        """‖update‖ / ‖residual stream‖."""
        return float(self.update.norm() / self.resid.norm().clamp_min(1e-30))

    @property
    def update_cosine(self) -> float:
        return float(torch.nn.functional.cosine_similarity(self.update, self.resid, dim=0))


class _Capture:
    """A Probe on one layer that keeps the rotated q and cached k, v, plus the residual and normed input."""

    def __init__(self, layer: int) -> None:
        self.layers = frozenset({layer})
        self.q = self.k = self.v = None
        self.resid = None

    def observe(self, layer: int, attn: Attention, q, k, v, start: int) -> None:
        self.q, self.k, self.v = q, k, v  # (B, H, T, D), (B, G, S, D)


def run_layer(model: Decoder, ids: list[int], layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual stream entering `layer` (T, C) and its rotated q (H, T, D), k, v (G, T, D), from one forward pass."""
    cap = _Capture(layer)
    block = model.layers[layer]
    # The residual is the Block's input; Block.forward norms it before attention.
    hook = block.register_forward_pre_hook(lambda mod, args: setattr(cap, "resid", args[0].detach()))
    T = len(ids)
    if model.cache_len < T:
        model.setup_cache(T)
    try:
        with torch.inference_mode():
            model(torch.tensor([ids], device=model.device), 0, probe=cap)
    finally:
        hook.remove()
    return cap.resid[0].float(), cap.q[0], cap.k[0], cap.v[0]


@torch.inference_mode()
def explain(model: Decoder, ids: list[int], query: int, layer: int, head: int) -> Explanation:
    """Stage-by-stage numbers for token `query` of `ids` through (layer, head)."""
    cfg = model.cfg
    attn = model.layers[layer].attn
    resid, q_all, k_all, v_all = run_layer(model, ids, layer)
    D, R = cfg.head_dim, cfg.group
    g = head // R
    S = query + 1
    x = model.layers[layer].attn_norm(resid.to(model.dtype))  # (T, C)
    # Unrotated projections from the same weights: what each score would be without position.
    q_raw, k_raw, _ = attn.project(x[None], None)  # (1, H, T, D), (1, G, T, D)
    q_pos = torch.tensor([query], device=q_all.device)
    scores = attn.scores(q_all[None, :, query : query + 1], k_all[None, :, :S], q_pos)[0, head, 0]  # (S,), -inf where masked
    q_rot, keys_rot = q_all[head, query].float(), k_all[g, :S].float()
    dots = keys_rot @ q_rot
    rope = cfg.positions == "rope"
    unrot = None
    if rope:
        unrot = (k_raw[0, g, :S].float() @ q_raw[0, head, query].float()) * D**-0.5
    weights = scores.softmax(-1)
    values = v_all[g, :S].float()
    w_o = attn.o.dense_weight()[head * D : (head + 1) * D].float()  # (D, C): this head's rows of W_O
    mixed = weights @ values
    return Explanation(
        layer=layer,
        head=head,
        kv_head=g,
        shared_with=[h for h in range(g * R, (g + 1) * R) if h != head],
        query=query,
        n_tokens=len(ids),
        d_k=D,
        scale=D**-0.5,
        rope=rope,
        resid=resid[query],
        x=x[query].float(),
        q=q_raw[0, head, query].float(),
        keys=k_raw[0, g, :S].float(),
        q_rot=q_rot,
        keys_rot=keys_rot,
        dots=dots,
        scores=scores,
        scores_unrotated=unrot,
        weights=weights,
        entropy=entropy_bits(weights),
        values=values,
        mixed=mixed,
        update=mixed @ w_o,
        value_norms=((weights[:, None] * values) @ w_o).norm(dim=-1),
        window=attn.window,
        masked=~attn.visible(q_pos, S)[0],
    )


@torch.inference_mode()
def head_updates(model: Decoder, ids: list[int], layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each head's addition to the residual stream (H, T, C) and W_O's bias (C,): their sum is the block's output."""
    attn = model.layers[layer].attn
    _, q, k, v = run_layer(model, ids, layer)
    H, T, D = q.shape
    G = k.shape[0]
    weights = attn.scores(q[None], k[None], torch.arange(T, device=q.device)).softmax(-1)[0]  # (H, T, S)
    mixed = weights.view(G, H // G, T, T) @ v.float()[:, None]  # (G, R, T, D)
    w_o = attn.o.dense_weight().float().view(H, D, -1)  # (H, D, C)
    updates = mixed.reshape(H, T, D) @ w_o  # (H, T, C)
    bias = attn.o.bias.float() if attn.o.bias is not None else None
    return updates, bias


def entropy_bits(p: torch.Tensor) -> float:
    """Shannon entropy of a distribution over the last dimension, in bits (0·log 0 = 0)."""
    return float(-(p * torch.log2(p.clamp_min(1e-30))).sum(-1))


@torch.inference_mode()
def query_rows(model: Decoder, ids: list[int], query: int) -> torch.Tensor:
    """The attention weights of token `query` in every layer and head: (L, H, query + 1)."""
    rows = []

    class Rows:
        layers = frozenset(range(model.cfg.n_layers))

        def observe(self, layer, attn, q, k, v, start):
            qp = torch.tensor([query], device=q.device)
            rows.append(attn.scores(q[:, :, query : query + 1], k[:, :, : query + 1], qp)[0, :, 0].softmax(-1))

    if model.cache_len < len(ids):
        model.setup_cache(len(ids))
    model(torch.tensor([ids], device=model.device), 0, probe=Rows())
    return torch.stack(rows)
