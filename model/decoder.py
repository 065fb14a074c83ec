"""The decoder: one transformer for every family (model/families/), with a preallocated KV cache.

Follows nanoGPT (structure, GPT-2), gpt-fast (static KV cache, fused projections) and
Hugging Face transformers (RoPE layout `rotate_half`, RMSNorm in float32), which is the
reference the tests compare against. Families differ in construction, never by name: the
config's fields say where the norms sit (before, after or both: `Block`), whether attention
and MLP run side by side (GPT-NeoX), how q and k are normed (Qwen3, Gemma 3, OLMo 2), how
scores are scaled and soft-capped (Gemma), which window and RoPE base a layer uses, and how
much of each head rotates (GPT-NeoX, Phi-4-mini).

Weights of every linear layer are stored (in, out): `y = x @ W`. For a one-row decode step
this is the layout that CPU GEMV kernels stream fastest, and it is GPT-2's own Conv1D layout.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig, rope_inv_freq


class Probe(Protocol):
    """Something that wants to see the attention of some layers (see model/probe.py)."""

    layers: frozenset[int]

    def observe(self, layer: int, attn: "Attention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """q: (B, H, T, D) rotated queries of positions start..start+T-1; k, v: (B, G, S, D), S = start + T."""


class Span(NamedTuple):
    """Where a call's tokens sit: their positions, and the rows of the KV cache they read and write.

    A batch of requests keeps one request per cache row ("slot"), each at its own position: a
    one-token step then carries a (B,) tensor of positions, and the mask is per row.
    """

    start: int | torch.Tensor  # int: every row's T tokens at start..start+T-1; (B,) tensor: row b's one token at start[b]
    row: int = 0  # the call's B rows are cache rows row..row+B-1
    keys: int | None = None  # with a tensor start: cache positions 0..keys-1 are read (None: all of them, static shapes)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Tied models keep one matrix, in the head's (C, V) layout; the embedding reads its columns.
        self.tok_emb = None if cfg.tie_embeddings else nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim) if cfg.positions == "learned" else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.logit_softcap = cfg.logit_softcap  # Gemma 2
        self.embed_scale: float | None = None  # Gemma's √C in the weights' dtype (setup_cache)
        self.cache_len = 0
        self.cache_rows = 0  # sequences the cache holds at once (a batch's slots)
        self.decode_step = None  # a compiled one-token step (model/compile.py), when one was built
        self.shard = None  # tensor parallel: the part of the model this process holds (model/parallel.py)
        self.block_steps: list | None = None  # compiled runs of blocks that `step` calls in order (model/compile.py)
        self.tail_step = None  # and, with them, the final norm and head compiled (model/compile.py)
        self.prompt_run = None  # a prompt's rows (8 and more) through every block by a compiled package, where built (model/prefill.py)

    def setup_cache(self, max_len: int, batch: int = 1) -> None:
        """Preallocate the KV cache and the RoPE tables for `batch` sequences of up to `max_len` tokens."""
        dtype, device = self.dtype, self.device
        for block in self.layers:
            block.attn.cache = KVCache(batch, self.cfg.n_heads, self.cfg.n_kv_heads, max_len, self.cfg.head_dim, dtype, device)
        if self.cfg.positions == "rope":
            cos, sin = rope_tables(self.cfg, max_len, device)
            self.register_buffer("rope_cos", cos.to(dtype), persistent=False)  # (S_max, R)
            self.register_buffer("rope_sin", sin.to(dtype), persistent=False)  # sign-folded
            if self.cfg.local_rope_theta is not None:  # Gemma 3's sliding-window layers
                cos, sin = rope_tables(self.cfg, max_len, device, local=True)
                self.register_buffer("rope_local_cos", cos.to(dtype), persistent=False)
                self.register_buffer("rope_local_sin", sin.to(dtype), persistent=False)
        if self.cfg.embed_scale is not None:  # rounded to the activations' dtype first, as the reference does
            self.embed_scale = float(torch.tensor(self.cfg.embed_scale, dtype=dtype))
        self.cache_len, self.cache_rows = max_len, batch

    def weights(self) -> list[tuple[str, torch.Tensor]]:
        """The parameters and buffers that hold the model itself, by name: not the KV cache nor the RoPE tables,
        which `setup_cache` sizes for the length asked for."""
        named = [*self.named_parameters(), *self.named_buffers()]
        return [(n, t) for n, t in named if not n.endswith((".k", ".v")) and not n.startswith("rope_")]

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the norms stay in it even when linear weights are quantized)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tok_emb is not None:
            return self.tok_emb(ids)
        return self.lm_head.columns(ids)  # (B, T, C) from the tied (C, V) matrix

    def forward(
        self, ids: torch.Tensor, start: int = 0, probe: Probe | None = None, last_only: bool = False, row: int = 0
    ) -> torch.Tensor | None:
        """Logits (B, T, V) for tokens `ids` (B, T) at positions start..start+T-1, writing their K, V
        into cache rows row..row+B-1 (a batch prefills one request into its own row).

        `last_only` computes logits for the last position only (B, 1, V), as generation needs.
        With a probe, the pass stops after the last layer it asked for and returns None.
        Blocks are called as modules here, so hooks on them fire (model/explain.py uses one).
        """
        return self._run(ids, Span(start, row), probe, last_only, hooks=True)

    def step(self, ids: torch.Tensor, start: int | torch.Tensor, keys: int | None = None) -> torch.Tensor:
        """`forward(ids, start, last_only=True)` for one token per row (B, 1): generation's hot loop.

        The same path, but the parts' `forward` is called directly: no hooks, no probe, and none
        of `nn.Module.__call__`'s per-call cost (≈ 270 calls per token).

        `start` may also be a (B,) integer tensor on the model's device, one position per row (a
        batch of requests at different points, cache rows 0..B-1): each row sees its own keys
        0..start[b] through the mask, and `keys` (≥ max(start) + 1) bounds how much of the cache is
        read. Without `keys` every shape is the same at every position (the whole cache is read)
        and nothing is read back to the host, which is what capturing the step as a CUDA graph
        needs (model/compile.py).
        """
        return self._run(ids, Span(start, 0, keys), None, True, hooks=False)

    def _run(self, ids: torch.Tensor, span: Span, probe: Probe | None, last_only: bool, hooks: bool) -> torch.Tensor | None:
        B, T = ids.shape
        start = span.start
        if isinstance(start, int) and start + T > self.cache_len:
            raise ValueError(f"positions up to {start + T} exceed the cache of {self.cache_len}")
        x = self.embed(ids)  # (B, T, C)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        rope = None
        if self.pos_emb is not None:
            pos = self.pos_emb.weight
            x = x + (pos.index_select(0, start)[:, None] if isinstance(start, torch.Tensor) else pos[start : start + T])
        else:
            rope = self.rope_at(start, T)
        stop = max(probe.layers) if probe is not None else None
        if self.prompt_run is not None and probe is None and B * T >= self.prompt_run.min_rows and not (hooks and _hooked(self.layers)):
            x = self.prompt_run(self, x, span, rope)
        elif not hooks and self.block_steps:  # compiled runs of consecutive blocks (model/compile.py)
            for run in self.block_steps:
                x = run(x, span, rope)
        else:
            for i, block in enumerate(self.layers):
                x = block(x, span, rope, probe) if hooks else block.forward(x, span, rope, None)
                if i == stop:
                    return None
        if last_only:
            x = x[:, -1:]
        if not hooks and self.tail_step is not None:
            logits = self.tail_step(x)
        else:
            logits = self.lm_head.forward(self.norm.forward(x))
        if self.logit_softcap is not None:
            logits = soft_cap(logits, self.logit_softcap)
        return logits

    def rope_at(self, start: int | torch.Tensor, T: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """cos and sign-folded sin of positions start..start+T-1, shaped to broadcast over (B, T, H, R):
        one pair per table (the global one, then Gemma 3's local one); a layer picks its own (Attention.rope_index)."""
        tables = [(self.rope_cos, self.rope_sin)]
        if self.cfg.local_rope_theta is not None:
            tables.append((self.rope_local_cos, self.rope_local_sin))
        if isinstance(start, torch.Tensor):  # one position per row, held on the device (T == 1): (B, 1, 1, R)
            return tuple((cos.index_select(0, start)[:, None, None], sin.index_select(0, start)[:, None, None]) for cos, sin in tables)
        return tuple((cos[start : start + T, None], sin[start : start + T, None]) for cos, sin in tables)  # (T, 1, R)


def _hooked(blocks: nn.ModuleList) -> bool:
    """Whether a hook (on a block, or on every module) would see the blocks one by one (model/explain.py)."""
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks) or any(b._forward_hooks or b._forward_pre_hooks for b in blocks)


