"""Many rows through a block's MLP at once (a prompt's prefill; a batch of 8 rows or more) for int4 and int8 models
on CPUs with AMX tiles, through inductor's AMX GEMM template for 4-bit weights.

Eagerly, ATen's `_weight_int4pack_mm_for_cpu` runs the 64 rows of the default model's MLP in 4.4–6.4 ms (2-core
Xeon with AMX); inductor's max-autotune CPU template for the same op (`CppWoqInt4GemmTemplate`, its AMX
micro-kernel) in 0.9 ms. The template only takes a weight that is a constant of the graph, so the MLP (gate|up,
the activation, down) is built ahead of time into one AOTInductor package with layer 0's weights as its constants
and the number of rows a symbolic size, kept beside the step's packages in `$ATTN_HOME/aoti`, and every layer runs
it with its own constants swapped in (`load_constants(..., user_managed=True)`: the loader reads our tensors, no
copy). Among the constants inductor folds at build time are the codes re-blocked for the micro-kernel: each
layer's are made once as the package loads (`blocked`) and kept beside the int4pack codes (+40 MB on the default
model's int4 MLPs). Which folded constant is which is found at build time by shape and kept beside the package
(`<key>.json`); a build is used only after a second layer's product through it matched the eager one.

The build runs in a child process, from the MLP exported here, beside the step's own build in this one
(model/compile.py): both are mostly one thread of Python, so on two cores they overlap. Measured on the default
model (int4, empty caches, the shared C++ that `attn pull` compiles already there: the template's kernels share
the step's compile command): the child alone 10.4–10.7 s in a quiet hour, 19–21 s in a busy one; beside the step,
a first `--compile` took 4–5.5 s longer than the step alone (alternating runs). Where it fails, the prefill stays eager.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
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


def available(model: Decoder) -> bool:
    """Whether the MLPs can run through the template: a CPU with AMX tiles, every block's MLP gated with int4pack layers."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    mlps = [block.mlp for block in model.layers]
    return (
        amx and model.device.type == "cpu" and model.shard is None and os.environ.get("ATTN_PREFILL", "").strip().lower() != "eager"
        and all(isinstance(m, GatedMLP) and all(isinstance(l, (Int4Linear, Q8Linear)) and l.kernel == "int4pack" for l in (m.gate_up, m.down)) for m in mlps)
    )


def blocked(q: Packed4) -> torch.Tensor:
    """The codes (N, K) laid out for the AMX micro-kernel, as inductor's `CppWoqInt4GemmTemplate.block_weight`
    folds them: per 32 rows, column by column, 16 bytes, byte i holding row i (low nibble) and row i + 16 (high)."""
    codes = q.codes()
    N, K = codes.shape
    c = codes.view(N // 32, 32, K).permute(0, 2, 1).reshape(N // 32, K, 2, 16)
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).contiguous().view(N, K // 2)


class _MlpOnly(nn.Module):
    def __init__(self, mlp: GatedMLP) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.forward(x)


class ManyRows:
    """One layer's MLP for x (…, D) of at least MIN_ROWS rows, through the package with that layer's constants;
    GatedMLP.forward calls it (its `_fused`)."""

    min_rows = MIN_ROWS

    def __init__(self, runner: "_Package", constants: dict[str, torch.Tensor], held: list[torch.Tensor]) -> None:
        self.runner, self.constants = runner, constants
        self.held = held  # of the constants, those the model does not hold itself (the re-blocked codes)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner(self.constants, x)


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


def attach(model: Decoder, path: Path, which: dict[str, str] | None = None) -> int:
    """Load the package at `path` and give every block's MLP its ManyRows; how many. `which`: folded constant → the
    Packed4 it re-blocks (kept beside the package where not given). Raises where it cannot load."""
    torch.cpu._init_amx()  # the kernel grants the AMX tiles per process; without this the first product dies of SIGILL
    if which is None:
        which = json.loads(path.with_suffix(".json").read_text())["blocked"]
    runner = _Package(path)
    own = set(runner.loader.get_constant_fqns())
    for block in model.layers:
        mlp = block.mlp
        tensors = {f"mlp.{n}": t for n, t in [*mlp.named_parameters(), *mlp.named_buffers()] if f"mlp.{n}" in own}
        codes = {name: blocked(mlp.get_submodule(q)) for name, q in which.items()}
        mlp._fused = ManyRows(runner, tensors | codes, list(codes.values()))
    return len(model.layers)


def resident_bytes(model: Decoder) -> int:
    """What the MLPs' ManyRows hold beside the model's own tensors: the re-blocked codes."""
    mlps = [block.mlp for block in model.layers if getattr(block.mlp, "_fused", None) is not None]
    return sum(t.numel() * t.element_size() for m in mlps for t in m._fused.held)


def detach(model: Decoder) -> None:
    for block in model.layers:
        if isinstance(block.mlp, GatedMLP):
            block.mlp._fused = None


class Pending:
    """A build of the MLP package running in a child process (`start`), finished by `finish`."""

    def __init__(self, model: Decoder, path: Path, child: subprocess.Popen, tmp: Path, program: Path) -> None:
        self.model, self.path, self.child, self.tmp, self.program = model, path, child, tmp, program

    def cancel(self) -> None:
        """Stop the child (the export or the step's own build failed: nothing of this is kept)."""
        self.child.kill()
        self.child.wait()
        self.tmp.unlink(missing_ok=True)
        self.program.unlink(missing_ok=True)

    def finish(self) -> bool:
        """Wait for the child; where it built the package, identify its folded constants, check it, keep it and
        attach it. Whether the MLPs now run through it (a failure leaves them eager, and nothing kept)."""
        try:
            try:
                self.child.wait()
            except BaseException:  # interrupted: the child goes too
                self.child.kill()
                raise
            if self.child.returncode != 0 or not self.tmp.exists():
                return False
            which = _identify(self.tmp, self.model.layers[0].mlp)
            attach(self.model, self.tmp, which)  # (the loader unpacks the package: it may move after)
            if not _agrees(self.model):
                detach(self.model)
                return False
            write_atomically(self.path.with_suffix(".json"), json.dumps({"blocked": which}))
            os.replace(self.tmp, self.path)
            return True
        except Exception:  # any failure here only means an eager prefill
            detach(self.model)
            return False
        finally:
            self.tmp.unlink(missing_ok=True)
            self.program.unlink(missing_ok=True)


def start(model: Decoder, cache_dir: Path, key: str, build: bool) -> Pending | None:
    """Attach the MLP package kept under `key`, or (with `build`) start building it in a child process: the Pending
    build to finish; None when there is nothing to wait for (attached, not available, or not to be built)."""
    if not available(model) or getattr(model.layers[0].mlp, "_fused", None) is not None:
        return None
    path = cache_dir / f"mlp-{key}.pt2"
    if path.exists() and path.with_suffix(".json").exists():
        try:
            attach(model, path)
            return None
        except Exception:  # cut short, from another torch: built again
            detach(model)
    if not build:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, program = tempfile.mkstemp(dir=path.parent, suffix=".ep.pt2")
    os.close(fd)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".pt2")
    os.close(fd)
    try:
        # The child starts first: its imports (torch and inductor, ≈ 3 s) run while the MLP is exported here.
        child = subprocess.Popen(
            [sys.executable, "-m", "model.prefill", tmp, str(cache_dir / "cxx")], cwd=Path(__file__).resolve().parents[1],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )
    except OSError:
        Path(program).unlink(missing_ok=True)
        Path(tmp).unlink(missing_ok=True)
        return None
    pending = Pending(model, path, child, Path(tmp), Path(program))
    try:
        with torch.inference_mode(False), torch.no_grad():
            rows = torch.export.Dim("M", min=2, max=1 << 20)
            x = torch.zeros(MIN_ROWS, model.cfg.dim, dtype=model.dtype)
            exported = torch.export.export(_MlpOnly(model.layers[0].mlp), (x,), dynamic_shapes=({0: rows},), strict=False)
            torch.export.save(exported, program)
        child.stdin.write(f"{program}\n".encode())
        child.stdin.close()
    except BaseException as e:
        pending.cancel()
        if not isinstance(e, Exception):
            raise
        return None
    return pending


