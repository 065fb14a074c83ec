"""Models for the commands: found or pulled (progress on stderr), then loaded on a device in a dtype."""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from cli import parallel
from cli.common import DEFAULT_MODEL, Dtype, note, size_text
from model.config import ModelConfig
from model.decoder import Decoder
from model.errors import AttnError, UsageError
from model.loading import DTYPES, load_model
from model.parallel import Shard, load_shard
from model.quant import covered_by, forced_generic, layer_kernels, pack, packs
from model.quant import quantize as quantize_model
from model.quant.blocks import load_blocks
from model.quant.kernels import CUDA_MODES
from model.tokenizer import Tokenizer
from weights.gguf import blocks_file
from weights.pull import resolve_model


def pick_device(spec: str) -> torch.device:
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        if not torch.cuda.is_available():
            raise AttnError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise AttnError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
        return dev
    raise UsageError(f"--device must be auto, cpu, cuda or cuda:N (got {spec!r})")


def pick_dtype(choice: Dtype, device: torch.device) -> torch.dtype:
    if choice is Dtype.auto:
        # bfloat16 on CUDA. float32 on CPU: the exact reference the microscope's numbers are checked against.
        # (Speed alone no longer decides it: with oneDNN's packed weights bfloat16 decoded faster on a 2-core
        # Zen4, 28.8 vs 21.0 tok/s, where MKL's bfloat16 GEMV had been the slower one; README, Performance.)
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[choice.value]


@dataclass
class Loaded:
    model: Decoder
    tokenizer: Tokenizer
    cfg: ModelConfig
    path: Path
    name: str
    device: torch.device
    dtype: torch.dtype
    load_ms: float
    params: int
    quantize: str = "none"  # --quantize: the numbers are then the quantized model's
    kernels: dict[str, int] = field(default_factory=dict)  # linear layers per "Class:kernel": the path that runs
    pulled: bool = False  # pulled by this run (which then builds its compiled step: cli/speed.py)
    packing_deferred: bool = False  # opened with defer_packing and not packed yet (cli/speed.py packs it if it runs eagerly)


