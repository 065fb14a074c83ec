"""Many rows through a block's products at once (a prompt's prefill; a batch of 8 rows or more) for int4 and int8
models on CPUs with AMX tiles, through inductor's AMX GEMM template for 4-bit weights.

Eagerly, ATen's `_weight_int4pack_mm_for_cpu` runs the 64 rows of the default model's MLP in 4.4–6.4 ms (2-core
Xeon with AMX), its qkv product in 0.9–1.5 ms, its o product in 0.45–0.75 ms; inductor's max-autotune CPU template
for the same op (`CppWoqInt4GemmTemplate`, its AMX micro-kernel) in 0.9, 0.21–0.24 and 0.12–0.14 ms. The template
only takes a weight that is a constant of the graph, so each block's work around its attention is built ahead of time
into two AOTInductor packages, with layer 0's weights as their constants and the number of rows a symbolic size, kept
beside the step's packages in `$ATTN_HOME/aoti`: "pre", the block's norm, qkv product and RoPE (the model's own code:
Attention.project), and "post", the o product, its residual, the MLP's norm, the MLP and its residual (Block.finish).
Only the cache update and the attention itself (SDPA) run eagerly between them (Fused), so the norms, RoPE, adds and
copies that ran eagerly around each product, ≈ 10 µs each, are compiled with it, and the o product has its own shape.
Measured on the default model at 64 rows, int8, layer 0 in one process: 1123–1153 µs against 1379–1385 through the
earlier packages (the MLP alone, the qkv with the o through it) and the eager ops between them; a 64-token prompt in
one process 41.0–43.0 ms against 47.2–48.9; `attn bench --compare llama.cpp`, prefill int8 0.94× (was 0.82×), int4
1.45× (was 1.13×). Every layer runs the packages with its own constants swapped in (`load_constants(...,
user_managed=True)`: the loader reads our tensors, no copy).
Among the constants inductor folds at build time are the codes re-blocked for the micro-kernel: each layer's are
made once as the packages load (`blocked`) and kept beside the int4pack codes (+53 MB on the default model's int4
layers, which no longer keep their exact float16 scales: model/quant/int4.py). Which folded constant is which is
found at build time by shape and kept beside each package (`<key>.json`); a build is used only after a second
layer through both packages matched the same code run eagerly.

Each package is built in a child forked from this process as the step's own build starts (model/compile.py), with
inductor imported here first: the children export and compile beside the step's build, each mostly one thread of
Python (spawned instead, each child imported torch and inductor again, ≈ 3 s of CPU on cores the builds keep busy).
Measured on a 2-core Xeon with AMX, first builds in one process, four rounds alternating with one spawned child
(the attention's package then built here once the step was): int4 9.2–9.7 s against 9.9–10.0, int8 10.1–10.6
against 10.3–10.7; 2–2.5 s less CPU. (The children at a lower priority: int8 10.5–10.6 s.) Where either fails, the
blocks stay eager. Measured: README, Performance.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import tempfile
import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from model.cxx import write_atomically
from model.decoder import Decoder, GatedMLP
from model.quant.int4 import Int4Linear, Packed4
from model.quant.q8 import Q8Linear

MIN_ROWS = 8  # fewer rows run eagerly: at 1–4 rows the package is slower (350 against 290 µs), at 8 faster (305 against 813)
TEMPLATE = {"max_autotune": True, "max_autotune_gemm_backends": "CPP", "freezing": True}  # the template the only choice: nothing benchmarked
TOLERANCE = 0.02  # a build's check: |package − eager| ≤ this × max |eager| (both read bfloat16 activations; measured ≤ 0.005)
PACKAGES = ("pre", "post")  # before the attention (norm, qkv, RoPE), after it (o, residual, norm, MLP, residual)
PRODUCTS = {"pre": ("attn.qkv",), "post": ("attn.o", "mlp.gate_up", "mlp.down")}  # the layers each package multiplies by


def packages(model: Decoder) -> list[str]:
    """The packages the blocks can run (both or none): on a CPU with AMX tiles, where every block's MLP is gated, its
    products int4pack layers, and its positions rotated (RoPE)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    if not (amx and model.device.type == "cpu" and model.shard is None and os.environ.get("ATTN_PREFILL", "").strip().lower() != "eager"):
        return []
    ok = model.cfg.positions == "rope" and all(
        isinstance(b.mlp, GatedMLP) and all(_int4pack(b.get_submodule(n)) for names in PRODUCTS.values() for n in names) for b in model.layers
    )
    return list(PACKAGES) if ok else []


