"""Many rows through a block's products at once (a prompt's prefill; a batch of 8 rows or more) for int4 and int8
models on CPUs with AMX tiles, through inductor's AMX GEMM template for 4-bit weights.

Eagerly, ATen's `_weight_int4pack_mm_for_cpu` runs the 64 rows of the default model's MLP in 4.4–6.4 ms (2-core
Xeon with AMX), its qkv product in 0.9–1.5 ms, its o product in 0.45–0.75 ms; inductor's max-autotune CPU template
for the same op (`CppWoqInt4GemmTemplate`, its AMX micro-kernel) in 0.9, 0.21–0.24 and 0.12–0.14 ms. The template
only takes a weight that is a constant of the graph, so two modules are built ahead of time into AOTInductor
packages, with layer 0's weights as their constants and the number of rows a symbolic size, kept beside the step's
packages in `$ATTN_HOME/aoti`: the MLP (gate|up, the activation, down: "mlp") and the attention's qkv product
("attn"). Every layer runs them with its own constants swapped in (`load_constants(..., user_managed=True)`: the
loader reads our tensors, no copy). The o product runs through the qkv's package too (one package less to build):
as a weight of the qkv's shape, its own rows then rows of zero scale, whose products are zeros and are cut.
Among the constants inductor folds at build time are the codes re-blocked for the micro-kernel: each layer's are
made once as the packages load (`blocked`) and kept beside the int4pack codes (+53 MB on the default model's int4
layers, which no longer keep their exact float16 scales: model/quant/int4.py). Which folded constant is which is
found at build time by shape and kept beside each package (`<key>.json`); a build is used only after a second
layer's products through it matched the eager ones.

Each package is built in a child forked from this process as the step's own build starts (model/compile.py), with
inductor imported here first: the children export and compile beside the step's build, each mostly one thread of
Python (spawned instead, each child imported torch and inductor again, ≈ 3 s of CPU on cores the builds keep busy).
Measured on a 2-core Xeon with AMX, first builds in one process, four rounds alternating with one spawned child
(the attention's package then built here once the step was): int4 9.2–9.7 s against 9.9–10.0, int8 10.1–10.6
against 10.3–10.7; 2–2.5 s less CPU. (The children at a lower priority: int8 10.5–10.6 s.) Where one fails, its
products stay eager. Measured: README,
Performance.
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
import torch.nn.functional as F
from torch import nn

from model.cxx import write_atomically
from model.decoder import Decoder, GatedMLP
from model.quant.int4 import Int4Linear, Packed4
from model.quant.q8 import Q8Linear

MIN_ROWS = 8  # fewer rows run eagerly: at 1–4 rows the package is slower (350 against 290 µs), at 8 faster (305 against 813)
TEMPLATE = {"max_autotune": True, "max_autotune_gemm_backends": "CPP", "freezing": True}  # the template the only choice: nothing benchmarked
TOLERANCE = 0.02  # a build's check: |package − eager| ≤ this × max |eager| (both read bfloat16 activations; measured ≤ 0.005)
PACKAGES = ("mlp", "attn")  # the block's MLP; the attention's qkv product (and its o product, through the same package)


def packages(model: Decoder) -> list[str]:
    """Which packages the blocks can run: on a CPU with AMX tiles, "mlp" where every block's MLP is gated with int4pack
    layers, "attn" where every block's qkv is an int4pack layer."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    if not (amx and model.device.type == "cpu" and model.shard is None and os.environ.get("ATTN_PREFILL", "").strip().lower() != "eager"):
        return []
    mlp = all(isinstance(b.mlp, GatedMLP) and _int4pack(b.mlp.gate_up) and _int4pack(b.mlp.down) for b in model.layers)
    attn = all(_int4pack(b.attn.qkv) for b in model.layers)
    return [name for name, ok in zip(PACKAGES, (mlp, attn)) if ok]


def available(model: Decoder) -> bool:
    return bool(packages(model))


def missing(model: Decoder) -> list[str]:
    """The packages the blocks could run that none of them runs now (not built, or built by another version of attn)."""
    return [p for p in packages(model) if getattr(_built_from(model.layers[0], p), "_fused", None) is None]