def open_model(
    spec: str | None, device: str, dtype: Dtype, quiet: bool = False, quantize: str = "none", defer_packing: bool = False
) -> Loaded:
    """Resolve, load and check a model; with `quantize` (int8, int4) its linear layers are quantized as
    they load — the float weights a GGUF's own blocks replace are never read. With `defer_packing` the float
    weights stay in their plain (out, in) storage, the layout a compiled step reads: cli/speed.py packs them
    only where the run goes on eagerly (packing and unpacking again cost ≈ 0.5 s and 0.5 GB at peak)."""
    t0 = time.perf_counter()
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if quantize != "none" and dev.type != "cpu" and quantize not in CUDA_MODES:
        # model/quant/kernels.py: ATen's int8 products are 8× slower than bfloat16's on an H200.
        instead = "".join(f"--quantize {m} or " for m in CUDA_MODES)
        raise AttnError(f"--quantize {quantize} runs on the CPU only; on {dev.type} use {instead}--dtype bfloat16")
    path, pulled = ensure_model(spec, quiet=quiet)  # a name, a directory, a .gguf or a hub id; pulls the default once
    cfg = ModelConfig.from_dir(path)
    tokenizer = Tokenizer(path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise AttnError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the embedding only {cfg.vocab_size} rows")
    with torch.device("meta"):
        params = sum(p.numel() for p in Decoder(cfg).parameters())  # the float model's count, whatever is loaded
    # CPU float32/bfloat16 eager: oneDNN's packed weights (model/quant/packed.py), loaded in the layout packing reads.
    will_pack = quantize == "none" and packs(dev, dt)
    blocks = None
    if quantize == "int4":
        found = blocks_file(path)
        blocks = load_blocks(found) if found is not None else None
    try:
        if parallel.JOINED is not None:  # tensor parallel: this rank's slice of every layer
            parallel.check_split(cfg, parallel.JOINED.world, path.name)
            shard = Shard.plan(cfg, parallel.JOINED.rank, parallel.JOINED.world, vocab_parallel=parallel.vocab_parallel())
            model = load_shard(path, shard, dt, dev)
        else:
            # (out, in) storage too where the layers are quantized: the groups of 32 lie along each stored row
            # (model/quant/blocks.py), and nothing is transposed on the way (--quantize int8 loads in 1.2–1.3 s against 1.6–1.8; AMX Xeon)
            model = load_model(path, dt, dev, skip=covered_by(cfg, blocks) if blocks else None, out_in=will_pack or quantize != "none")
    except torch.cuda.OutOfMemoryError:
        raise AttnError(oom_message(path, dev, dt)) from None
    kernels = {}
    if quantize != "none":
        kernels = dict(quantize_model(model, quantize, blocks))
        if quantize == "int4":
            source = "the GGUF's own 4-bit codes" if blocks else "round-to-nearest from the float weights"
            note(f"int4: {sum(n for k, n in kernels.items() if k.startswith('Int4'))} layers from {source}; the head 8-bit", quiet)
        if forced_generic():
            note("ATTN_KERNELS=generic: quantized layers dequantize on every call (slow; for testing)", quiet)
    elif will_pack and not defer_packing:
        pack(model)
        kernels = dict(layer_kernels(model))
    # The name outputs carry: the registry name or hub id as given; for a directory, its own name.
    name = path.name if spec and Path(spec).expanduser().exists() else spec or DEFAULT_MODEL
    load_ms = (time.perf_counter() - t0) * 1e3
    # What is loaded by now (torch's ≈ 175k objects, the model's) lives as long as the process: out of the collector's
    # full passes, each ≈ 0.1 s over them, which came mid-generation (1–3% of a decode step's time in perf on a Zen5).
    gc.freeze()
    return Loaded(model, tokenizer, cfg, path, name, dev, dt, load_ms, params, quantize, kernels, pulled, will_pack and defer_packing)


def oom_message(path: Path, device: torch.device, dtype: torch.dtype) -> str:
    size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30
    free = ""
    if device.type == "cuda":
        free_b, total_b = torch.cuda.mem_get_info(device)
        free = f", {free_b / 2**30:.1f} of {total_b / 2**30:.1f} GiB free on {device}"
    return f"out of memory loading {path.name} ({size:.2f} GiB on disk{free}); try --dtype bfloat16 or --device cpu"


# --- finding and pulling, with progress on stderr ----------------------------------------


class _Amount(ProgressColumn):
    """'12.3 MiB/92.9 MiB' for byte counts, '17/272' for tensor counts."""

    def render(self, task: Task) -> Text:
        done, total = int(task.completed), task.total
        if total is None:
            return Text(size_text(done) if done else "")
        if total >= 1 << 20:
            return Text(f"{size_text(done)}/{size_text(int(total))}")
        return Text(f"{done}/{int(total)}")


class StderrProgress:
    """Renders weights/ progress callbacks: transient rich bars on a TTY, one plain line per stage otherwise."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.live = sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
        self.called = False
        self._bars: Progress | None = None
        self._tasks: dict[str, int] = {}
        self._stage: str | None = None

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        self.called = True
        if self.quiet:
            return
        if not self.live:
            if stage != self._stage:
                sys.stderr.write(f"attn: {stage} …\n")
                sys.stderr.flush()
            self._stage = stage
            return
        if self._bars is None:
            self._bars = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), _Amount(), TimeRemainingColumn(),
                console=Console(stderr=True), transient=True,
            )
            self._bars.start()
        if stage not in self._tasks:
            if self._stage in self._tasks:  # a finished stage stops its spinner
                prev = self._tasks[self._stage]
                self._bars.update(prev, total=self._bars.tasks[prev].total or 1, completed=self._bars.tasks[prev].total or 1)
            self._tasks[stage] = self._bars.add_task(stage, total=total)
        self._bars.update(self._tasks[stage], completed=done, total=total)
        self._stage = stage

    def close(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None

    def __enter__(self) -> "StderrProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def ensure_model(spec: str | None, *, quiet: bool = False) -> tuple[Path, bool]:
    """The model directory for --model, pulling the default (with progress on stderr) on first use; and
    whether it was pulled now."""
    start = time.monotonic()
    with StderrProgress(quiet=quiet) as progress:
        path = resolve_model(spec, progress=progress)
    if progress.called and not quiet:
        note(f"pulled {spec or DEFAULT_MODEL} to {path} ({size_text(dir_size(path))}, {time.monotonic() - start:.1f} s)")
    return path, progress.called
