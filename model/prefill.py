"""Many rows through the blocks' products at once (a prompt's prefill; a batch of 8 rows or more) for int4 and int8
models on CPUs with AMX tiles, through inductor's AMX GEMM template for 4-bit weights.

Eagerly, ATen's `_weight_int4pack_mm_for_cpu` runs the 64 rows of the default model's MLP in 4.4–6.4 ms (2-core
Xeon with AMX), its qkv product in 0.9–1.5 ms, its o product in 0.45–0.75 ms; inductor's max-autotune CPU template
for the same op (`CppWoqInt4GemmTemplate`, its AMX micro-kernel) in 0.9, 0.21–0.24 and 0.12–0.14 ms. The template
only takes a weight that is a constant of the graph, so the blocks' work between their attentions is built ahead of
time into one AOTInductor package (`_Mid`, the model's own code), kept beside the step's packages in `$ATTN_HOME/aoti`:
block a's work after its attention — the o product, its residual, the MLP's norm, the MLP and its residual
(Block.finish) — then block b's before its own — its norm, qkv product and RoPE (Attention.project). Its constants are
the first two blocks' quantized weights, its inputs the rows (their number a symbolic size) and the two blocks' other
tensors (`_given`: norms' weights, biases; as constants, Gemma's 1 + w was folded into one of inductor's own). A
prompt runs it n + 1 times (Chain), a = block i − 1 and b = block i, their quantized weights swapped in
(`load_constants(..., user_managed=True)`: the loader reads our tensors, no copy) and their other tensors given; only
the cache update and the attention itself (SDPA) run eagerly between calls. The first call's a and the last's b are no
block (zeros: the residual passes through, the last q, k, v go unused). So the norms, RoPE, adds and copies that ran
eagerly around each product, ≈ 10 µs each, are compiled with it.

Measured on a 2-core Xeon with AMX, the default model: a 64-token prompt in one process (best of 5 × 20, four rounds
alternating) int8 42.9–44.4 ms, int4 29.7–30.6, the same as through the two packages per block this replaced ("pre"
and "post", each block's own: 42.9–44.5 and 29.2–30.0; the zeros' ≈ 0.8 ms offset by 29 calls fewer), and one package
to build instead of two: first builds (after `attn pull`, two rounds alternating) int4 8.7–9.9 s against 9.6–9.8, int8
9.2–9.9 against 10.3–10.9.
Among the constants inductor folds at build time are the codes re-blocked for the micro-kernel: each block's are
made once as the package loads (`blocked`) and kept beside the int4pack codes (+53 MB on the default model's int4
layers, which no longer keep their exact float16 scales: model/quant/int4.py). Which folded constant is which is
found at build time by shape and kept beside the package (`<key>.json`); a build is used only after a call with other
blocks than the first two matched the same code run eagerly.

The package is built in a child forked from this process as the step's own build starts (model/compile.py), with
inductor imported here first: the child exports and compiles beside the step's build, mostly one thread of Python
(spawned instead, a child imported torch and inductor again, ≈ 3 s of CPU on cores the builds keep busy). Where it
fails, the blocks stay eager. Measured: README, Performance.
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
PACKAGE = "mid"  # the one package: a block's work after its attention, then the next block's before its attention
PRODUCTS = {"a": ("attn.o", "mlp.gate_up", "mlp.down"), "b": ("attn.qkv",)}  # the layers it multiplies by, of either block
PARTS = {"a": ("attn.o", "attn_post_norm", "mlp_norm", "mlp", "mlp_post_norm"), "b": ("attn_norm", "attn.qkv", "attn.q_norm", "attn.k_norm")}  # all it reads


def packages(model: Decoder) -> list[str]:
    """The packages the blocks can run: on a CPU with AMX tiles, where every block's MLP is gated, its products int4pack
    layers, and its positions rotated (RoPE)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    if not (amx and model.device.type == "cpu" and model.shard is None and os.environ.get("ATTN_PREFILL", "").strip().lower() != "eager"):
        return []
    ok = model.cfg.positions == "rope" and all(
        isinstance(b.mlp, GatedMLP) and all(_int4pack(b.get_submodule(n)) for names in PRODUCTS.values() for n in names) for b in model.layers
    )
    return [PACKAGE] if ok else []


def available(model: Decoder) -> bool:
    return bool(packages(model))


def missing(model: Decoder) -> list[str]:
    """The packages the blocks could run that they do not run now (not built, or built by another version of attn)."""
    return packages(model) if model.prompt_run is None else []


def _int4pack(layer: nn.Module) -> bool:
    return isinstance(layer, (Int4Linear, Q8Linear)) and layer.kernel == "int4pack"