def available(model: Decoder) -> bool:
    return bool(packages(model))


def missing(model: Decoder) -> list[str]:
    """The packages the blocks could run that they do not run now (not built, or built by another version of attn)."""
    return packages(model) if model.layers[0]._fused is None else []


def _int4pack(layer: nn.Module) -> bool:
    return isinstance(layer, (Int4Linear, Q8Linear)) and layer.kernel == "int4pack"


def blocked(q: Packed4) -> torch.Tensor:
    """The codes (N, K) laid out for the AMX micro-kernel, as inductor's `CppWoqInt4GemmTemplate.block_weight`
    folds them: per 32 rows, column by column, 16 bytes, byte i holding row i (low nibble) and row i + 16 (high)."""
    codes = q.codes()
    N, K = codes.shape
    c = codes.view(N // 32, 32, K).permute(0, 2, 1).reshape(N // 32, K, 2, 16)
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).contiguous().view(N, K // 2)


class _Pre(nn.Module):
    """What the "pre" package computes for M rows of one sequence: the block's norm, qkv product and RoPE (its own
    code: Attention.project); cos and sin (M, 1, R) → q (1, H, M, D), k and v (1, G, M, D)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.block.attn.project(self.block.attn_norm.forward(x[None]), (cos, sin))


class _Post(nn.Module):
    """What the "post" package computes for M rows: the o product of the heads y (M, H·D), then the rest of the block
    (Block.finish) on the residual x (M, C)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.block.finish(x, self.block.attn.o.forward(y))


def _examples(model: Decoder, package: str) -> tuple[torch.Tensor, ...]:
    """A package's example inputs (MIN_ROWS rows, their number a symbolic size)."""
    a, C = model.layers[0].attn, model.cfg.dim
    if package == "pre":
        R = model.rope_cos.shape[-1]
        return torch.zeros(MIN_ROWS, C), torch.zeros(MIN_ROWS, 1, R), torch.zeros(MIN_ROWS, 1, R)
    return torch.zeros(MIN_ROWS, C), torch.zeros(MIN_ROWS, a.n_heads * a.head_dim)


class Fused:
    """One block's rows (B·T of them, at least MIN_ROWS) through the two packages with that block's constants; the
    cache update and the attention itself eager between them (Attention.attend). Block.forward calls it (its `_fused`)."""

    min_rows = MIN_ROWS

    def __init__(self, runners: dict[str, "_Package"], constants: dict[str, dict[str, torch.Tensor]], held: list[torch.Tensor], rows: dict) -> None:
        self.runners, self.constants = runners, constants
        self.held = held  # of the constants, those the model does not hold itself (re-blocked codes)
        self.rows = rows  # shared by every block's Fused: the last rope pair seen, as the packages read it (`rope_rows`)

    def rope_rows(self, pair: tuple[torch.Tensor, torch.Tensor], B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's cos and sin as the "pre" package reads them, (B·T, 1, R) contiguous: made once per forward (every
        block is given the same pair; ≈ 20 µs a block of small ops otherwise) and kept for the blocks after it."""
        kept = self.rows.get("rope")
        if kept is None or kept[0] is not pair or kept[1] != (B, T):
            made = tuple(t.expand(B, T, 1, t.shape[-1]).reshape(B * T, 1, -1).contiguous() for t in pair)
            kept = self.rows["rope"] = (pair, (B, T), made)
        return kept[2]

    def run(self, package: str, *inputs: torch.Tensor) -> list[torch.Tensor]:
        return self.runners[package](self.constants[package], list(inputs))

    def __call__(self, block: nn.Module, x: torch.Tensor, span, rope: tuple) -> torch.Tensor:
        B, T, C = x.shape
        a = block.attn
        cos, sin = self.rope_rows(rope[a.rope_index], B, T)
        rows = x.reshape(B * T, C).contiguous()
        q, k, v = (t.view(t.shape[1], B, T, -1).transpose(0, 1) for t in self.run("pre", rows, cos, sin))
        y = a.attend(q, k, v, span, None)  # (B, T, H·D)
        return self.run("post", rows, y.reshape(B * T, -1).contiguous())[0].view(B, T, C)


class _Package:
    def __init__(self, path: Path) -> None:
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        self.current: int | None = None

    def __call__(self, constants: dict[str, torch.Tensor], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.current != id(constants):
            self.loader.load_constants(constants, False, False, True)  # (use_inactive, check_full_update, user_managed)
            self.current = id(constants)
        return self.loader.run(inputs)


def attach(model: Decoder, paths: dict[str, Path], which: dict[str, dict[str, str]] | None = None) -> int:
    """Load both packages (`paths`, by name) and give every block its Fused; how many blocks. `which`: per package,
    folded constant → the Packed4 it re-blocks (kept beside each package where not given). Raises where one cannot load."""
    torch.cpu._init_amx()  # the kernel grants the AMX tiles per process; without this the first product dies of SIGILL
    if which is None:
        which = {p: json.loads(path.with_suffix(".json").read_text())["blocked"] for p, path in paths.items()}
    runners = {p: _Package(path) for p, path in paths.items()}
    own = {p: set(r.loader.get_constant_fqns()) for p, r in runners.items()}
    rows: dict = {}
    for block in model.layers:
        named = {f"block.{n}": t for n, t in [*block.named_parameters(), *block.named_buffers()]}
        constants, held = {}, []
        for p in runners:
            codes = {name: blocked(block.get_submodule(q)) for name, q in which[p].items()}
            constants[p] = {n: t for n, t in named.items() if n in own[p]} | codes
            held += codes.values()
        block._fused = Fused(runners, constants, held, rows)
    return len(model.layers)


def resident_bytes(model: Decoder) -> int:
    """What the packages' Fused hold beside the model's own tensors: re-blocked codes."""
    held = {t.data_ptr(): t for b in model.layers if b._fused is not None for t in b._fused.held}
    return sum(t.numel() * t.element_size() for t in held.values())


def detach(model: Decoder) -> None:
    """Every block eager again."""
    for block in model.layers:
        block._fused = None


class _Build:
    """One package to build: which, where it goes, and where it lies meanwhile (empty until a build succeeds)."""

    def __init__(self, package: str, path: Path, tmp: Path) -> None:
        self.package, self.path, self.tmp = package, path, tmp

    def clean(self) -> None:
        self.tmp.unlink(missing_ok=True)


class Pending:
    """Packages being built (`start`), each by a child process of its own. Finished by `finish`."""

    def __init__(self, model: Decoder, children: list["_Child"], builds: list[_Build], paths: dict[str, Path]) -> None:
        self.model, self.children, self.builds, self.paths = model, children, builds, paths

    def cancel(self) -> None:
        """Stop the children (the step's own build failed: nothing of this is kept)."""
        for child in self.children:
            child.kill()
        for b in self.builds:
            b.clean()

    def finish(self) -> bool:
        """Wait for the children; identify each new package's folded constants, attach both packages, check them, keep
        the new ones. Whether the blocks now run them (a failure leaves every block eager, nothing new kept)."""
        try:
            try:
                for child in self.children:
                    child.wait()
            except BaseException:  # interrupted: the children go too
                for child in self.children:
                    child.kill()
                raise
            return self._finish()
        finally:
            for b in self.builds:
                b.clean()

    def _finish(self) -> bool:
        try:
            if any(not b.tmp.exists() or b.tmp.stat().st_size == 0 for b in self.builds):
                return False
            block = self.model.layers[0]
            new = {b.package: _identify(b.tmp, block, b.package) for b in self.builds}
            paths = self.paths | {b.package: b.tmp for b in self.builds}  # (the loader unpacks a package: it may move after)
            which = {p: new[p] if p in new else json.loads(path.with_suffix(".json").read_text())["blocked"] for p, path in paths.items()}
            attach(self.model, paths, which)
            if not _agrees(self.model):
                detach(self.model)
                return False
            for b in self.builds:
                write_atomically(b.path.with_suffix(".json"), json.dumps({"blocked": new[b.package]}))
                os.replace(b.tmp, b.path)
            return True
        except Exception:  # any failure here only means an eager prefill
            detach(self.model)
            return False


def start(model: Decoder, cache_dir: Path, key: Callable[[nn.Module], str], build: bool) -> Pending | None:
    """Attach the packages kept for this model (under `key` of its first block), or (with `build`) start building those
    missing: the Pending builds to finish; None when there is nothing to wait for."""
    names = packages(model)
    if not names or model.layers[0]._fused is not None:
        return None
    block = model.layers[0]
    paths = {p: cache_dir / f"{p}-{key(block)}.pt2" for p in names}
    kept = [p for p, path in paths.items() if path.exists() and path.with_suffix(".json").exists()]
    if len(kept) == len(names):
        try:
            attach(model, paths)
            return None
        except Exception:  # cut short, from another torch: built again
            detach(model)
            kept = []
    if not build:
        return None
    cache_dir.mkdir(parents=True, exist_ok=True)
    builds = [_Build(p, paths[p], Path(_temporary(cache_dir, ".pt2"))) for p in names if p not in kept]
    children: list[_Child] = []
    try:
        import torch._inductor.compile_fx  # noqa: F401 (this process builds the step with it next: the children have it)

        for b in builds:
            module, examples = WRAPPERS[b.package](block), _examples(model, b.package)
            children.append(_Child(partial(_build, module, examples, b.tmp, cache_dir / "cxx", torch.get_num_threads())))
    except BaseException as e:  # no fork here, or no inductor: the prompt stays eager
        Pending(model, children, builds, {}).cancel()
        if not isinstance(e, Exception):
            raise
        return None
    return Pending(model, children, builds, {p: paths[p] for p in kept})


class _Child:
    """A process forked from this one that runs `work` and ends (Linux and macOS; no `os.fork` elsewhere: OSError).
    Forked, it starts with what this process has imported, and reads the model's tensors where they lie.
    Nothing it writes reaches attn's streams, and it dies with attn, so that an interrupted run leaves no build behind.
    It runs one thread: libgomp's threads do not survive a fork, and one thread runs no parallel region."""

    def __init__(self, work: Callable[[], None]) -> None:
        if not hasattr(os, "fork"):
            raise OSError("no fork here")
        self.pid = os.fork()
        if self.pid:
            return
        code = 1
        try:
            quiet = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(quiet, fd)
            _die_with_parent()
            torch.set_num_threads(1)
            work()
            code = 0
        finally:
            os._exit(code)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass

    def wait(self) -> None:
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _build(module: nn.Module, examples: tuple[torch.Tensor, ...], out: Path, shared: Path, threads: int) -> None:
    """A child's work: export `module` (a wrapper of layer 0), its number of rows a symbolic size, and compile it into a
    package at `out` for `threads` threads (this process's, where the package runs: the child itself runs one, and
    inductor writes the count into the template's loops), the template the only choice (what warnings inductor gives,
    unseen). Where it fails, `out` stays empty."""
    import warnings

    import torch._inductor
    import torch._inductor.config as inductor

    from model.cxx import BUILD_OPTIONS, compiles_beside_each_other

    with torch.inference_mode(False), torch.no_grad():
        rows = torch.export.Dim("M", min=2, max=1 << 20)
        exported = torch.export.export(module, examples, dynamic_shapes=tuple({0: rows} for _ in examples), strict=False)
    with warnings.catch_warnings(), inductor.patch(BUILD_OPTIONS | TEMPLATE | {"cpp.threads": threads}), compiles_beside_each_other(shared):
        warnings.simplefilter("ignore")
        torch._inductor.aoti_compile_and_package(exported, package_path=str(out))


def _temporary(folder: Path, suffix: str) -> str:
    fd, path = tempfile.mkstemp(dir=folder, suffix=suffix)
    os.close(fd)
    return path


def _die_with_parent() -> None:
    """In the child before it runs (Linux): killed when attn ends, so that an interrupted run leaves no build behind."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def key_extra() -> list:
    """What the MLP package depends on beyond the modules' sources, settings and shapes: this file and the options."""
    return [hashlib.sha256(Path(__file__).read_bytes()).hexdigest(), TEMPLATE]


def _identify(package: Path, block: nn.Module, name: str) -> dict[str, str]:
    """Which of the package's folded constants re-blocks which Packed4 of `block` (by its name there): by shape and
    dtype, from the package's own library (the products of one package never share a shape; the values are not
    compared: the package's own, folded by inductor from layer 0's codes, came out wrong in some builds here, and each
    layer's are given at load anyway). Any other folded constant must be a scalar (a group size), which every layer
    shares; else ValueError."""
    with tempfile.TemporaryDirectory() as folder:
        with zipfile.ZipFile(package) as z:
            (so,) = [n for n in z.namelist() if n.endswith(".so")]
            library = z.extract(so, folder)
        constants = torch._C._aoti.AOTIModelContainerRunnerCpu(library, 1).extract_constants_map(False)
    own = {f"block.{n}" for n, _ in [*block.named_parameters(), *block.named_buffers()]}
    candidates = {f"{p}.q": block.get_submodule(f"{p}.q").packed for p in PRODUCTS[name]}
    which = {}
    for constant, value in constants.items():
        if constant in own:
            continue
        match = [q for q, p in candidates.items() if value.shape == p.shape and value.dtype == p.dtype]
        if len(match) == 1 and match[0] not in which.values():
            which[constant] = match[0]
        elif value.numel() > 1:
            raise ValueError(f"the package folded a constant attn does not know ({constant}, {list(value.shape)})")
    if sorted(which.values()) != sorted(candidates):  # the template did not take every product: no gain
        raise ValueError("not every product runs through the template")
    return which


def _agrees(model: Decoder) -> bool:
    """A second block (where there is one) through each package against the same eagerly, on random rows."""
    gen = torch.Generator().manual_seed(0)
    block = model.layers[min(1, len(model.layers) - 1)]
    fused = block._fused
    M = 2 * MIN_ROWS
    rope = model.rope_at(0, M)[block.attn.rope_index]
    inputs = {
        "pre": (torch.randn(M, model.cfg.dim, generator=gen), *(t.contiguous() for t in rope)),
        "post": (torch.randn(M, model.cfg.dim, generator=gen), torch.randn(M, block.attn.n_heads * block.attn.head_dim, generator=gen)),
    }
    with torch.inference_mode():
        for name, args in inputs.items():
            args = tuple(t.to(model.dtype) for t in args)
            got, want = fused.run(name, *args), WRAPPERS[name](block)(*args)
            for g, w in zip(got, want if isinstance(want, tuple) else (want,)):
                if g.shape != w.shape or not bool((g.float() - w.float()).abs().max() <= TOLERANCE * w.float().abs().max()):
                    return False
    return True


WRAPPERS = {"pre": _Pre, "post": _Post}
