"""One attention head's computation for one token, stage by stage, with the model's own numbers.

The stages follow the classic account (Vaswani et al.; Jay Alammar's "Illustrated Transformer"):
normed input x → Q = x·Wq, K_j → (q/k norm) → (RoPE) → Q·K_j → × scale → (soft-cap) → mask →
softmax → Σ α_j V_j → through the head's rows of W_O → (post-attention norm) → added to the
residual stream. Q, K and V are the decoder's own (`Attention.project`, seen through a Probe), and
scores come from the layer's own rule (`Attention.scores`), so every number is the one the model
computes — the same ones `attn inspect` reports. Everything here is float32.

Where a norm follows W_O (Gemma 2/3, OLMo 2: RMSNorm(y) = y / rms(y) · w, y the whole attention
output), one head's share of the normed output is still exact: its update · w / rms(y), because
rms(y) is one number per token. `update` is before that norm, `update_normed` after it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from model.decoder import Attention, Decoder, RMSNorm, scaled_dots, soft_cap
from model.errors import check_finite


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
    q: torch.Tensor  # (D,) x·Wq (+ bias), normed if the family norms q, before rotation
    keys: torch.Tensor  # (S, D) K_j = x_j·Wk (+ bias), normed likewise, before rotation; S = query + 1
    q_rot: torch.Tensor  # (D,) as the scores use it (== q without RoPE)
    keys_rot: torch.Tensor  # (S, D)
    dots: torch.Tensor  # (S,) Q·K_j of the rotated vectors
    raw_scores: torch.Tensor  # (S,) dots × scale, before any cap and the mask
    scores: torch.Tensor  # (S,) what the softmax sees: capped if the layer caps, masked keys at -inf
    scores_unrotated: torch.Tensor | None  # (S,) the same without RoPE (capped, unmasked): what position adds is the difference
    weights: torch.Tensor  # (S,) softmax(scores)
    entropy: float  # of the weights, in bits
    values: torch.Tensor  # (S, D) V_j
    mixed: torch.Tensor  # (D,) Σ α_j V_j
    update: torch.Tensor  # (C,) mixed through this head's rows of W_O: what the head adds to the stream
    value_norms: torch.Tensor  # (S,) ‖α_j · V_j · W_O^h‖, as inspect's --values value-norms
    window: int | None = None  # the layer's sliding window (None: the query sees every earlier token)
    masked: torch.Tensor | None = None  # (S,) bool: earlier keys outside the window (score -inf, weight 0)
    qk_norm: str | None = None  # "head" (over D) or "flat" (over all of q, k); None: no norm
    q_proj: torch.Tensor | None = None  # (D,) x·Wq (+ bias) before the q norm (with qk_norm)
    keys_proj: torch.Tensor | None = None  # (S, D) before the k norm
    rotary_dim: int | None = None  # R: how many leading dims of each head RoPE turns (== d_k unless partial)
    query_pre_attn_scalar: float | None = None  # Gemma: the scale is 1/√ of this, not of d_k
    softcap: float | None = None  # Gemma 2: scores are capped to cap·tanh(raw/cap)
    capped: torch.Tensor | None = None  # (S,) raw_scores after the cap, before the mask
    update_normed: torch.Tensor | None = None  # (C,) the head's share after the post-attention norm (Gemma, OLMo 2)

    @property
    def added(self) -> torch.Tensor:
        """(C,) what this head adds to the residual stream: after the post-attention norm where there is one."""
        return self.update_normed if self.update_normed is not None else self.update

    @property
    def update_ratio(self) -> float:
        """‖what the head adds‖ / ‖residual stream‖."""
        return float(self.added.norm() / self.resid.norm().clamp_min(1e-30))

    @property
    def update_cosine(self) -> float:
        return float(torch.nn.functional.cosine_similarity(self.added, self.resid, dim=0))


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
    shard = model.shard
    if shard is None:
        return _explain(model, ids, query, layer, head)
    # Tensor parallel: every rank runs the passes, the rank holding the head works out its stages.
    owner = shard.owner(head)
    ex = shard.broadcast_object(_explain(model, ids, query, layer, head % len(shard.heads) if shard.rank == owner else 0), owner)
    first = owner * len(shard.heads)  # the owner's local head 0
    return replace(ex, head=head, kv_head=head // model.cfg.group, shared_with=[first + h for h in ex.shared_with])


def _explain(model: Decoder, ids: list[int], query: int, layer: int, head: int) -> Explanation:
    cfg = model.cfg
    attn = model.layers[layer].attn
    resid, q_all, k_all, v_all = run_layer(model, ids, layer)
    H, G, D, R = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.group
    g = head // R
    S = query + 1
    block = model.layers[layer]
    x = block.attn_norm(resid.to(model.dtype))  # (T, C)
    # Unrotated projections from the same weights: what each score would be without position.
    q_raw, k_raw, _ = attn.project(x[None], None)  # (1, H, T, D), (1, G, T, D)
    q_proj = keys_proj = None
    if attn.qk_norm is not None:  # before the q and k norms: the projections themselves
        qkv = attn.qkv.forward(x).float()  # (T, (H+2G)·D)
        q_proj = qkv[query, head * D : (head + 1) * D]
        keys_proj = qkv[:S, (H + g) * D : (H + g + 1) * D]
    q_pos = torch.tensor([query], device=q_all.device)
    # The layer's one rule (scale, cap, mask) gives the scores; its stages are taken apart below.
    scores = attn.scores(q_all[None, :, query : query + 1], k_all[None, :, :S], q_pos)[0, head, 0]  # (S,), -inf where masked
    q_rot, keys_rot = q_all[head, query].float(), k_all[g, :S].float()
    dots = keys_rot @ q_rot
    raw = scaled_dots(q_all[None, head : head + 1, query : query + 1], k_all[None, g : g + 1, :S], attn.scale)[0, 0, 0]  # (S,)
    capped = soft_cap(raw, attn.softcap) if attn.softcap is not None else None
    rope = cfg.positions == "rope"
    unrot = None
    if rope:
        unrot = scaled_dots(q_raw[:, head : head + 1, query : query + 1], k_raw[:, g : g + 1, :S], attn.scale)[0, 0, 0]
        if attn.softcap is not None:
            unrot = soft_cap(unrot, attn.softcap)
    weights = scores.softmax(-1)
    check_finite(f"layer {layer}'s attention", weights, v_all)
    values = v_all[g, :S].float()
    w_o = attn.o.dense_weight()[head * D : (head + 1) * D].float()  # (D, C): this head's rows of W_O
    mixed = weights @ values
    update = mixed @ w_o
    update_normed = None
    post = block.attn_post_norm
    if isinstance(post, RMSNorm):  # the head's exact share of RMSNorm(y): update · w / rms(y), y the layer's output here
        all_w = attn.scores(q_all[None, :, query : query + 1], k_all[None, :, :S], q_pos)[0, :, 0].softmax(-1)  # (H, S)
        all_mixed = (all_w.view(G, R, S) @ v_all[:, :S].float()).reshape(1, H * D)  # (G, R, D) → (1, H·D)
        y = attn.o.forward(all_mixed.to(model.dtype)).float()[0]  # (C,)
        rms = (y.pow(2).mean() + post.eps).sqrt()
        update_normed = update * (post.weight.float() + post.offset) / rms
    return Explanation(
        layer=layer,
        head=head,
        kv_head=g,
        shared_with=[h for h in range(g * R, (g + 1) * R) if h != head],
        query=query,
        n_tokens=len(ids),
        d_k=D,
        scale=attn.scale,
        rope=rope,
        resid=resid[query],
        x=x[query].float(),
        q=q_raw[0, head, query].float(),
        keys=k_raw[0, g, :S].float(),
        q_rot=q_rot,
        keys_rot=keys_rot,
        dots=dots,
        raw_scores=raw,
        scores=scores,
        scores_unrotated=unrot,
        weights=weights,
        entropy=entropy_bits(weights),
        values=values,
        mixed=mixed,
        update=update,
        value_norms=((weights[:, None] * values) @ w_o).norm(dim=-1),
        window=attn.window,
        masked=~attn.visible(q_pos, S)[0],
        qk_norm=attn.qk_norm,
        q_proj=q_proj,
        keys_proj=keys_proj,
        rotary_dim=cfg.rope_dims if rope else None,
        query_pre_attn_scalar=cfg.query_pre_attn_scalar,
        softcap=attn.softcap,
        capped=capped,
        update_normed=update_normed,
    )


@torch.inference_mode()
def head_updates(model: Decoder, ids: list[int], layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each head's part of the attention output (H, T, C) and W_O's bias (C,): their sum is the attention output
    (what the residual stream receives, or what the post-attention norm then normalises: Gemma, OLMo 2)."""
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
    rows = torch.stack(rows)
    return model.shard.gather_heads(rows, 1) if model.shard is not None else rows