def blocked(q: Packed4) -> torch.Tensor:
    """The codes (N, K) laid out for the AMX micro-kernel, as inductor's `CppWoqInt4GemmTemplate.block_weight`
    folds them: per 32 rows, column by column, 16 bytes, byte i holding row i (low nibble) and row i + 16 (high)."""
    codes = q.codes()
    N, K = codes.shape
    c = codes.view(N // 32, 32, K).permute(0, 2, 1).reshape(N // 32, K, 2, 16)
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).contiguous().view(N, K // 2)


class _Pair(nn.Module):
    """What the package computes for M rows of one sequence: block `a`'s work after its attention — the o product of
    its heads y (M, H·D), then the rest of the block (Block.finish) on the residual x (M, C) — and block `b`'s before
    its attention on the result — its norm, qkv product and RoPE (Attention.project); cos and sin (M, 1, R) → the
    residual (M, C), q (1, H, M, D), k and v (1, G, M, D). The model's own code, two blocks of it."""

    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.a.finish(x, self.a.attn.o.forward(y))
        return (x, *self.b.attn.project(self.b.attn_norm.forward(x[None]), (cos, sin)))


def _given(pair: _Pair) -> list[str]:
    """The pair's tensors the package takes as inputs at each call: those of the parts it runs (PARTS), but of the
    products only their biases: their codes and scales are its constants (the template multiplies only by a constant).
    As constants, inductor folds what is computed from them alone into constants of its own that attn could not give
    each block (Gemma's norm weights as 1 + w)."""
    products = tuple(f"{side}.{p}." for side, names in PRODUCTS.items() for p in names)
    used = tuple(f"{side}.{part}." for side, parts in PARTS.items() for part in parts)
    names = [n for n in _tensors(pair) if n.startswith(used)]
    return [n for n in names if not n.startswith(products) or n in {f"{p}bias" for p in products}]  # (of a product: its bias)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's parameters and buffers by name, each name even where two share a tensor (a pair of one block twice)."""
    return dict([*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)])