def _die_with_parent() -> None:
    """In the child before it runs (Linux): killed when attn ends, so that an interrupted run leaves no build behind."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def key_extra() -> list:
    """What the MLP package depends on beyond the modules' sources, settings and shapes: this file and the options."""
    return [hashlib.sha256(Path(__file__).read_bytes()).hexdigest(), TEMPLATE]


def _identify(package: Path, mlp: GatedMLP) -> dict[str, str]:
    """Which of the package's folded constants re-blocks which Packed4 of `mlp`: by shape and dtype, from the package's
    own library (a gate|up and a down never share a shape; the values are not compared: the package's own, folded by
    inductor from layer 0's codes, came out wrong in some builds here, and each layer's are given at load anyway).
    Any other folded constant must be a scalar (a group size), which every layer shares; else ValueError."""
    with tempfile.TemporaryDirectory() as folder:
        with zipfile.ZipFile(package) as z:
            (so,) = [n for n in z.namelist() if n.endswith(".so")]
            library = z.extract(so, folder)
        constants = torch._C._aoti.AOTIModelContainerRunnerCpu(library, 1).extract_constants_map(False)
    own = {f"mlp.{n}" for n, _ in [*mlp.named_parameters(), *mlp.named_buffers()]}
    candidates = {name: q.packed for name, q in mlp.named_modules() if isinstance(q, Packed4)}
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


def _agrees(model: Decoder) -> bool:
    """A second layer's MLP (where there is one) through the package against the same eagerly, on random rows."""
    mlp = model.layers[min(1, len(model.layers) - 1)].mlp
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * MIN_ROWS, model.cfg.dim, generator=gen).to(model.dtype)
    with torch.inference_mode():
        got = mlp._fused(x)
        fused, mlp._fused = mlp._fused, None
        try:
            want = mlp.forward(x)
        finally:
            mlp._fused = fused
    return got.shape == want.shape and bool((got.float() - want.float()).abs().max() <= TOLERANCE * want.float().abs().max())


def _build(out: str, shared: str) -> None:
    """The child's work: import inductor, then compile the MLP exported to the path that comes on stdin into a package
    at `out`, the template the only choice (nothing comes: the parent gave up, and so does the child)."""
    import torch._inductor
    import torch._inductor.codegen.cpp_wrapper_cpu  # noqa: F401 (what the build imports anyway, while the parent exports)
    import torch._inductor.compile_fx  # noqa: F401
    import torch._inductor.config as inductor

    from model.cxx import BUILD_OPTIONS, compiles_beside_each_other

    program = sys.stdin.readline().strip()
    if not program:
        sys.exit(1)
    exported = torch.export.load(program)
    with inductor.patch(BUILD_OPTIONS | TEMPLATE), compiles_beside_each_other(Path(shared)):
        torch._inductor.aoti_compile_and_package(exported, package_path=out)


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")
    _build(*sys.argv[1:3])