def _int4pack(layer: nn.Module) -> bool:
    return isinstance(layer, (Int4Linear, Q8Linear)) and layer.kernel == "int4pack"


def _built_from(block: nn.Module, package: str) -> nn.Module:
    """The module a package is exported from (layer 0's): the MLP, or the attention's qkv product."""
    return block.mlp if package == "mlp" else block.attn.qkv


def _runs(block: nn.Module, package: str) -> list[nn.Module]:
    """The modules of a block that a package runs: the MLP; the qkv product, and the o product where it fits in."""
    if package == "mlp":
        return [block.mlp]
    return [block.attn.qkv, *([block.attn.o] if _o_fits(block) else [])]


def _o_fits(block: nn.Module) -> bool:
    """Whether the o product runs through the qkv's package: same kind of layer and width in, no more rows out
    (its own rows, then rows of zero scale up to the qkv's), no bias in either."""
    qkv, o = block.attn.qkv, block.attn.o
    return (
        _int4pack(o) and type(o) is type(qkv) and o.k_padded == qkv.k_padded and o.bias is None and qkv.bias is None
        and o.q.packed.shape[0] <= qkv.q.packed.shape[0]
    )


def blocked(q: Packed4) -> torch.Tensor:
    """The codes (N, K) laid out for the AMX micro-kernel, as inductor's `CppWoqInt4GemmTemplate.block_weight`
    folds them: per 32 rows, column by column, 16 bytes, byte i holding row i (low nibble) and row i + 16 (high)."""
    codes = q.codes()
    N, K = codes.shape
    c = codes.view(N // 32, 32, K).permute(0, 2, 1).reshape(N // 32, K, 2, 16)
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).contiguous().view(N, K // 2)


class _Only(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.forward(x)


class ManyRows:
    """One layer's module for x (…, D) of at least MIN_ROWS rows, through a package with that layer's constants (the
    first `cols` columns of what it gives); GatedMLP.forward and BlockLinear.forward call it (their `_fused`)."""

    min_rows = MIN_ROWS

    def __init__(self, runner: "_Package", constants: dict[str, torch.Tensor], held: list[torch.Tensor], cols: int | None = None) -> None:
        self.runner, self.constants, self.cols = runner, constants, cols
        self.held = held  # of the constants, those the model does not hold itself (re-blocked codes, padded scales)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.runner(self.constants, x)
        return y if self.cols is None else y[..., : self.cols]


class _Package:
    def __init__(self, path: Path) -> None:
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        self.current: int | None = None

    def __call__(self, constants: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self.current != id(constants):
            self.loader.load_constants(constants, False, False, True)  # (use_inactive, check_full_update, user_managed)
            self.current = id(constants)
        shape = x.shape
        return self.loader.run([x.reshape(-1, shape[-1]).contiguous()])[0].view(*shape[:-1], -1)


def attach(model: Decoder, package: str, path: Path, which: dict[str, str] | None = None) -> int:
    """Load the package at `path` and give the modules it runs in every block their ManyRows; how many blocks. `which`:
    folded constant → the Packed4 it re-blocks (kept beside the package where not given). Raises where it cannot load."""
    torch.cpu._init_amx()  # the kernel grants the AMX tiles per process; without this the first product dies of SIGILL
    if which is None:
        which = json.loads(path.with_suffix(".json").read_text())["blocked"]
    runner = _Package(path)
    own = set(runner.loader.get_constant_fqns())
    for block in model.layers:
        module = _built_from(block, package)
        tensors = {f"inner.{n}": t for n, t in [*module.named_parameters(), *module.named_buffers()] if f"inner.{n}" in own}
        if package == "mlp" or not _o_fits(block):
            codes = {name: blocked(module.get_submodule(q)) for name, q in which.items()}
            module._fused = ManyRows(runner, tensors | codes, list(codes.values()))
            continue
        # qkv, and o through the same package: o's codes re-blocked just before the qkv's, so that o's with the qkv's
        # first rows after them are a weight of the qkv's shape, those rows given zero scales (they give zeros)
        ((name, q),) = which.items()  # (the qkv's one product)
        o, rows = block.attn.o, block.attn.o.q.packed.shape[0]
        both = torch.cat([blocked(o.q), blocked(module.get_submodule(q))])
        module._fused = ManyRows(runner, tensors | {name: both[rows:]}, [both])
        sz = F.pad(o.q.sz, (0, 0, 0, module.q.sz.shape[1] - rows))
        extra = {"inner.q.sz": sz, "inner.q.packed": module.q.packed}  # (packed: the kernel reads the re-blocked codes)
        extra = {k: v for k, v in extra.items() if k in own}
        o._fused = ManyRows(runner, tensors | extra | {name: both[: module.q.packed.shape[0]]}, [sz], cols=o.n_out)
    return len(model.layers)


def resident_bytes(model: Decoder) -> int:
    """What the packages' ManyRows hold beside the model's own tensors: re-blocked codes, padded scales."""
    held = {t.data_ptr(): t for m in model.modules() if getattr(m, "_fused", None) is not None for t in m._fused.held}
    return sum(t.numel() * t.element_size() for t in held.values())


def detach(model: Decoder, package: str | None = None) -> None:
    """The modules a package runs (every package's: None) eager again."""
    for block in model.layers:
        for name in [package] if package else PACKAGES:
            for m in _runs(block, name):
                if hasattr(m, "_fused"):  # (a plain MLP has none)
                    m._fused = None


class _Build:
    """One package to build: which, where it goes, and where it lies meanwhile (empty until a build succeeds)."""

    def __init__(self, package: str, path: Path, tmp: Path) -> None:
        self.package, self.path, self.tmp = package, path, tmp

    def clean(self) -> None:
        self.tmp.unlink(missing_ok=True)


class Pending:
    """Packages being built (`start`), each by a child process of its own. Finished by `finish`."""

    def __init__(self, model: Decoder, children: list["_Child"], builds: list[_Build]) -> None:
        self.model, self.children, self.builds = model, children, builds

    def cancel(self) -> None:
        """Stop the children (the step's own build failed: nothing of this is kept)."""
        for child in self.children:
            child.kill()
        for b in self.builds:
            b.clean()

    def finish(self) -> bool:
        """Wait for the children; for each package built, identify its folded constants, check it, keep it and attach
        it. Whether any now runs (a failure leaves that package's modules eager, nothing of it kept)."""
        try:
            try:
                for child in self.children:
                    child.wait()
            except BaseException:  # interrupted: the children go too
                for child in self.children:
                    child.kill()
                raise
            return sum(self._finish(b) for b in self.builds) > 0
        finally:
            for b in self.builds:
                b.clean()

    def _finish(self, b: _Build) -> bool:
        try:
            if not b.tmp.exists() or b.tmp.stat().st_size == 0:
                return False
            which = _identify(b.tmp, _built_from(self.model.layers[0], b.package))
            attach(self.model, b.package, b.tmp, which)  # (the loader unpacks the package: it may move after)
            if not _agrees(self.model, b.package):
                detach(self.model, b.package)
                return False
            write_atomically(b.path.with_suffix(".json"), json.dumps({"blocked": which}))
            os.replace(b.tmp, b.path)
            return True
        except Exception:  # any failure here only means an eager prefill
            detach(self.model, b.package)
            return False


def start(model: Decoder, cache_dir: Path, key: Callable[[nn.Module], str], build: bool) -> Pending | None:
    """Attach the packages kept for this model (under `key` of the module each is built from), or (with `build`) start
    building those missing: the Pending builds to finish; None when there is nothing to wait for."""
    missing = []
    for package in packages(model):
        module = _built_from(model.layers[0], package)
        if getattr(module, "_fused", None) is not None:
            continue
        path = cache_dir / f"{package}-{key(module)}.pt2"
        if path.exists() and path.with_suffix(".json").exists():
            try:
                attach(model, package, path)
                continue
            except Exception:  # cut short, from another torch: built again
                detach(model, package)
        if build:
            missing.append((package, module, path))
    if not missing:
        return None
    cache_dir.mkdir(parents=True, exist_ok=True)
    builds = [_Build(package, path, Path(_temporary(cache_dir, ".pt2"))) for package, _, path in missing]
    children: list[_Child] = []
    try:
        import torch._inductor.compile_fx  # noqa: F401 (this process builds the step with it next: the children have it)

        for b, (_, module, _) in zip(builds, missing):
            children.append(_Child(partial(_build, module, model.dtype, b.tmp, cache_dir / "cxx", torch.get_num_threads())))
    except BaseException as e:  # no fork here, or no inductor: the prompt stays eager
        Pending(model, children, builds).cancel()
        if not isinstance(e, Exception):
            raise
        return None
    return Pending(model, children, builds)


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


def _build(module: nn.Module, dtype: torch.dtype, out: Path, shared: Path, threads: int) -> None:
    """A child's work: export `module` (layer 0's), its number of rows a symbolic size, and compile it into a package at
    `out` for `threads` threads (this process's, where the package runs: the child itself runs one, and inductor
    writes the count into the template's loops), the template the only choice (what warnings inductor gives, unseen).
    Where it fails, `out` stays empty."""
    import warnings

    import torch._inductor
    import torch._inductor.config as inductor

    from model.cxx import BUILD_OPTIONS, compiles_beside_each_other

    with torch.inference_mode(False), torch.no_grad():
        x = torch.zeros(MIN_ROWS, _width(module), dtype=dtype)
        rows = torch.export.Dim("M", min=2, max=1 << 20)
        exported = torch.export.export(_Only(module), (x,), dynamic_shapes=({0: rows},), strict=False)
    with warnings.catch_warnings(), inductor.patch(BUILD_OPTIONS | TEMPLATE | {"cpp.threads": threads}), compiles_beside_each_other(shared):
        warnings.simplefilter("ignore")
        torch._inductor.aoti_compile_and_package(exported, package_path=str(out))


def _temporary(folder: Path, suffix: str) -> str:
    fd, path = tempfile.mkstemp(dir=folder, suffix=suffix)
    os.close(fd)
    return path


def _width(module: nn.Module) -> int:
    """How wide a row the module takes."""
    return module.gate_up.n_in if isinstance(module, GatedMLP) else module.n_in


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


def _identify(package: Path, module: nn.Module) -> dict[str, str]:
    """Which of the package's folded constants re-blocks which Packed4 of `module`: by shape and dtype, from the package's
    own library (a gate|up and a down never share a shape; the values are not compared: the package's own, folded by
    inductor from layer 0's codes, came out wrong in some builds here, and each layer's are given at load anyway).
    Any other folded constant must be a scalar (a group size), which every layer shares; else ValueError."""
    with tempfile.TemporaryDirectory() as folder:
        with zipfile.ZipFile(package) as z:
            (so,) = [n for n in z.namelist() if n.endswith(".so")]
            library = z.extract(so, folder)
        constants = torch._C._aoti.AOTIModelContainerRunnerCpu(library, 1).extract_constants_map(False)
    own = {f"inner.{n}" for n, _ in [*module.named_parameters(), *module.named_buffers()]}
    candidates = {name: q.packed for name, q in module.named_modules() if isinstance(q, Packed4)}
    which = {}
    for name, value in constants.items():
        if name in own:
            continue
        match = [q for q, p in candidates.items() if value.shape == p.shape and value.dtype == p.dtype]
        if len(match) == 1 and match[0] not in which.values():
            which[name] = match[0]
        elif value.numel() > 1:
            raise ValueError(f"the package folded a constant attn does not know ({name}, {list(value.shape)})")
    if sorted(which.values()) != sorted(candidates):  # the template did not take every product: no gain
        raise ValueError("not every product runs through the template")
    return which


def _agrees(model: Decoder, package: str) -> bool:
    """A second layer's modules (where there is one) through the package against the same eagerly, on random rows."""
    gen = torch.Generator().manual_seed(0)
    for m in _runs(model.layers[min(1, len(model.layers) - 1)], package):
        x = torch.randn(2 * MIN_ROWS, _width(m), generator=gen).to(model.dtype)
        with torch.inference_mode():
            got = m._fused(x)
            fused, m._fused = m._fused, None
            try:
                want = m.forward(x)
            finally:
                m._fused = fused
        if got.shape != want.shape or not bool((got.float() - want.float()).abs().max() <= TOLERANCE * want.float().abs().max()):
            return False
    return True
