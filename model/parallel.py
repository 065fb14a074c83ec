"""Tensor parallelism on torch.distributed: each of N processes holds a slice of every layer.

Megatron-LM's split (Shoeybi et al. 2019, "Megatron-LM"; gpt-fast's tp.py does the same for Llama):

- Attention by whole KV-head groups: rank r owns KV heads r·G/N … and the query heads that read them.
  Its columns of the fused q|k|v weight are a plain `Linear` (column-parallel: nothing to exchange),
  attention runs on its heads alone, and its KV cache holds only them. W_O is row-parallel
  (`RowParallel`): each rank multiplies its heads' rows of W_O, one all-reduce sums the parts.
- The MLP likewise: gate|up column-parallel, down row-parallel, one all-reduce.
- The vocabulary is split too: each rank holds V/N rows of the embedding and columns of the head
  (one matrix when they are tied). The embedding sums each token's row from the rank that holds it
  (one all-reduce of (B, T, C)); the head's logits are all-gathered (`VocabParallelHead`). Chosen
  over a replicated embedding and head (`Shard.plan(vocab_parallel=False)`) by measurement (README,
  Tensor parallel): the default model's tied 49152 × 576 matrix is 21% of its weights; split, each
  of 3 ranks holds 72 MiB less (409 vs 481 MiB resident) and decodes as fast or faster (9.1 vs 8.4
  tok/s), the all-gather of the logits costing less than reading the whole head on every rank.
- Every rank ends each forward with the same logits (an all-gather copies the same bytes to all),
  so with the same seed each samples the same token; every forward checks that the ranks feed the
  same ids (`Shard.check_same_ids`), so a divergence is an error, never a silent mix.

Each rank reads only its slices of the safetensors files (`load_shard`). A sharded `Decoder` has
`shard` set, and its `cfg` is its local one (its heads, its MLP width, its vocabulary slice). The
microscope (model/probe.py, model/explain.py, model/heads.py) runs on each rank's heads and gathers
them through the `Shard`, so every rank gets what a single process would have computed.

A collective that fails (another rank exited, or did not answer within the group's timeout) raises
`RankLost`, an `AttnError`: one line, exit 1.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.decoder import Decoder, Linear
from model.errors import AttnError
from model.loading import checkpoint_files, part_offsets, part_sizes, plan_loading


class RankLost(AttnError):
    """A collective failed: another rank exited, or did not answer within the group's timeout.

    Only rank 0 reports it (exit 1). On another rank it is a consequence, not the cause: it exits 0
    there, so torchrun and `attn --tp`'s launcher name the rank that did fail."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.exit_code = 1 if rank == 0 else 0


def _lost(e: Exception, group: Any = None) -> RankLost:
    # Gloo's messages start with a source location in brackets: keep what follows it.
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    reason = reason.rsplit("] ", 1)[-1].split(". ")[0]
    return RankLost(f"tensor-parallel: another rank exited or stopped answering ({reason})", dist.get_rank(group))


def valid_sizes(cfg: ModelConfig) -> list[int]:
    """The process counts a model splits over: those dividing its KV heads (a rank owns whole groups)."""
    return [n for n in range(1, cfg.n_kv_heads + 1) if cfg.n_kv_heads % n == 0]


def unsplittable(cfg: ModelConfig) -> str | None:
    """Why a model cannot be split by heads at all (None: it can)."""
    if cfg.qk_norm == "flat":  # one RMS over every head's q: each rank would need all of them
        return f"{cfg.model_type} norms q and k over all heads together (OLMo 2), which a split by heads cannot compute"
    return None


def _even(n: int, world: int, rank: int) -> range:
    """Rank's contiguous part of 0..n-1, the parts' sizes differing by at most one."""
    size, extra = divmod(n, world)
    start = rank * size + min(rank, extra)
    return range(start, start + size + (rank < extra))