class _Mid(nn.Module):
    """The package's module: the pair with `given` of its tensors as inputs after x, y, cos, sin."""

    def __init__(self, pair: _Pair) -> None:
        super().__init__()
        self.pair, self.given = pair, _given(pair)

    def forward(self, x: torch.Tensor, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.func.functional_call(self.pair, dict(zip(self.given, tensors)), (x, y, cos, sin))


def _examples(model: Decoder, module: _Mid) -> tuple[torch.Tensor, ...]:
    """The package's example inputs: MIN_ROWS rows of x, y, cos and sin (their number a symbolic size), then copies of
    the tensors it is given."""
    a, C, R = model.layers[0].attn, model.cfg.dim, model.rope_cos.shape[-1]
    rows = torch.zeros(MIN_ROWS, C), torch.zeros(MIN_ROWS, a.n_heads * a.head_dim), torch.zeros(MIN_ROWS, 1, R), torch.zeros(MIN_ROWS, 1, R)
    named = _tensors(module.pair)
    return (*rows, *(named[n].detach().clone() for n in module.given))


class Chain:
    """A prompt's rows (B·T of them, at least MIN_ROWS) through every block: n + 1 calls of the package, the i-th with
    block i − 1 as `a` and block i as `b` (their constants swapped in), the cache update and the attention itself eager
    between them (Attention.attend). The first call's `a` and the last's `b` are no block: zeros for every weight, so
    that the residual passes through unchanged (x + 0) and the last q, k, v are not used (≈ 0.8 ms of a 64-token
    prompt spent on zeros; one package to build instead of two, ≈ 0.5–1.2 s less of a first build). Decoder._run calls it
    (its `prompt_run`) where no probe and no hook on a block asks for the blocks one by one."""

    min_rows = MIN_ROWS

    def __init__(self, runner: "_Package", calls: list[tuple[dict[str, torch.Tensor], list[torch.Tensor]]], held: list[torch.Tensor]) -> None:
        self.runner, self.calls = runner, calls  # per call: its constants, and the tensors it is given (_Mid.given)
        self.held = held  # of those, the ones the model does not hold itself (re-blocked codes, the zeros)

    def __call__(self, model: Decoder, x: torch.Tensor, span, rope: tuple) -> torch.Tensor:
        B, T, C = x.shape
        layers = model.layers
        a = layers[0].attn
        rows = x.reshape(B * T, C).contiguous()
        y = x.new_zeros(B * T, a.n_heads * a.head_dim)
        tables = {}  # cos and sin rows per RoPE table, as the package reads them: (B·T, 1, R)
        for i, (constants, given) in enumerate(self.calls):
            block = layers[min(i, len(layers) - 1)]
            index = block.attn.rope_index
            if index not in tables:
                tables[index] = [t.expand(B, T, 1, t.shape[-1]).reshape(B * T, 1, -1).contiguous() for t in rope[index]]
            rows, q, k, v = self.runner(constants, [rows, y, *tables[index], *given])
            if i == len(layers):
                break
            q, k, v = (t.view(t.shape[1], B, T, -1).transpose(0, 1) for t in (q, k, v))
            y = block.attn.attend(q, k, v, span, None).reshape(B * T, -1).contiguous()  # (B·T, H·D)
        return rows.view(B, T, C)

    def run(self, i: int, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """The package with the i-th call's tensors (block i − 1 as `a`, block i as `b`) on x, y, cos, sin."""
        constants, given = self.calls[i]
        return self.runner(constants, [*inputs, *given])


class _Package:
    def __init__(self, path: Path) -> None:
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        self.current: int | None = None

    def __call__(self, constants: dict[str, torch.Tensor], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.current != id(constants):
            self.loader.load_constants(constants, False, False, True)  # (use_inactive, check_full_update, user_managed)
            self.current = id(constants)
        return self.loader.run(inputs)


def attach(model: Decoder, path: Path, which: dict[str, str] | None = None) -> int:
    """Load the package and give the model its Chain; how many blocks run it. `which`: folded constant → the Packed4 it
    re-blocks, by its name in _Mid (kept beside the package where not given). Raises where it cannot load."""
    torch.cpu._init_amx()  # the kernel grants the AMX tiles per process; without this the first product dies of SIGILL
    if which is None:
        which = json.loads(path.with_suffix(".json").read_text())["blocked"]
    runner = _Package(path)
    own = set(runner.loader.get_constant_fqns())
    layers = list(model.layers)
    given = _given(_Pair(layers[0], layers[0]))
    made: dict[tuple, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}  # per block and side, made once

    def side(block: nn.Module | None, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """A block's (or no block's: zeros) tensors as one side of a call: (constants, given) by their names in _Mid."""
        source = layers[0] if block is None else block
        key = (id(source), prefix, block is None)
        if key not in made:
            named = {f"{prefix}.{n}": t for n, t in _tensors(source).items()}
            at = f"pair.{prefix}."
            constants = {n: named[n.removeprefix("pair.")] for n in own if n.startswith(at)}
            constants |= {n: blocked(source.get_submodule(q.removeprefix(at))) for n, q in which.items() if q.startswith(at)}
            inputs = {n: named[n] for n in given if n.startswith(f"{prefix}.")}
            made[key] = (_zeros(constants), _zeros(inputs)) if block is None else (constants, inputs)
        return made[key]

    ends = [None, *layers, None]
    calls = []
    for i in range(len(layers) + 1):
        (ca, ia), (cb, ib) = side(ends[i], "a"), side(ends[i + 1], "b")
        calls.append((ca | cb, [(ia | ib)[n] for n in given]))
    mine = {id(t) for b in layers for t in [*b.parameters(), *b.buffers()]}
    held = list({id(t): t for c, g in calls for t in [*c.values(), *g] if id(t) not in mine}.values())
    model.prompt_run = Chain(runner, calls, held)
    return len(layers)


def _zeros(like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zeros shaped as each of `like`, all views of one buffer as large as the largest (the package only reads them):
    the no-block ends of the Chain hold 1.2 MB on the default model's int4 layers, not 3.8."""
    pool = torch.zeros(max((t.numel() * t.element_size() for t in like.values()), default=0), dtype=torch.uint8)
    return {n: pool[: t.numel() * t.element_size()].view(t.dtype).view(t.shape) for n, t in like.items()}


def resident_bytes(model: Decoder) -> int:
    """What the package's Chain holds beside the model's own tensors: re-blocked codes, and one block's zeros."""
    held = model.prompt_run.held if model.prompt_run is not None else []
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}  # (the zeros share one)
    return sum(storages.values())


def detach(model: Decoder) -> None:
    """Every block eager again."""
    model.prompt_run = None


class Pending:
    """The package being built (`start`) by a child process. Finished by `finish`."""

    def __init__(self, model: Decoder, child: "_Child", path: Path, tmp: Path) -> None:
        self.model, self.child, self.path, self.tmp = model, child, path, tmp  # (tmp: empty until the build succeeds)

    def cancel(self) -> None:
        """Stop the child (the step's own build failed: nothing of this is kept)."""
        self.child.kill()
        self.tmp.unlink(missing_ok=True)

    def finish(self) -> bool:
        """Wait for the child; identify the package's folded constants, attach it, check it, keep it. Whether the
        blocks now run it (a failure leaves every block eager, nothing new kept)."""
        try:
            try:
                self.child.wait()
            except BaseException:  # interrupted: the child goes too
                self.child.kill()
                raise
            return self._finish()
        finally:
            self.tmp.unlink(missing_ok=True)

    def _finish(self) -> bool:
        try:
            if not self.tmp.exists() or self.tmp.stat().st_size == 0:
                return False
            which = _identify(self.tmp, self.model)
            attach(self.model, self.tmp, which)  # (the loader unpacks a package: it may move after)
            if not _agrees(self.model):
                detach(self.model)
                return False
            write_atomically(self.path.with_suffix(".json"), json.dumps({"blocked": which}))
            os.replace(self.tmp, self.path)
            return True
        except Exception:  # any failure here only means an eager prefill
            detach(self.model)
            return False


def _pair(model: Decoder) -> _Mid:
    """The package's module, built from (and keyed by) the first two blocks (the first twice in a model of one)."""
    return _Mid(_Pair(model.layers[0], model.layers[min(1, len(model.layers) - 1)]))


def start(model: Decoder, cache_dir: Path, key: Callable[[nn.Module], str], build: bool) -> Pending | None:
    """Attach the package kept for this model (under `key` of its first two blocks), or (with `build`) start building it:
    the Pending build to finish; None when there is nothing to wait for."""
    if not packages(model) or model.prompt_run is not None:
        return None
    module = _pair(model)
    path = cache_dir / f"{PACKAGE}-{key(module)}.pt2"
    if path.exists() and path.with_suffix(".json").exists():
        try:
            attach(model, path)
            return None
        except Exception:  # cut short, from another torch: built again
            detach(model)
    if not build:
        return None
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(_temporary(cache_dir, ".pt2"))
    try:
        import torch._inductor.compile_fx  # noqa: F401 (this process builds the step with it next: the child has it)

        child = _Child(partial(_build, module, _examples(model, module), tmp, cache_dir / "cxx", torch.get_num_threads()))
    except BaseException as e:  # no fork here, or no inductor: the prompt stays eager
        tmp.unlink(missing_ok=True)
        if not isinstance(e, Exception):
            raise
        return None
    return Pending(model, child, path, tmp)


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
        dynamic = ({0: rows},) * 4 + ((None,) * (len(examples) - 4),)  # x, y, cos, sin: the rows; the tensors given: fixed
        exported = torch.export.export(module, examples, dynamic_shapes=dynamic, strict=False)
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


def _identify(package: Path, model: Decoder) -> dict[str, str]:
    """Which of the package's folded constants re-blocks which Packed4 (by its name in _Mid): by shape and dtype, from
    the package's own library (the products of one package never share a shape; the values are not compared: the
    package's own, folded by inductor from the first blocks' codes, came out wrong in some builds here, and each call's
    are given at load anyway). Any other folded constant must be a scalar (a group size), which every block shares; else
    ValueError."""
    with tempfile.TemporaryDirectory() as folder:
        with zipfile.ZipFile(package) as z:
            (so,) = [n for n in z.namelist() if n.endswith(".so")]
            library = z.extract(so, folder)
        constants = torch._C._aoti.AOTIModelContainerRunnerCpu(library, 1).extract_constants_map(False)
    module = _pair(model)
    own = set(_tensors(module))
    candidates = {f"pair.{side}.{p}.q": module.get_submodule(f"pair.{side}.{p}.q").packed for side, names in PRODUCTS.items() for p in names}
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
    """A call other than the one the package was built from (blocks 1 and 2, where there are three) through the package
    against the same code run eagerly, on random rows (where its `b` is the zeros, only the residual)."""
    gen = torch.Generator().manual_seed(0)
    layers = model.layers
    i = min(2, len(layers))
    a, b = layers[i - 1], layers[i] if i < len(layers) else None
    M = 2 * MIN_ROWS
    rope = model.rope_at(0, M)[(b or a).attn.rope_index]
    args = (torch.randn(M, model.cfg.dim, generator=gen), torch.randn(M, a.attn.n_heads * a.attn.head_dim, generator=gen), *rope)
    with torch.inference_mode():
        args = tuple(t.to(model.dtype).contiguous() for t in args)
        got = model.prompt_run.run(i, *args)
        want = _Pair(a, b)(*args) if b is not None else [a.finish(args[0], a.attn.o.forward(args[1]))]
        for g, w in zip(got, want):
            if g.shape != w.shape or not bool((g.float() - w.float()).abs().max() <= TOLERANCE * w.float().abs().max()):
                return False
    return True
