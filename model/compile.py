"""Compiling the one-token decode step (`--compile`; on the CPU a run also loads one built before), with a fallback to eager.

Only the step generation repeats hundreds of times is compiled: `Decoder.step`, the one-token
`Decoder.forward(..., last_only=True)`.

- CPU: torch.compile (inductor), six blocks to a graph (every run of six shares it). The position is
  a dynamic integer, so the cache length S is a symbolic size and one compiled graph serves every
  step (no recompiling per token). Inductor fuses the element-wise work between the matrix
  products (norms, RoPE, SiLU·up, residual adds) into a few C++ loops and leaves the products to
  the same BLAS and int4pack calls as eager.
- CPU, with a cache folder (the CLI's `$ATTN_HOME/aoti`): each distinct block is compiled ahead of time by
  AOTInductor into a package kept there, keyed by torch version, the CPU's features, the block's code and
  settings, and its tensors' shapes, strides and dtypes (so by model and mode); a later run loads it in
  milliseconds and compiles nothing. The block's weights and cache are the package's inputs, so one package serves every block alike.
  A build that succeeds leaves a `ready-*.json` beside the packages, keyed by the model as it is opened, so that
  a later run can tell before changing anything whether it only has to load (`build=False`: the CLI's default).
  For int4/int8 models on CPUs with AMX tiles, the same build also makes (in a child process, beside it) the package
  that runs the blocks' work between their attentions at 8 rows and more, the prefill, with the products through
  inductor's AMX template (model/prefill.py). On CPUs whose best vector ISA is AVX2 the quantized layers first take their codes in the lanes
  layout (model/quant/lanes.py: one row inside the packages, the quantized head too; many rows through a package
  built once per machine for any layer of 4 or 8 bits, `prompt_package`).
- CUDA: one token's work is ≈ 600 small kernels, and launching them costs more than running
  them. The step runs in its static-shape form (the position is a device tensor, the whole cache
  is read with a mask: `Decoder.step`), is compiled by inductor with static shapes, and is
  captured once as a CUDA graph; each token is then one graph replay. If inductor fails, the
  eager step is captured instead.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import platform
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from model.cxx import BUILD_OPTIONS, compiles_beside_each_other, probe_vector_isa
from model.decoder import Block, Decoder, Linear, Span
from model.quant import add_lanes, cpu_features, drop_lanes, pack, unpack
from model.quant.int4 import BlockLinear
from model.quant.kernels import cpuinfo, lanes_wanted, one_row_kernel
from model.quant.lanes import INDUCTOR, LANES, Lanes, Prompt, PromptWeight, per_word, prompt_through_onednn, row_product


class CompileFailed(RuntimeError):
    """torch.compile could not build the step (no C++ compiler, unsupported platform, …)."""


class BuiltByAnother(CompileFailed):
    """Only loading (build=False): a build is recorded for this model and mode, but its packages are another version of
    attn's code (their keys hash it); this one's are not built. The record stays, so that each such run can say so."""


class NotBuilt(FileNotFoundError):
    """A package this step needs is not in the folder, and the step may only load."""


def compile_decode_step(model: Decoder, max_len: int, cache_dir: Path | None = None, build: bool = True) -> float:
    """Compile `model`'s one-token step for a cache of `max_len` positions (set up here); seconds taken.

    Generation reuses a cache that is long enough, so the step built here serves it; a longer
    generation sets up a new cache, which costs one recompilation (CPU) or a new capture (CUDA).
    With `cache_dir` (CPU) the blocks are built ahead of time once and kept there (AotStep), or
    through torch.compile where that fails. With `build=False` the packages are only loaded: where
    an earlier build did not leave them all for this model and mode, CompileFailed comes at once,
    before the model is touched. Raises CompileFailed (model left eager).
    """
    model.setup_cache(max(max_len, 3))
    t0 = time.perf_counter()
    if model.device.type == "cuda":
        if not build:
            raise CompileFailed("on CUDA nothing is built ahead of time")
        model.decode_step = GraphStep(model)
    else:
        ready = ready_file(model, cache_dir) if cache_dir is not None and model.shard is None else None
        if not build and (ready is None or not _is_ready(ready)):
            raise CompileFailed("not built for this model and mode")
        unpacked = unpack(model)  # oneDNN's packed weights are opaque to inductor: plain layers again
        add_lanes(model)  # quantized codes in the layout the step's loops read, where that is faster (AVX2 CPUs)
        try:
            model.decode_step = step = _cpu_step(model, cache_dir, build)
        except CompileFailed as e:
            drop_lanes(model)
            if unpacked:
                pack(model)
            if not build and ready is not None:
                if isinstance(e.__cause__, NotBuilt):  # the record names packages of another version of attn
                    raise BuiltByAnother("built by another version of attn") from e
                ready.unlink(missing_ok=True)  # a package there but not loadable: later runs need not try again
            raise
        if ready is not None and isinstance(step, AotStep):
            _mark_ready(ready, step.packages)
    return time.perf_counter() - t0


def _cpu_step(model: Decoder, cache_dir: Path | None, build: bool = True) -> BuiltStep:
    """The ahead-of-time step where there is a folder for its packages (not under --tp), else or where it
    cannot be built, the torch.compile one (only when building)."""
    if cache_dir is not None and model.shard is None:
        try:
            return AotStep(model, cache_dir, build)
        except CompileFailed:
            if not build:
                raise
    return InductorStep(model)


def ready_file(model: Decoder, cache_dir: Path) -> Path:
    """Where a build records the packages a model, as opened (packed, quantized: its mode), runs with: keyed by
    torch, the CPU (and the layout its one-row products read, kernels.one_row_kernel), and the model's modules,
    settings, and tensors' names, shapes and dtypes (the cache and RoPE tables aside, which depend on the length
    asked for). Cheap: nothing is compiled or moved. attn's code is not
    in it: the packages' own keys have it, so after a change to the blocks' code the record names packages the
    step no longer finds, and the first run that tries drops the record (compile_decode_step)."""
    modules = [(n, type(m).__qualname__, _settings(m)) for n, m in model.named_modules()]
    tensors = [(n, list(t.shape), str(t.dtype), t.is_contiguous()) for n, t in model.weights()]
    text = json.dumps([torch.__version__, cpu_features(), _cpu_flags(), one_row_kernel(), [lanes_wanted(model.device, bits) for bits in (4, 8)], BUILD_OPTIONS, modules, tensors], default=str)
    return Path(cache_dir) / f"ready-{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"


def _is_ready(ready: Path) -> bool:
    try:
        names = json.loads(ready.read_text())["packages"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return bool(names) and all((ready.parent / n).is_file() for n in names)


def _mark_ready(ready: Path, packages: list[Path]) -> None:
    """Write the record (whole or not at all). A folder that cannot take it (read-only, full: the packages were
    loaded, not built) only means that later runs do not load them by default."""
    try:
        fd, tmp = tempfile.mkstemp(dir=ready.parent, suffix=".json")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"packages": [p.name for p in packages]}, f)
        os.replace(tmp, ready)
    except OSError:
        pass
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class BuiltStep:
    """A step built for the cache tensors the model holds now, built again when they are replaced."""

    def __init__(self, model: Decoder) -> None:
        self.model = model
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=model.device)
        self._build()

    def _cache_id(self) -> int:
        return self.model.layers[0].attn.cache.k.data_ptr()

    def _build(self) -> None:
        # Building runs the step at position 0 or 2, which writes its keys and values: a rebuild
        # comes after the prompt is in the cache, so what was there is put back.
        caches = [block.attn.cache for block in self.model.layers]
        saved = [(c.k[:, :, :3].clone(), c.v[:, :, :3].clone()) for c in caches]
        try:
            with torch.inference_mode():
                try:
                    self.build()
                finally:
                    for c, (k, v) in zip(caches, saved):
                        c.k[:, :, :3] = k
                        c.v[:, :, :3] = v
        except Exception as e:  # inductor and CUDA graphs raise many types; any of them means "stay eager"
            self.model.decode_step = self.model.block_steps = self.model.tail_step = None
            raise CompileFailed(_first_line(e)) from e
        self.built_for = self._cache_id()

    def build(self) -> None:
        raise NotImplementedError

    def __call__(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        if start + 1 > self.model.cache_len:
            raise ValueError(f"positions up to {start + 1} exceed the cache of {self.model.cache_len}")
        if self._cache_id() != self.built_for:
            try:
                self._build()
            except CompileFailed:  # mid-generation: go on eager (the model's decode_step is cleared)
                self.built_for, self.run = self._cache_id(), self.model.step
        return self.run(ids, start)

    def run(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        raise NotImplementedError


RUN = 6  # blocks per compiled graph (CPU)


class InductorStep(BuiltStep):
    """CPU: the blocks through inductor, `RUN` consecutive blocks per graph, with a dynamic position;
    `Decoder.step` calls the runs in order and the embedding, final norm and head eagerly around them.

    The runs execute the same code, so inductor builds one graph and every run reuses it (parameters
    and caches are the graph's inputs; where a run's layers differ in a constant, e.g. Gemma's windows,
    dynamo's guards give it a graph of its own). Measured on the default model with --quantize int4
    (Zen4, 2 threads, quiet machine), build with an empty inductor cache / decode:
    1 block a graph 12.3 s / 12-13 ms a token, 6 blocks 19.9 s / 9.1-9.6 ms, 10 blocks 20.5 s / 9.6-10.6 ms;
    all 30 (the whole step, as before) 112 s, and 1 block took 1.4× its time a token (A/B in one process);
    with the cache warm ≈ 6 s each.
    Each graph call costs ≈ 100 µs of dynamo and wrappers, which fewer, larger graphs pay less often.
    """

    def build(self) -> None:
        # Dynamo's guards stay (but see _alike): a run whose layers differ (a type, a window) must not run another's graph.
        # inductor's C++ wrapper calls the kernels from C++ instead of generated Python (12 vs 16 ms a token).
        torch._dynamo.reset()
        layers = self.model.layers
        options = {"cpp_wrapper": True, **_lane_options(self.model)}
        if _alike(layers):
            # Every block holds tensors of the same shapes and dtypes (checked here), so checking them again
            # on every call only costs time (16 of a block's 42 µs of guards, measured).
            options["guard_filter_fn"] = _no_block_tensor_guards
        compiled = torch.compile(_run_blocks, dynamic=True, options=options)
        self.model.block_steps = [partial(_call_run, compiled, tuple(layers[i : i + RUN])) for i in range(0, len(layers), RUN)]
        with warnings.catch_warnings():  # inductor's notes on mixed bfloat16/float16 (int4 scales) are not the user's
            warnings.simplefilter("ignore")
            self.model.step(self.ids, 2)  # with dynamic=True the position is symbolic from the first call: one graph for all

    def run(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        return self.model.step(ids, start)


def _call_run(compiled: Callable, blocks: tuple[Block, ...], x: torch.Tensor, span: Span, rope: tuple | None) -> torch.Tensor:
    # The Span's fields go in as plain arguments: dynamo makes an int argument symbolic at once, and checks
    # plain arguments faster than a NamedTuple's fields (measured: 84 µs a call in its cache lookup with the Span).
    return compiled(blocks, x, span.start, span.row, span.keys, rope)


def _alike(blocks) -> bool:
    """Whether every block's parameters and buffers have block 0's names, shapes and dtypes."""

    def layout(block: Block) -> list:
        return [(n, t.shape, t.dtype) for n, t in [*block.named_parameters(), *block.named_buffers()]]

    first = layout(blocks[0])
    return all(layout(b) == first for b in blocks)


def _no_block_tensor_guards(entries: list) -> list[bool]:
    return [not (e.guard_type == "TENSOR_MATCH" and e.name.startswith("blocks")) for e in entries]


def _run_blocks(
    blocks: tuple[Block, ...], x: torch.Tensor, start: int | torch.Tensor, row: int, keys: int | None, rope: tuple | None
) -> torch.Tensor:
    span = Span(start, row, keys)
    for block in blocks:
        x = block.forward(x, span, rope, None)
    return x


class AotStep(BuiltStep):
    """CPU: every block through a package AOTInductor built ahead of time and kept in `cache_dir` (see the
    module docstring), called with that block's own tensors; the embedding, final norm and head run eagerly
    around them, as with InductorStep, but no dynamo runs (no tracing on later runs, no guards on each call).

    A package takes one row at an integer position (≥ 1): a batch's rows at their own positions (a position
    tensor) go through the blocks eagerly. Measured on the default model (Zen4, 2 threads): first use 10.9–13.0 s
    for float32 (export 1.1–1.3 s; the largest part is g++ on the package's C++ wrapper, 5–6.5 s, with its
    kernels, 2.3–3 s, beside it), later runs 5 ms to load; int4 decode 83–98 tok/s against 65 through torch.compile,
    float32 39–43 against 20 eager.
    """

    def __init__(self, model: Decoder, cache_dir: Path, build: bool = True) -> None:
        self.cache_dir = Path(cache_dir)
        self.build_missing = build  # False: only load (a package not there fails the step)
        self.packages: list[Path] = []  # the packages the last build uses, one per kind of block
        self.built: list[Path] = []  # those of them it compiled (not loaded from the folder)
        self.prefill_built = False  # whether it also compiled a package for many rows (model/prefill.py)
        self.prefill_missing: list[str] = []  # those packages the blocks could run but do not (the prompt runs eagerly)
        super().__init__(model)

    def build(self) -> None:
        # The package for many rows (model/prefill.py) builds in a child process beside the blocks' packages.
        pending = _start_prefill(self.model, self.cache_dir, self.build_missing)
        try:
            self._build_blocks()
        except BaseException:
            if pending is not None:
                pending.cancel()
            raise
        if pending is not None:
            self.prefill_built = pending.finish()
        self.prefill_missing = _prefill_missing(self.model)

    def _build_blocks(self) -> None:
        model = self.model
        self.packages, self.built = [], []
        rope = _flat_rope(model.rope_at(2, 1) if model.cfg.positions == "rope" else None)
        head = _foldable_head(model)
        tail = _Tail(model, head) if head is not None else None
        runners: dict[str, Callable] = {}
        calls = []
        for i, block in enumerate(model.layers):
            names, tensors = _block_tensors(block)
            if tail is not None:  # the last block's package multiplies by the head, the others by a stand-in of 2 rows
                names, tensors = names + tail.names, tensors + tail.tensors(last=i == len(model.layers) - 1)
            key = _package_key(block, names, tensors, rope, tail)
            if key not in runners:
                self.packages.append(self.cache_dir / f"{key}.pt2")
                runners[key] = self._load_or_build(self.packages[-1], block, names, tensors, rope, tail)
            calls.append((runners[key], tensors))
        self._attach_prompts()
        blocks = _AotBlocks(model, calls, torch.empty(model.cache_len), tail is not None)
        model.block_steps = [blocks]  # one Python call a token runs every package
        model.tail_step = blocks.tail if tail is not None else None
        model.step(self.ids, 2)

    def _attach_prompts(self) -> None:
        """The layers with lanes codes multiply many rows (a prompt, a batch) through a package made for any such layer
        of their bits (model/quant/lanes.Prompt): inductor dequantizes the weight, BLAS multiplies (measured on a 2-core
        Zen3 at 64 rows: about int4pack's time; exact float32, where int4pack rounds to bfloat16); on AMD CPUs the package
        dequantizes the weight only and oneDNN multiplies (lanes.prompt_through_onednn)."""
        lanes = [m for m in self.model.modules() if isinstance(m, Lanes)]  # (the head's too: its eager rows, where many)
        for bits in sorted({m.bits for m in lanes}):
            path, built = prompt_package(self.cache_dir, bits, self.build_missing)
            try:
                runner = _load_package(path)
            except Exception:  # cut short, or from another build of torch: built again
                if not self.build_missing or built:
                    raise
                path.unlink(missing_ok=True)
                path, built = prompt_package(self.cache_dir, bits)
                runner = _load_package(path)
            self.packages.append(path)
            self.built += [path] if built else []
            for m in lanes:
                if m.bits == bits:
                    m._prompt, m._prompt_weight = runner, prompt_through_onednn()

    def _load_or_build(
        self, path: Path, block: Block, names: list[str], tensors: list[torch.Tensor], rope: list[torch.Tensor], tail: _Tail | None
    ) -> Callable:
        if path.exists():
            try:
                return _load_package(path)
            except Exception:  # cut short, or from another build of torch: built again
                if not self.build_missing:
                    raise
        if not self.build_missing:
            raise NotBuilt(f"{path} is not built")
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Fresh copies as the example inputs: the block's own tensors are inference tensors, and two
            # inputs must not share storage (the rope rows are views of one table).
            x = torch.zeros(1, 1, self.model.cfg.dim, dtype=self.model.dtype)
            # The head itself, not the stand-in, is the example: inductor plans loops (which one the cores share) by it.
            heads = dict(zip(tail.head_names, tail.tensors(last=True)[-len(tail.head_names) :])) if tail is not None else {}
            # The marker's example length is the position inductor plans the attention's loops for: with 3 it ran the
            # softmax on one thread and split the q·K loop over the 3 KV heads only (2000 keys: 11.1 ms a token, 9.5–10.0
            # planned for 1024; int8, Zen5). So every build plans for the same position, whatever cache this run set up
            # (`attn pull` builds with one of 8), the caches' examples are zeros one position longer (their length is
            # symbolic; one as long as the marker would tie the two).
            def example(name: str, t: torch.Tensor) -> torch.Tensor:
                if name.endswith(_CACHES):
                    return torch.zeros(*t.shape[:2], EXAMPLE_KEYS + 1, t.shape[3], dtype=t.dtype)
                return heads.get(name, t).clone()

            examples = (x, torch.empty(EXAMPLE_KEYS), *[t.clone() for t in rope], *[example(n, t) for n, t in zip(names, tensors)])
            # inductor's test builds for the CPU's vector extensions (≈ 1.8 s of g++, once per machine) run beside the export.
            probe = threading.Thread(target=probe_vector_isa, daemon=True)
            probe.start()
            S, L = torch.export.Dim("S", min=2, max=1 << 20), torch.export.Dim("L", min=3, max=1 << 20)
            V = torch.export.Dim("V", min=2, max=1 << 24)
            sizes = {n: {2: L} for n in names if n.endswith(_CACHES)} | {_HEAD: {1: V}} | {n: {0: V} for n in _LANE_HEAD}
            dims = (None, {0: S}, (*[None] * len(rope), *[sizes.get(n) for n in names]))  # *rest is one tuple
            program = torch.export.export(_OneBlock(block, names, len(rope), tail), examples, dynamic_shapes=dims, strict=False)
            probe.join()
            _package_atomically(program, path, _lane_options(block, tail))
        self.built.append(path)
        return _load_package(path)

    def run(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        return self.model.step(ids, start)


class _OneBlock(nn.Module):
    """What a package computes: `block` at position S − 1 (S the marker's length) with the given tensors in
    place of its own, rope as flat (cos, sin) pairs; the cache inputs are written in place. With a tail, also
    the final norm and the head of the block's output: (output, logits)."""

    def __init__(self, block: Block, names: list[str], n_rope: int, tail: _Tail | None) -> None:
        super().__init__()
        object.__setattr__(self, "block", block)  # not a submodule: its tensors are inputs, not constants
        object.__setattr__(self, "tail", tail)
        self.names, self.n_rope = names, n_rope
        self.cache_at = names.index("attn.cache.k")

    def forward(self, x: torch.Tensor, marker: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        flat, tensors = rest[: self.n_rope], rest[self.n_rope :]
        rope = tuple(zip(flat[0::2], flat[1::2])) or None
        torch._check(marker.shape[0] <= tensors[self.cache_at].shape[2])
        span = Span(marker.shape[0] - 1)
        named = dict(zip(self.names, tensors))
        own = {n: t for n, t in named.items() if not n.startswith("tail.")}
        y = torch.func.functional_call(self.block, own, (x, span, rope, None))
        if self.tail is None:
            return y
        return y, self.tail(named, y)


_CACHES = ("cache.k", "cache.v")  # a block's KV cache among its tensors (their length a symbolic size)
EXAMPLE_KEYS = 1024  # the position a step's packages are built for (inductor plans their loops by the example's sizes)
_HEAD = "tail.head.weight"  # the head's weight among a package's inputs (its vocabulary is a symbolic size)
_LANE_HEAD = ("tail.head.words", "tail.head.a", "tail.head.b")  # or a quantized head's lanes copy (vocabulary / 8 the size)


class _Tail:
    """The final norm and the head (no bias) folded into each block's package: the head is the step's largest product
    (the default model's 49152×576, 113 MB in float32), and compiled it is the same reduction along each stored row as
    the blocks' products (eager: oneDNN's GEMV). A float head is its weight (W (in, out) over (out, in) storage); an
    8-bit one, its lanes copy (model/quant/lanes.py: its one-row product, 1.5 against 4.1 ms eagerly through int4pack
    on an AVX2 Zen3). Each block's package computes it, the last one with the head, the others with a stand-in of two
    rows (or two words of rows) of zeros (one package serves them all), so no second package is built."""

    def __init__(self, model: Decoder, head: torch.Tensor | Lanes) -> None:
        self.norm = model.norm
        named = [*model.norm.named_parameters(), *model.norm.named_buffers()]
        self.norm_tensors = [t for _, t in named]
        self.head = head
        if isinstance(head, Lanes):
            self.head_names, self.head_tensors = list(_LANE_HEAD), [head.words, head.a, head.b]
            self.stand_in = [torch.zeros(2, *t.shape[1:], dtype=t.dtype) for t in self.head_tensors]
            self.layer = head  # (its code and settings go into the package's key)
        else:
            self.head_names, self.head_tensors = [_HEAD], [head]
            # (in, 2) stored as the head is, (2, in) or (in, 2): one package serves both
            self.stand_in = [torch.zeros(head.shape[0], 2, dtype=head.dtype) if head.is_contiguous() else torch.zeros(2, head.shape[0], dtype=head.dtype).t()]
            with torch.device("meta"):
                self.layer = Linear(head.shape[0], 2, bias=False)  # its forward, with the head's weight as an input
        self.names = [f"tail.norm.{n}" for n, _ in named] + self.head_names

    def tensors(self, last: bool) -> list[torch.Tensor]:
        return [*self.norm_tensors, *(self.head_tensors if last else self.stand_in)]

    def __call__(self, named: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        norm = {n.removeprefix("tail.norm."): t for n, t in named.items() if n.startswith("tail.norm.")}
        x = torch.func.functional_call(self.norm, norm, (y,))
        if isinstance(self.head, Lanes):  # (1, 1, V') with V' the rows in whole words: _AotBlocks.tail cuts the padding
            return row_product(x.reshape(1, -1).float(), *[named[n] for n in _LANE_HEAD], self.head.bits).view(1, 1, -1)
        return torch.func.functional_call(self.layer, {"weight": named[_HEAD]}, (x,))


def _foldable_head(model: Decoder) -> torch.Tensor | Lanes | None:
    """What of the head can run inside the packages: a plain layer's float weight (as `unpack` leaves a packed one)
    stored (out, in) or (in, out) (model.quant.kernels.one_row_kernel), or a quantized layer's lanes copy; no bias."""
    head = model.lm_head
    if isinstance(head, BlockLinear):
        return head.lanes if head.lanes is not None and head.bias is None and model.dtype == torch.float32 else None
    if not isinstance(head, Linear) or head.bias is not None:  # (a quantized head's `weight` would dequantize it)
        return None
    W = head.weight
    return W if W.dtype == model.dtype and (W.t().is_contiguous() or W.is_contiguous()) else None


class _AotBlocks:
    """Every block of a step through its package, in one call from `Decoder.step` (≈ 30 µs of Python a block
    otherwise): the inputs every block shares (the position's marker, the rope rows) are put together once a
    token. A batch's rows at their own positions, or a chunk of tokens, go through the blocks eagerly."""

    def __init__(self, model: Decoder, calls: list[tuple[Callable, list[torch.Tensor]]], marker: torch.Tensor, folds_tail: bool) -> None:
        self.model, self.calls, self.marker, self.folds_tail = model, calls, marker, folds_tail
        self.logits: torch.Tensor | None = None  # what the last package computed with the head folded in

    def __call__(self, x: torch.Tensor, span: Span, rope: tuple | None) -> torch.Tensor:
        self.logits = None
        if isinstance(span.start, torch.Tensor) or span.row or x.shape[:2] != (1, 1) or span.start < 1:
            for block in self.model.layers:
                x = block.forward(x, span, rope, None)
            return x
        shared = [self.marker[: span.start + 1], *_flat_rope(rope)]
        x = x.contiguous()
        for run, tensors in self.calls:
            out = run([x, *shared, *tensors])
            x = out[0]
        if self.folds_tail:
            self.logits = out[1]
        return x

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """The step's logits: those the last package left, else (the blocks ran eagerly) the final norm and head."""
        logits, self.logits = self.logits, None
        if logits is not None:
            return logits[..., : self.model.cfg.vocab_size]  # (a lanes head's rows are padded to whole words)
        return self.model.lm_head.forward(self.model.norm.forward(x))


def _start_prefill(model: Decoder, cache_dir: Path, build: bool) -> prefill.Pending | None:
    """Attach the packages for many rows kept for this model's blocks, or start building them (model/prefill.py)."""
    from model import prefill  # (here: generation imports this module at start-up, and most runs never get here)

    if not prefill.available(model):
        return None

    def key(module: nn.Module) -> str:
        return _package_key(module, *_block_tensors(module), [], None, prefill.key_extra())

    return prefill.start(model, cache_dir, key, build)


def _prefill_missing(model: Decoder) -> list[str]:
    from model import prefill

    return prefill.missing(model)


def _load_package(path: Path) -> Callable:
    """The package's runner, loaded by torch's C++ loader: `aoti_load_package` would import inductor (≈ 2.7 s)
    and parse the package's call spec again on every call."""
    return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1).run


def _flat_rope(rope: tuple | None) -> list[torch.Tensor]:
    return [t for pair in rope for t in pair] if rope is not None else []


def _block_tensors(block: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    named = [*block.named_parameters(), *block.named_buffers()]
    return [n for n, _ in named], [t for _, t in named]


def _package_key(
    block: nn.Module, names: list[str], tensors: list[torch.Tensor], rope: list[torch.Tensor], tail: _Tail | None, extra: list | None = None
) -> str:
    """What a package's code depends on: torch, the CPU, attn's source for the block's parts (and the tail's, and this file's),
    each part's settings (a window, an eps, a kernel), and the shapes, strides and dtypes of its inputs (the cache's
    length and the head's vocabulary aside): a weight in (out, in) storage is multiplied by other code than one in (in, out)."""
    modules = [*block.named_modules(), *([("tail.norm", tail.norm), ("tail.head", tail.layer)] if tail is not None else [])]
    files = sorted({inspect.getsourcefile(type(m)) for _, m in modules} | {inspect.getsourcefile(Block), __file__})  # (_OneBlock, _Tail)
    code = hashlib.sha256(b"".join(Path(f).read_bytes() for f in files if f)).hexdigest()
    settings = [(n, type(m).__qualname__, _settings(m)) for n, m in modules]
    free = {n: 2 for n in names if n.endswith(_CACHES)} | {n: 1 for n in names if n == _HEAD}  # dims kept before a free size
    shapes = [(n, list(t.shape), t.stride(), str(t.dtype)) for n, t in zip(names, tensors) if n not in free and n not in _LANE_HEAD]
    shapes += [(n, list(t.shape[: free[n]]), str(t.dtype), t.is_contiguous()) for n, t in zip(names, tensors) if n in free]
    shapes += [(n, list(t.shape[1:]), str(t.dtype)) for n, t in zip(names, tensors) if n in _LANE_HEAD]  # (the rows are free)
    shapes += [("rope", list(t.shape), str(t.dtype)) for t in rope]
    options = {**BUILD_OPTIONS, **_lane_options(block, tail)}
    text = json.dumps([torch.__version__, cpu_features(), _cpu_flags(), options, code, settings, shapes, *(extra or [])], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def prompt_package(cache_dir: Path, bits: int, build: bool = True) -> tuple[Path, bool]:
    """The package that multiplies many rows by any layer's `bits`-bit lanes codes (model/quant/lanes.Prompt): kept in
    `cache_dir`, built there where it is missing (`build`; else NotBuilt). Any model and size uses it, so
    `attn pull` builds both ahead of time where the lanes are wanted (cli/speed.prepare_step). (path, whether built
    now). Measured on a 2-core Zen3: ≈ 4–6 s to build, once per machine and torch."""
    path = Path(cache_dir) / f"prompt{bits}-{_prompt_key(bits)}.pt2"
    if path.exists():
        return path, False
    if not build:
        raise NotBuilt(f"{path} is not built")
    P = per_word(bits)
    R, G, M = torch.export.Dim("R", min=1, max=1 << 24), torch.export.Dim("G", min=1, max=1 << 14), torch.export.Dim("M", min=1, max=1 << 20)
    examples = (torch.zeros(4, 64), torch.zeros(3, 64 // P, LANES), torch.zeros(3, 2, LANES), torch.zeros(3, 2, LANES))
    dims = ({0: M, 1: 32 * G}, {0: R, 1: (32 // P) * G}, {0: R, 1: G}, {0: R, 1: G})
    weight_only = prompt_through_onednn()
    if weight_only:  # the weight alone (PromptWeight)
        examples, dims = examples[1:], dims[1:]
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export((PromptWeight if weight_only else Prompt)(bits), examples, dynamic_shapes=dims, strict=False)
        _package_atomically(program, path, INDUCTOR)
    return path, True


def _package_atomically(program: torch.export.ExportedProgram, path: Path, options: dict) -> None:
    """AOTInductor's package of `program` at `path` (its folder's `cxx` holding the C++ packages share), built with
    BUILD_OPTIONS and `options`, whole or not at all: another run may be loading from the folder."""
    import torch._inductor.config  # (not loaded by the load paths)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".pt2")
    os.close(fd)
    try:
        with torch._inductor.config.patch({**BUILD_OPTIONS, **options}), compiles_beside_each_other(path.parent / "cxx"):
            torch._inductor.aoti_compile_and_package(program, package_path=tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _prompt_key(bits: int) -> str:
    """What a prompt's package depends on: torch, the CPU, the build's settings and lanes.py (any model, any size)."""
    code = Path(inspect.getsourcefile(Lanes)).read_bytes()
    text = json.dumps([torch.__version__, cpu_features(), _cpu_flags(), BUILD_OPTIONS, INDUCTOR, hashlib.sha256(code).hexdigest(), bits, prompt_through_onednn()])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _lane_options(*parts: nn.Module | _Tail | None) -> dict:
    """inductor's settings for a build whose products read lanes copies (model/quant/lanes.py), else none."""
    for part in parts:
        if isinstance(part, _Tail) and isinstance(part.head, Lanes):
            return INDUCTOR
        if isinstance(part, nn.Module) and any(isinstance(m, Lanes) for m in part.modules()):
            return INDUCTOR
    return {}


def _cpu_flags() -> str:
    """The CPU's instruction-set flags: packages are built with -march=native, so two CPUs PyTorch ranks alike
    (AVX512) may still not run each other's (a home folder shared between machines)."""
    return cpuinfo("flags") or platform.processor()


def _settings(m: nn.Module) -> dict:
    """A module's plain settings (a block's position in the model, `index`, and the size of the cache set up now,
    `cache_len` and `cache_rows`, change nothing it computes)."""
    kinds = (bool, int, float, str, tuple, torch.dtype, type(None))
    skip = ("training", "index", "cache_len", "cache_rows")
    return {k: repr(v) for k, v in sorted(vars(m).items()) if not k.startswith("_") and k not in skip and isinstance(v, kinds)}


class GraphStep(BuiltStep):
    """CUDA: the static-shape step, compiled by inductor, captured as a CUDA graph; one replay per token.

    The graph reads and writes the cache tensors that existed when it was captured, and its
    output buffer is overwritten by the next replay.
    """

    inductor = True
    why = ""  # what stopped inductor, where it failed

    def build(self) -> None:
        self.pos = torch.zeros(1, dtype=torch.long, device=self.model.device)
        fn = self.model.step
        if self.inductor:
            try:
                fn = torch.compile(self.model.step, dynamic=False, fullgraph=True)
                self._warm(fn)
            except Exception as e:  # inductor failed: capture the eager step (most of the gain is the graph)
                self.inductor, self.why, fn = False, _first_line(e), self.model.step
        self._warm(fn)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(self.ids, self.pos)

    def _warm(self, fn: Callable) -> None:
        """Run on a side stream before capture, as CUDA graphs require (and inductor compiles here)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(self.ids, self.pos)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()

    def run(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        self.ids.copy_(ids)
        self.pos.fill_(start)
        self.graph.replay()
        return self.out


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def decode_step(model: Decoder) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """The function generation calls for one token: the compiled step when there is one."""
    step = getattr(model, "decode_step", None)
    return step if step is not None else model.step