@dataclass
class Shard:
    """Which part of the model one rank holds, and the collectives between the ranks."""

    rank: int
    world: int
    heads: range  # this rank's query heads (global indices)
    kv_heads: range  # the KV heads they read
    hidden: range  # its MLP inner columns
    vocab: range  # its vocabulary rows (embedding) and columns (head)
    vocab_width: int  # every rank's vocabulary slice, padded to one width for the all-gather
    vocab_size: int  # the whole vocabulary
    group: Any = None  # the process group (None: the default one)
    vocab_parallel: bool = True  # False: every rank holds the whole embedding and head (measured against)

    @classmethod
    def plan(cls, cfg: ModelConfig, rank: int, world: int, group: Any = None, vocab_parallel: bool = True) -> "Shard":
        if cfg.n_kv_heads % world:
            raise ValueError(f"{cfg.n_kv_heads} KV heads do not split over {world} ranks (valid: {valid_sizes(cfg)})")
        if world > 1 and unsplittable(cfg):
            raise ValueError(unsplittable(cfg))
        h, g = cfg.n_heads // world, cfg.n_kv_heads // world
        width = -(-cfg.vocab_size // world) if vocab_parallel else cfg.vocab_size
        vocab = range(min(rank * width, cfg.vocab_size), min((rank + 1) * width, cfg.vocab_size)) if vocab_parallel else range(cfg.vocab_size)
        return cls(
            rank, world, range(rank * h, (rank + 1) * h), range(rank * g, (rank + 1) * g),
            _even(cfg.hidden_dim, world, rank), vocab, width, cfg.vocab_size, group, vocab_parallel,
        )

    # --- collectives (a failure is RankLost) ---

    def all_reduce(self, t: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
        try:
            dist.all_reduce(t, op=op, group=self.group)
        except RuntimeError as e:
            raise _lost(e, self.group) from None
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` stacked in rank order: (N, *t.shape)."""
        out = t.new_empty((self.world, *t.shape))
        try:
            dist.all_gather(list(out.unbind(0)), t.contiguous(), group=self.group)
        except RuntimeError as e:
            raise _lost(e, self.group) from None
        return out

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except RuntimeError as e:
            raise _lost(e, self.group) from None
        return out

    def broadcast_object(self, obj: Any, src: int) -> Any:
        """`obj` of rank `src` on every rank (tensors travel on the CPU)."""
        return broadcast_object(obj, src, self.group)

    # --- the vocabulary ---

    def check_same_ids(self, ids: torch.Tensor) -> None:
        """Every rank must feed the same tokens: each samples its own copy of the same logits with the same
        seed. One all-reduce (max of ids and of −ids) tells every rank at once if any differs."""
        flat = ids.reshape(-1)
        both = torch.cat([flat, -flat])
        mine = both.clone()
        self.all_reduce(both, dist.ReduceOp.MAX)
        if not torch.equal(both, mine):
            raise AttnError("tensor-parallel ranks sampled different tokens (their logits or random state diverged)")

    def embed(self, ids: torch.Tensor, rows: Any) -> torch.Tensor:
        """Embeddings (B, T, C) of `ids`: `rows(local_ids)` looks up this rank's slice; each token's row
        comes from the rank that holds it, the others add zeros (exact in any dtype)."""
        self.check_same_ids(ids)
        if not self.vocab_parallel:
            return rows(ids)
        mine = (ids >= self.vocab.start) & (ids < self.vocab.stop)
        x = rows(torch.where(mine, ids - self.vocab.start, 0)).masked_fill(~mine[..., None], 0)
        return self.all_reduce(x)

    # --- heads, for the microscope ---

    def owner(self, head: int) -> int:
        """The rank holding query head `head`."""
        return head // len(self.heads)

    def local_heads(self, heads: list[int]) -> list[int]:
        """The heads of `heads` (global, in that order) this rank holds, as its own indices."""
        return [h - self.heads.start for h in heads if h in self.heads]

    def gather_heads(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Per-head results of this rank's heads along `dim` → those of every head, on every rank."""
        parts = self.all_gather(t)  # (N, …): ranks hold equal, contiguous runs of heads
        return torch.cat(parts.unbind(0), dim=dim)

    def gather_rows(self, rows: dict[Any, torch.Tensor], heads: list[int]) -> dict[Any, torch.Tensor]:
        """Tensors whose rows are this rank's part of `heads` (`local_heads` order) → rows for all of
        `heads`, in that order, on every rank. One collective for the whole dict."""
        device = next(iter(rows.values())).device if rows else None
        parts = self.all_gather_object({k: t.cpu() for k, t in rows.items()})
        order = []  # (rank, row in that rank's part) of each asked head
        taken = [0] * self.world
        for h in heads:
            r = self.owner(h)
            order.append((r, taken[r]))
            taken[r] += 1
        return {k: torch.stack([parts[r][k][i] for r, i in order]).to(device) for k in rows}


def broadcast_object(obj: Any, src: int, group: Any = None) -> Any:
    box = [obj]
    try:
        dist.broadcast_object_list(box, src=src, group=group, device=torch.device("cpu"))
    except RuntimeError as e:
        raise _lost(e, group) from None
    return box[0]


# --- the parallel layers ----------------------------------------------------------------------


class RowParallel(nn.Module):
    """A linear layer over this rank's rows of W (in, out) and its slice of x: partial products summed
    by one all-reduce. W_O (the rows of this rank's heads) and the MLP's down projection.

    The rows live in an inner `Linear` without bias, so walking the model for `Linear`s (model/quant)
    finds them; the bias, whole on every rank, is added once, after the sum.
    """

    def __init__(self, linear: Linear, shard: Shard) -> None:
        super().__init__()
        self.bias = linear.bias
        linear.bias = None
        self.linear = linear
        self.shard = shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.shard.all_reduce(self.linear.forward(x))
        return y + self.bias if self.bias is not None else y

    def dense_weight(self) -> torch.Tensor:
        """This rank's rows of W (in_local, out): for W_O, its heads' rows in head order."""
        return self.linear.dense_weight()


class VocabParallelHead(nn.Module):
    """The output head over this rank's vocabulary columns; the logits of every slice gathered.

    With tied embeddings the same matrix is the embedding (`columns`)."""

    def __init__(self, linear: Linear, shard: Shard) -> None:
        super().__init__()
        self.linear = linear  # (C, W): this rank's columns, zero-padded to the common width
        self.shard = shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.shard.vocab_parallel:
            return self.linear.forward(x)  # the whole head on every rank: the same logits everywhere
        parts = self.shard.all_gather(self.linear.forward(x))  # (N, B, T, W)
        return parts.movedim(0, -2).flatten(-2)[..., : self.shard.vocab_size]  # (B, T, V): slices in vocabulary order

    def columns(self, ids: torch.Tensor) -> torch.Tensor:
        return self.shard.embed(ids, self.linear.columns)

    def dense_weight(self) -> torch.Tensor:
        return self.linear.dense_weight()


class VocabParallelEmbedding(nn.Module):
    """The token embedding over this rank's vocabulary rows (untied models)."""

    def __init__(self, embedding: nn.Embedding, shard: Shard) -> None:
        super().__init__()
        self.weight = embedding.weight  # (W, C)
        self.shard = shard

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.shard.embed(ids, lambda local: F.embedding(local, self.weight))


# --- loading a shard --------------------------------------------------------------------------


def local_config(cfg: ModelConfig, shard: Shard) -> ModelConfig:
    """The config of the model one rank builds: its heads, its MLP columns, its vocabulary slice."""
    return replace(cfg, n_heads=len(shard.heads), n_kv_heads=len(shard.kv_heads), hidden_dim=len(shard.hidden), vocab_size=shard.vocab_width)


def splits(cfg: ModelConfig, shard: Shard) -> dict[str, tuple[int, list[tuple[int, int]]]]:
    """Our split tensors (generic names) → (the dimension split, the ranges of it this rank keeps, in
    the whole tensor's coordinates). Kept ranges placed one after another make the local tensor: for
    q|k|v, this rank's q | its k | its v, which is the local config's own fused layout. Tensors not
    named here (norms, positions, the biases added after a sum) are whole on every rank."""
    D, H, G, F_ = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim
    h, g, f, v = shard.heads, shard.kv_heads, shard.hidden, shard.vocab
    q = (h.start * D, h.stop * D)
    qkv = [q, (H * D + g.start * D, H * D + g.stop * D), ((H + G) * D + g.start * D, (H + G) * D + g.stop * D)]
    gate_up = [(f.start, f.stop), (F_ + f.start, F_ + f.stop)]
    return {
        "layers.{}.attn.qkv.weight": (1, qkv),
        "layers.{}.attn.qkv.bias": (0, qkv),
        "layers.{}.attn.o.weight": (0, [q]),
        "layers.{}.mlp.gate_up.weight": (1, gate_up),
        "layers.{}.mlp.gate_up.bias": (0, gate_up),
        "layers.{}.mlp.up.weight": (1, [(f.start, f.stop)]),
        "layers.{}.mlp.up.bias": (0, [(f.start, f.stop)]),
        "layers.{}.mlp.down.weight": (0, [(f.start, f.stop)]),
        "lm_head.weight": (1, [(v.start, v.stop)]),
        "tok_emb.weight": (0, [(v.start, v.stop)]),
    }


def load_shard(path: Path, shard: Shard, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Decoder:
    """Build this rank's part of the model in a directory and fill it from its slices of the files.

    The checkpoint is checked against the whole model's config (as load_model does); then only the
    bytes of this rank's rows or columns are read (safetensors slices), so a rank's memory is 1/N of
    the split weights plus the whole ones.
    """
    path = Path(path)
    cfg = ModelConfig.from_dir(path)
    with torch.device("meta"):
        whole = Decoder(cfg)
        model = Decoder(local_config(cfg, shard))
    plan = plan_loading(cfg, checkpoint_files(path), {k: tuple(p.shape) for k, p in whole.state_dict().items()})
    shapes = {k: tuple(p.shape) for k, p in model.state_dict().items()}
    model.load_state_dict(read_shard(plan, cfg, shard, shapes, dtype, device), assign=True)
    for block in model.layers:
        block.attn.o = RowParallel(block.attn.o, shard)
        block.mlp.down = RowParallel(block.mlp.down, shard)
    model.lm_head = VocabParallelHead(model.lm_head, shard)
    if model.tok_emb is not None:
        model.tok_emb = VocabParallelEmbedding(model.tok_emb, shard)
    model.shard = shard
    return model.eval()


def read_shard(
    plan: dict[str, list], cfg: ModelConfig, shard: Shard, shapes: dict[str, tuple], dtype: torch.dtype, device
) -> dict[str, torch.Tensor]:
    """Fill each local tensor from the checkpoint pieces of `plan` (load_model's), reading only the kept ranges."""
    rules = splits(cfg, shard)
    offsets, sizes = part_offsets(cfg), part_sizes(cfg)
    # zeros: the padding of a short vocabulary slice stays 0 (its logits are cut off after the gather)
    state = {name: torch.zeros(shapes[name], dtype=dtype, device=device) for name in plan}
    by_file: dict[Path, list] = {}
    for name, pieces in plan.items():
        for raw_key, f, part, transpose, fix in pieces:
            by_file.setdefault(f, []).append((name, raw_key, part, transpose, fix))
    for f, items in by_file.items():
        with _Ranges(f) as fh:
            for name, raw_key, part, transpose, fix in items:
                dst = state[name]
                rule = rules.get(re.sub(r"layers\.\d+\.", "layers.{}.", name))
                if rule is None or fix is not None:  # whole on every rank; or reordered by its family first (GPT-NeoX's q|k|v)
                    src = fh.get_slice(raw_key)[:]
                    src = fix(src, cfg) if fix is not None else src
                    if rule is not None:
                        _place(src, dst, rule, part, transpose, offsets, sizes)
                        continue
                    src = src.t() if transpose else src
                    if part:
                        dst = dst[..., offsets[part] : offsets[part] + src.shape[-1]]
                    dst.copy_(src)
                    continue
                _place(fh.get_slice(raw_key), dst, rule, part, transpose, offsets, sizes)
    return state


class _Ranges:
    """One safetensors file, read by byte ranges (pread): a rank's rows of a tensor are one read, its columns one
    read per row, and nothing else comes into memory. (safetensors' own slices read the whole tensor first with
    its pread backend, which peaked at the largest tensor, the 113 MiB embedding of the default model, on top of
    the shard; its mmap backend kept every page a rank touched resident until the file closed.)

    The format: 8 bytes (little-endian length n), n bytes of JSON header {name: {dtype, shape, data_offsets}},
    then the data, row-major, little-endian."""

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        (n,) = struct.unpack("<Q", self._read(8, 0))
        self.header = json.loads(self._read(n, 8))
        self.base = 8 + n

    def __enter__(self) -> "_Ranges":
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def _read(self, n: int, at: int, into: Any = None) -> bytes:
        if into is None:
            data = os.pread(self.fd, n, at)
            if len(data) != n:
                raise AttnError(f"{self.path}: truncated safetensors file (wanted {n} bytes at {at}, got {len(data)})")
            return data
        got = os.preadv(self.fd, [into], at)
        if got != n:
            raise AttnError(f"{self.path}: truncated safetensors file (wanted {n} bytes at {at}, got {got})")
        return b""

    def get_slice(self, key: str) -> "_Slice":
        info = self.header[key]
        return _Slice(self, self.DTYPES[info["dtype"]], tuple(info["shape"]), self.base + info["data_offsets"][0])


@dataclass
class _Slice:
    """A tensor of a `_Ranges` file, read on indexing: `[:]` whole, `[lo:hi]` its rows, `[:, lo:hi]` its columns."""

    file: _Ranges
    dtype: torch.dtype
    shape: tuple
    at: int  # the file offset of its first byte

    def get_shape(self) -> tuple:
        return self.shape

    def __getitem__(self, index: Any) -> torch.Tensor:
        if not self.shape:  # a scalar
            out = torch.empty((), dtype=self.dtype)
            self.file._read(self.dtype.itemsize, self.at, _bytes(out))
            return out
        rows, cols = (index, slice(None)) if isinstance(index, slice) else index
        lo, hi, _ = rows.indices(self.shape[0])
        inner = self.shape[1:]
        row_bytes = math.prod(inner) * self.dtype.itemsize
        if cols == slice(None):  # whole rows: one read
            out = torch.empty((hi - lo, *inner), dtype=self.dtype)
            self.file._read(out.numel() * self.dtype.itemsize, self.at + lo * row_bytes, _bytes(out))
            return out
        a, b, _ = cols.indices(self.shape[1])  # columns of a matrix: one read per row
        out = torch.empty((hi - lo, b - a), dtype=self.dtype)
        rows_out = _bytes(out).reshape(hi - lo, -1)
        for i, r in enumerate(range(lo, hi)):
            self.file._read(rows_out.shape[1], self.at + r * row_bytes + a * self.dtype.itemsize, rows_out[i])
        return out


def _bytes(t: torch.Tensor) -> Any:
    """A writable byte view (numpy) of a contiguous CPU tensor, for os.preadv."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _place(src, dst: torch.Tensor, rule: tuple, part: str, transpose: bool, offsets: dict, sizes: dict) -> None:
    """Copy the kept ranges of one checkpoint piece (a `_Slice`, which reads only them, or a tensor) into the
    local tensor."""
    dim, ranges = rule
    ck_dim = (1 - dim) if transpose else dim  # the same dimension in the file's layout
    start = offsets[part] if part else 0  # where this piece sits in our whole tensor along `dim`
    length = sizes[part] if part else (src.shape if isinstance(src, torch.Tensor) else src.get_shape())[ck_dim]
    at = 0  # where the next kept range goes in the local tensor
    for a, b in ranges:
        if start <= a and b <= start + length:
            lo, hi = a - start, b - start
            piece = src[lo:hi] if ck_dim == 0 else src[:, lo:hi]
            dst.narrow(dim, at, hi - lo).copy_(piece.t() if transpose else piece)
        at += b - a