class Block(nn.Module):
    """x + post(attn(pre(x))), then the same with the MLP; a norm the family lacks is an identity.

    Llama and most: pre only. Gemma 2/3: pre and post (four norms). OLMo 2: post only. GPT-NeoX:
    attention and MLP both read x and add at once (parallel residual).
    """

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg) if cfg.pre_norm else nn.Identity()
        self.attn = Attention(cfg, index)
        self.attn_post_norm = make_norm(cfg) if cfg.post_norm else nn.Identity()
        self.mlp_norm = make_norm(cfg) if cfg.pre_norm else nn.Identity()
        self.mlp = GatedMLP(cfg) if cfg.mlp == "gated" else MLP(cfg)
        self.mlp_post_norm = make_norm(cfg) if cfg.post_norm else nn.Identity()
        self.parallel = cfg.parallel_residual

    # The parts are called through `forward`: hooks attach to the Block (model/explain.py) or above.
    def forward(self, x: torch.Tensor, span: Span, rope: tuple | None, probe: Probe | None) -> torch.Tensor:
        return self.finish(x, self.attn.forward(self.attn_norm.forward(x), span, rope, probe))

    def finish(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The rest of the block after the attention's output `a` (its o product done): its norm, the residual, the MLP."""
        h = self.attn_post_norm.forward(a)
        if self.parallel:
            return x + h + self.mlp_post_norm.forward(self.mlp.forward(self.mlp_norm.forward(x)))
        x = x + h
        return x + self.mlp_post_norm.forward(self.mlp.forward(self.mlp_norm.forward(x)))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = cfg.layer_windows[index]  # sliding window (None: every earlier key)
        self.rope_index = 1 if cfg.uses_local_rope(index) else 0  # which of Decoder.rope_at's tables
        self.scale = cfg.attn_scale  # 1/√D, or Gemma's 1/√query_pre_attn_scalar
        self.softcap = cfg.attn_softcap  # Gemma 2: scores → cap·tanh(scores/cap), before the mask
        H, G, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv = Linear(cfg.dim, (H + 2 * G) * D, bias=cfg.qkv_bias)  # fused [q | k | v]
        self.o = Linear(H * D, cfg.dim, bias=cfg.o_bias)
        # RMSNorm on q and k before RoPE: over each head's D (Qwen3, Gemma 3) or over all H·D and G·D (OLMo 2).
        self.qk_norm = cfg.qk_norm
        self.q_norm = make_norm(cfg, D if cfg.qk_norm == "head" else H * D) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, D if cfg.qk_norm == "head" else G * D) if cfg.qk_norm else None
        self.cache: KVCache | None = None

    def project(self, x: torch.Tensor, rope: tuple | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, D) and this chunk's keys and values (B, G, T, D): normed (if the family norms
        them) and rotated by position (`rope`: this layer's cos and sin; None leaves them unrotated)."""
        B, T, _ = x.shape
        H, G, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv.forward(x).view(B, T, H + 2 * G, D)
        qk = qkv[:, :, : H + G]  # queries and keys normed and rotated together: one set of element-wise ops
        if self.q_norm is not None:
            qk = self.norm_qk(qk)
        if rope is not None:
            qk = apply_rope(qk, *rope)  # (B, T, H+G, D)
        q, k = qk.transpose(1, 2).split([H, G], dim=1)  # (B, H, T, D), (B, G, T, D)
        return q, k, qkv[:, :, H + G :].transpose(1, 2)

    def norm_qk(self, qk: torch.Tensor) -> torch.Tensor:
        """The q and k norms, each with its own weight: (B, T, H+G, D) → the same."""
        B, T = qk.shape[:2]
        H, G, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k = qk.split([H, G], dim=2)
        if self.qk_norm == "flat":  # over the whole projection: (B, T, H·D) and (B, T, G·D)
            q = self.q_norm.forward(q.reshape(B, T, H * D)).view(B, T, H, D)
            k = self.k_norm.forward(k.reshape(B, T, G * D)).view(B, T, G, D)
        else:
            q, k = self.q_norm.forward(q), self.k_norm.forward(k)
        return torch.cat([q, k], dim=2)

    def forward(self, x: torch.Tensor, span: Span, rope: tuple | None, probe: Probe | None) -> torch.Tensor:
        q, k, v = self.project(x, rope[self.rope_index] if rope is not None else None)
        return self.o.forward(self.attend(q, k, v, span, probe))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: Span, probe: Probe | None) -> torch.Tensor:
        """This chunk's keys and values into the cache, its queries over every key so far: the heads side by side
        (B, T, H·D), before the o product."""
        B, _, T, _ = q.shape
        k, v = self.cache.update(span, k, v)  # (B, G, S, D), S = start + T
        if probe is not None and self.index in probe.layers:
            probe.observe(self.index, self, q, k, v, span.start)
        y = attention(q, k, v, span.start, self.window, self.scale, self.softcap, self.cache.q)  # (B, H, T, D)
        return y.transpose(1, 2).reshape(B, T, -1)

    def scores(self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        """This layer's explicit pre-softmax scores (B, H, T, S): scaled, soft-capped, masked keys at -inf
        (see attention_scores). What the softmax sees, and what inspect's `--values scores` shows."""
        return attention_scores(q, k, q_pos, self.window, self.scale, self.softcap)

    def visible(self, q_pos: torch.Tensor, S: int) -> torch.Tensor:
        """Which of keys 0..S-1 each query position sees in this layer: (T, S) bool (the one mask rule)."""
        return causal_mask(q_pos, S, self.window)


class KVCache(nn.Module):
    """Keys and values of every position so far, preallocated, written in place."""

    def __init__(self, batch: int, heads: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)  # (B, G, S_max, D)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # The last step's queries (B, H, 1, D), for a compiled CPU step's attention (one_query_attention).
        self.register_buffer("q", torch.zeros(batch, heads, 1, head_dim, dtype=dtype, device=device), persistent=False)

    def update(self, span: Span, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this chunk's k, v (B, G, T, D) at its positions in its cache rows; the keys and values
        (B, G, S, D) of positions 0..start+T-1.

        With a tensor start (one token per row at its own position, Decoder.step) the cache up to
        `span.keys` (all of it by default) is returned: keys after each row's position are masked
        by `attention`.
        """
        B, G, T, D = k.shape
        ck, cv = self.k, self.v
        if span.row or B != ck.shape[0]:  # some rows of the cache: views, so writes land in it
            ck, cv = ck.narrow(0, span.row, B), cv.narrow(0, span.row, B)
        start = span.start
        if isinstance(start, torch.Tensor):
            at = start.view(B, 1, 1, 1).expand(B, G, 1, D)  # row b writes position start[b]
            ck.scatter_(2, at, k)
            cv.scatter_(2, at, v)
            if span.keys is None:
                return ck, cv
            return ck.narrow(2, 0, span.keys), cv.narrow(2, 0, span.keys)
        ck.narrow(2, start, T).copy_(k)
        cv.narrow(2, start, T).copy_(v)
        return ck.narrow(2, 0, start + T), cv.narrow(2, 0, start + T)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of cache row `src` into row `dst` (a batch compacting its rows)."""
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]


# --- attention: the fused path and the explicit one --------------------------------------


def causal_mask(q_pos: torch.Tensor, S: int, window: int | None = None) -> torch.Tensor:
    """The one mask rule: a query at absolute position p sees keys 0..p, or with a sliding window W
    only the last W of them, p-W+1..p (Mistral, Qwen2's window layers; transformers'
    `sliding_window_overlay`). (…, T) → (…, T, S) bool: per row of a batch when q_pos is (B, 1, T)."""
    keys = torch.arange(S, device=q_pos.device)
    visible = keys <= q_pos[..., None]
    if window is not None:
        visible &= keys > q_pos[..., None] - window
    return visible


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int | torch.Tensor,
    window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    queries: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(QKᵀ·scale + mask)·V with the fused kernel. q (B, H, T, D) at start..start+T-1; k, v (B, G, S, D).

    The mask is `causal_mask`'s; the branches below only avoid building it where the kernel's own
    (or none) is the same. `scale` defaults to 1/√D. The fused kernel has no soft-cap (a tanh on
    the scores is no additive mask), so a capped layer (Gemma 2) takes the explicit path. A compiled CPU
    step's one query takes `one_query_attention`, which writes it into `queries` (the layer's KVCache.q).
    """
    T, S = q.shape[2], k.shape[2]
    if softcap is not None:
        if isinstance(start, int) and T == 1 and window is None:  # one new query sees every cached key: no mask to build
            return explicit_attention(q, k, v, None, None, scale, softcap)[0]
        # A tensor start is one query per row at its own position: (B, 1, 1), the mask then (B, 1, 1, S). A window
        # is a mask too, not a slice (see below).
        q_pos = start.view(-1, 1, 1) if isinstance(start, torch.Tensor) else torch.arange(start, start + T, device=q.device)
        return explicit_attention(q, k, v, q_pos, window, scale, softcap)[0]
    gqa = q.shape[1] != k.shape[1]
    if isinstance(start, torch.Tensor):  # one query per row at its own device-held position (B,), over S cached keys
        mask = causal_mask(start.view(-1, 1, 1), S, window)  # (B, 1, 1, S): per row, shared by the heads
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if T == 1 and queries is not None and q.is_cpu and torch.compiler.is_compiling():  # a compiled CPU decode step
        visible = None if window is None else causal_mask(torch.arange(start, start + 1, device=q.device), S, window)
        return one_query_attention(q, k, v, queries, visible, scale)
    if T == 1 and window is None:  # one new query sees every cached key
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    if T > 1 and start == 0 and (window is None or T <= window):  # square causal: the kernel's own top-left-aligned mask
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    # A chunk after cached tokens (is_causal would align top-left and hide the cache), a chunk past a window,
    # or one query with a window: a mask, not a slice of the last W keys behind a branch on S > W, so that one
    # step exported with a symbolic position (model/compile.py) serves both sides of the window.
    mask = causal_mask(torch.arange(start, start + T, device=q.device), S, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def one_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, queries: torch.Tensor, visible: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """softmax(q·Kᵀ·scale)·V for one query per row, q (B, H, 1, D), k, v (B, G, S, D), written as two reductions
    that inductor turns into its own loops: what a compiled CPU decode step runs (`attention`). The fused kernel's
    products there are one-row GEMMs, which MKL takes down its generic path on AMD CPUs (`mkl_blas_def_xsgemv`,
    7.6% of the int8 step on a Zen5). `visible` (1, S) hides keys outside a sliding window.

    The queries are first written into `queries` (KVCache.q, shaped like q): without that write inductor inlines
    RoPE into the q·K loop and rotates the query again for every key (the step was slower than with the fused
    kernel). Measured on that Zen5, 2 threads, the default model's int8 step (9 query and 3 KV heads), the best of
    5 × 200 tokens, three runs alternating with the fused kernel's: 5.55–6.21 ms a token at position 64 against
    6.20–6.48; 8.03–8.53 against 8.69–9.74 at position 1000."""
    B, H, _, D = q.shape
    G = k.shape[1]
    if queries.shape == q.shape:  # (a batch narrower than the cache's rows reads q as it is)
        queries.select(2, 0).copy_(q.select(2, 0))
        q = queries
    qg = q.float().reshape(B, G, H // G, 1, D)  # the R = H/G query heads that share a KV head
    dots = (qg * k.float()[:, :, None]).sum(-1) * (D**-0.5 if scale is None else scale)  # (B, G, R, S)
    if visible is not None:
        dots = dots.masked_fill(~visible, float("-inf"))
    out = (dots.softmax(dim=-1)[..., None] * v.float()[:, :, None]).sum(-2)  # (B, G, R, D)
    return out.reshape(B, H, 1, D).to(q.dtype)


def scaled_dots(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Q·K_j × scale (default 1/√D) in float32, every pair: q (B, H, T, D), k (B, G, S, D) → (B, H, T, S)."""
    B, H, T, D = q.shape
    G, S = k.shape[1], k.shape[2]
    # The R = H/G query heads that share a KV head stacked as rows: one product per KV head, K never repeated.
    qg = q.float().reshape(B, G, (H // G) * T, D)  # (B, G, R·T, D)
    dots = qg @ k.float().transpose(-1, -2)  # (B, G, R·T, S)
    return (dots * (D**-0.5 if scale is None else scale)).view(B, H, T, S)


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap·tanh(x/cap): near x for |x| ≪ cap, never beyond ±cap (Gemma 2's scores and logits)."""
    return torch.tanh(x / cap) * cap


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor | None,
    window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Explicit pre-softmax scores in float32: QKᵀ·scale, soft-capped if the layer caps, then the keys the
    mask hides (future, outside the window) at -inf. q (B, H, T, D) at absolute positions q_pos (T,) (or (B, 1, T), per row);
    k (B, G, S, D) → (B, H, T, S). `q_pos` None: every key is visible (the caller kept only those).
    Prefer `Attention.scores`, which passes the layer's own settings.
    """
    scores = scaled_dots(q, k, scale)
    if softcap is not None:
        scores = soft_cap(scores, softcap)
    if q_pos is None:
        return scores
    return scores.masked_fill(~causal_mask(q_pos, k.shape[2], window), float("-inf"))


def explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor | None,
    window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same attention written out, softmax in float32: (output (B, H, T, D), weights (B, H, T, S))."""
    B, H, T, D = q.shape
    G, S = k.shape[1], k.shape[2]
    weights = attention_scores(q, k, q_pos, window, scale, softcap).softmax(dim=-1)
    out = weights.view(B, G, (H // G) * T, S) @ v.float()  # (B, G, R·T, D)
    return out.view(B, H, T, D).to(q.dtype), weights


# --- parts -------------------------------------------------------------------------------


class Linear(nn.Module):
    """y = x @ W (+ b) with W stored (in, out): the plain layer (CUDA, the compiled step, float16,
    ATTN_KERNELS=generic). On the CPU in float32/bfloat16 an eager model swaps it for oneDNN's packed
    layer (model/quant/packed.py) as it opens.

    Measured on a 2-core AVX-512 CPU for every shape of a 135M Llama, one row and 64 rows:
    `x @ W` with W (in, out) is as fast as or faster than `F.linear` on W (out, in) (up to 4×
    on the 49152-wide head, where MKL's F.linear GEMV runs on one thread). README, Performance, has the numbers.
    """

    def __init__(self, n_in: int, n_out: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.empty(n_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self.weight
        K, N = W.shape
        if torch.compiler.is_compiling():
            if x.numel() == K and W.t().is_contiguous():
                # One row, compiled, W in (out, in) storage (model.quant.unpack for --compile): a reduction along each
                # stored row, which inductor vectorizes and spreads over the cores. Measured in AOTInductor packages
                # over the default model's four block shapes, Zen4 2 threads: 460–760 µs against 1030–1350 for `x @ W`
                # (with a norm's hypot in the loop; in rsqrt form, RMSNorm.forward, the whole block 210 µs).
                y = (x.reshape(1, K) * W.t()).sum(-1).view(*x.shape[:-1], N)
            else:
                y = x @ W
        elif x.is_cpu and x.numel() == K and N % 2 == 0 and W.is_contiguous():
            # One row on the CPU (an eager decode step): MKL's GEMV streams W on one thread; as a batch of
            # two products over W's two column halves (a view, no copy) it runs on two. Measured over the
            # default model's 121 matrices in order, Zen4 2 threads: 43-45 → 32-33 ms a token; decode
            # 18.6 → 21.0 tok/s. (inductor copies the strided halves: compiled steps keep `x @ W`.)
            y = torch.matmul(x.reshape(1, K), W.view(K, 2, N // 2).transpose(0, 1)).view(*x.shape[:-1], N)
        elif x.is_cpu and W.t().is_contiguous() and x.dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available():
            # On the CPU with W in (out, in) storage (a compiled model's layers, model.quant.unpack, which the prefill runs
            # eagerly): oneDNN reads that layout as it is. Measured over the default model's 120 block matrices at 64 rows,
            # Zen4 2 threads: 100-102 ms against 127-177 for MKL's `x @ W` (82-84 with the weights packed); one row of
            # the 3072×576 gate/up: 99 µs against 198.
            return torch.ops.mkldnn._linear_pointwise(x, W.t(), self.bias, "none", [], "")
        else:
            y = x @ W
        return y + self.bias if self.bias is not None else y

    def dense_weight(self) -> torch.Tensor:
        """W as a float tensor (in, out), whatever the storage (model/quant/ has int8 and int4 ones)."""
        return self.weight

    def columns(self, ids: torch.Tensor) -> torch.Tensor:
        """Columns `ids` of W as rows (…, in): a tied head's (C, V) matrix read as the embedding."""
        return self.weight.t()[ids]


class RMSNorm(nn.Module):
    """x / rms(x) · w; Gemma's is x / rms(x) · (1 + w) (`offset`), its weights stored around 0."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0, weight_in_float32: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight_in_float32 = weight_in_float32  # Gemma, OLMo 2 round once after the weight; Llama before
        self.weight = nn.Parameter(torch.ones(dim))
        # √eps as a 0-dim CPU tensor (for `hypot`; a CPU scalar tensor is accepted by any device's ops).
        self.eps_root = torch.tensor(eps**0.5, dtype=torch.float32, device="cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and not torch.compiler.is_compiling():
            # √(mean(x²) + eps) = hypot(‖x‖/√C, √eps): five kernels where F.rms_norm runs ten (one row:
            # 10 µs a call against 7 µs, 61 calls per token); the result differs from it by ≤ 5e-7.
            rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).mul_(x.shape[-1] ** -0.5).hypot_(self.eps_root)
            return torch.div(x, rms).mul_(self.weight + self.offset if self.offset else self.weight)
        # In float32 whatever the weights' dtype, then rounded, as each family's reference does. Compiled, float32
        # too: inductor computes the scale inside the next product's loop, once per 16 weights, and rsqrt costs
        # little there where hypot is a libm call (measured on the 3072×576 gate/up product, Zen4 2 threads:
        # 127 µs against 453; the product alone 103).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_in_float32:
            return (xf * (self.weight.float() + self.offset)).to(x.dtype)
        return self.weight * xf.to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The family's norm over `dim` (default C): LayerNorm with bias, or its RMSNorm."""
    if cfg.norm == "layer":
        return nn.LayerNorm(dim or cfg.dim, eps=cfg.norm_eps)
    return RMSNorm(dim or cfg.dim, cfg.norm_eps, cfg.norm_offset, cfg.norm_weight_in_float32)


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": partial(F.gelu, approximate="tanh")}


class GatedMLP(nn.Module):
    """down(act(gate) · up): SwiGLU (Llama, SiLU) or GeGLU (Gemma, tanh GELU)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.hidden = cfg.hidden_dim
        self.act = ACTIVATIONS[cfg.act]
        self.gate_up = Linear(cfg.dim, 2 * cfg.hidden_dim, bias=cfg.mlp_bias)  # fused [gate | up]
        self.down = Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up.forward(x).split(self.hidden, dim=-1)
        return self.down.forward(self.act(gate) * up)


class MLP(nn.Module):
    """down(act(up(x))): GPT-2 (tanh GELU, "gelu_new"), GPT-NeoX (exact GELU)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[cfg.act]
        self.up = Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.down = Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down.forward(self.act(self.up.forward(x)))


# --- rotary position embedding -----------------------------------------------------------


def rope_tables(cfg: ModelConfig, max_len: int, device, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin of position × frequency, (S_max, R), each frequency twice ([f | f], HF layout).

    HF's `rotate_half(x) * sin` is `[-x2, x1] * [sin | sin]` = `[x2, x1] * [-sin | sin]`: with the
    sign folded into the table, the rotation is a roll of x and no negation (apply_rope). LongRoPE's
    attention factor scales both tables, as transformers does. `local`: Gemma 3's local table.
    """
    inv, factor = rope_inv_freq(cfg, max_len, local)
    inv = inv.to(device)
    freqs = torch.arange(max_len, device=device, dtype=torch.float32)[:, None] * inv[None, :]  # (S_max, R/2)
    cos, sin = torch.cat([freqs, freqs], dim=-1).cos(), torch.cat([-freqs.sin(), freqs.sin()], dim=-1)
    return (cos * factor, sin * factor) if factor != 1.0 else (cos, sin)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, D) by position with HF's `rotate_half` pairing (i, i + R/2); `sin` sign-folded (rope_tables).

    With partial rotary (the tables R < D wide: GPT-NeoX, Phi-4-mini) only the first R dims turn.
    """
    R = cos.shape[-1]
    if R == x.shape[-1]:
        return torch.addcmul(x * cos, x.roll(R // 2, dims=-1), sin)  # roll: [x1, x2] → [x2, x1]
    head = x[..., :R]
    return torch.cat([torch.addcmul(head * cos, head.roll(R // 2, dims=-1), sin), x[..., R:]], dim=-1)
