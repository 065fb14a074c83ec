"""Compiling a package's C++ (model/compile.py builds the packages): inductor's build options, its vector-ISA
test builds side by side, the wrapper beside the kernels and with lean flags, and the parts every wrapper shares
compiled once per machine.

A package's C++ is two sources, each mostly what every package shares. The wrapper (≈ 2600 lines for a block of the
default model): torch's headers, AOTInductor's runtime interface (the `extern "C"` functions a loader calls: ≈ 660
lines, the same text in every package), and the block's own code, whose g++ time went half to libstdc++'s std::regex
(AOTInductor's model base parses its device name with it: model/aoti_shared.h). The kernels: torch's vectorized
headers (`cpp_prefix.h`, three quarters of their g++ time) and the block's fused loops. With a folder for the shared
parts (`$ATTN_HOME/aoti/cxx`), a build that finds nothing there compiles both sources whole, as inductor writes them,
and keeps the headers' names, the interface's text and the compile commands; `prepare_headers` (or a build inside
`sharing_first`: `attn pull`'s float32 step, before its own code) compiles the interface into an object (with std::regex instantiated) and the headers into
precompiled headers (GCC, ≈ 124 and 148 MB). Every later build compiles only the block's own code, from the
precompiled headers, and links the wrapper's with the interface's object (`g++ -r`). On a 2-core Xeon, int4 in-process:
7.3–7.9 s against 12.3–14.1 s whole (alternating builds), the wrapper 1.7 s against 4.4–9.6, the kernels 1.0 s against
2.8–5. All of it is keyed by torch's version, the compile command and the headers' text. GCC passes over a
precompiled header that does not fit (it parses the headers instead), and wherever this route fails a source
compiles whole, as before.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch

# How packages are built, for a first use that waits less (measured on a 2-core Zen4, empty inductor cache):
# - precompiled headers off: inductor builds them anew for each package here (≈ 13 s for two), and the wrapper
#   compiles about as fast without them;
# - vector ISA taken from the CPU's flags, without inductor's test builds of each ISA (≈ 10 s on a new machine;
#   a toolchain that cannot build for it fails the package instead, and the step falls back);
# - no line tables (-g1, for profilers);
# - the C++ wrapper at -Og (inductor's default -O1; -O0 compiles as fast but costs ≈ 1.1 ms a token), and without the
#   flags only the kernels need (lean_wrapper).
# These options: the default model's first build 27.6–29.1 → 15.9–16.4 s; with the wrapper and kernels compiled
# side by side (compiles_beside_each_other), 13.5–14.8 s; with the lean wrapper and the ISA test builds side by
# side, 10.9–13.0 s (against 13.4–15.8 s in the same series).
BUILD_OPTIONS = {
    "aot_inductor.precompile_headers": False,
    "cpp.vec_isa_ok": True,
    "aot_inductor.enable_line_tables": False,
    "aot_inductor.compile_wrapper_opt_level": "Og",
    # a multiply and an add fused into one FMA where the C++ compiler sees them (inductor's default is
    # -ffp-contract=off): the quantized layers' lanes loops (model/quant/lanes.py) run ≈ 5% faster; in every build
    # alike, so that their compile commands stay one and share the parts kept in $ATTN_HOME/aoti/cxx
    "cpp.enable_floating_point_contract_flag": "fast",
}


def probe_vector_isa() -> None:
    """What inductor picks its vector ISA by (cached for the process), with the build options (which inductor
    keeps per thread). Its test builds (one per ISA the CPU has: AVX2, AVX-512, AVX-512 VNNI each try bfloat16,
    ≈ 0.6 s apiece, one after the other) run side by side first, each ISA's answer cached on it."""
    import torch._inductor.config as inductor
    import torch._inductor.cpu_vec_isa as vec

    def probe(isa=None) -> None:
        try:
            with inductor.patch(BUILD_OPTIONS):
                bool(isa) if isa is not None else vec.pick_vec_isa()
        except Exception:  # (a thread's traceback would reach stderr) the build picks the ISA itself, and fails there if it must
            pass

    has = getattr(vec, "x86_isa_checker", list)()
    each = [threading.Thread(target=probe, args=(isa,), daemon=True) for isa in getattr(vec, "supported_vec_isa_list", []) if has and all(f in has for f in str(isa).split())]
    for t in each:
        t.start()
    for t in each:
        t.join()
    probe()


@contextmanager
def compiles_beside_each_other(shared: Path | None = None) -> Iterator[None]:
    """inductor compiles a package's C++ wrapper and then its kernels, one after the other (5–6.5 s and 2.3–3 s here):
    while this is open, those two compile-only builds start in the background, so the kernels compile on the
    other core beside the wrapper; the next build (the weights' object, then the link) waits for both and
    raises their errors. Builds of other names run as before. The wrapper compiles with lean flags, and both from
    the parts kept in `shared` where they are there (the module's docstring)."""
    from torch._inductor.cpp_builder import CppBuilder

    original = CppBuilder.build
    pending: list[Future] = []
    first = _SHARE_FIRST.get()

    def build(builder: CppBuilder) -> None:
        name = str(getattr(builder, "_name", ""))
        if getattr(builder, "_compile_only", False) and name.endswith((".wrapper", ".kernel")):
            pending.append(pool.submit(_lean_build if name.endswith(".wrapper") else _kernels_build, builder))
            return
        while pending:
            pending.pop(0).result()
        original(builder)

    def _lean_build(builder: CppBuilder) -> None:
        full = builder.get_command_line
        builder.get_command_line = lambda: lean_wrapper(full())
        try:
            if not _from_parts(builder):
                original(builder)
        except Exception:  # a compiler or torch the lean flags do not suit: as inductor writes it
            builder.get_command_line = full
            original(builder)

    def _kernels_build(builder: CppBuilder) -> None:
        if not _from_parts(builder):
            original(builder)

    def _from_parts(builder: CppBuilder) -> bool:
        """The wrapper or kernels compiled from the kept parts (True), or else to be compiled whole, the parts
        kept for `prepare_headers`; inside `sharing_first`, the parts compiled first where they are not yet."""
        source, target = str(getattr(builder, "_sources_args", "")), str(getattr(builder, "_target_file", ""))
        try:
            parts = _Parts.of(source, target, builder.get_command_line(), shared) if shared is not None else None
        except OSError:
            return False
        if parts is None:
            return False
        if not parts.ready():
            parts.keep()
            if not first:
                return False
            _compile_kept([parts.folder])
            if not parts.ready():
                return False
        try:
            parts.compile_own(source, target)
            return True
        except Exception:  # whole, as before
            return False

    with ThreadPoolExecutor(2) as pool:
        CppBuilder.build = build
        try:
            yield
            while pending:
                pending.pop(0).result()
        finally:
            CppBuilder.build = original


def lean_wrapper(command: str) -> str:
    """g++'s command for a package's C++ wrapper without what only slows it down: the wrapper calls the kernels
    (compiled apart, with the CPU's vector flags) and torch's C shim, so it needs neither the vector ISA flags
    (-march=native, -mavx512*: their intrinsics headers are parsed for nothing) nor C++20's larger standard
    headers, nor the warnings. Measured on a 2-core Zen4 (the default model's wrapper, 3 runs each): 6.7–7.0 s →
    5.0–5.7 s, and with -Og (BUILD_OPTIONS) 4.4–4.7 s; decode the same (21.6–23.2 ms a token against 21.3–25.8)."""
    command = command.replace("-std=c++20", "-std=c++17").replace(" -Wall", " -w").replace(" -pedantic", "")
    return re.sub(r" -march=native| -mavx\w*| -mfma\b| -mamx[\w-]*", "", command)


_INTERFACE = "// Definition of AOTI runtime interface functions"  # where AOTInductor's interface starts in a wrapper
_INTERFACE_END = '\n} // extern "C"\n'  # and ends
_SOURCE, _TARGET = "@SOURCE@", "@TARGET@"  # in a kept compile command, the paths it compiles from and to
_KERNELS = "#include <torch/csrc/inductor/cpp_prefix.h>\n"  # what a package's kernels start with (after comments)
_SHARED = Path(__file__).with_name("aoti_shared.h")  # what the block's code declares and the interface's object instantiates


@dataclass
class _Parts:
    """A wrapper or kernels source split into what every package shares (torch's headers; a wrapper's runtime
    interface) and the block's own code, with the folder where the shared parts are kept for this torch, command
    and headers."""

    folder: Path
    command: str  # the compile command, its source and target replaced by _SOURCE and _TARGET
    headers: str  # what the precompiled header holds
    own: str  # the rest, from the precompiled header on
    interface: str | None  # a wrapper's runtime interface (None: kernels)

    @staticmethod
    def of(source: str, target: str, command: str, shared: Path) -> _Parts | None:
        if f" {source} " not in command or f" {target}" not in command:
            return None
        kept = command.replace(f" {source} ", f" {_SOURCE} ").replace(f" {target}", f" {_TARGET}")
        text = Path(source).read_text()
        start = text.find(_INTERFACE)
        end = text.find(_INTERFACE_END, max(start, 0))
        if start >= 0 and end >= 0:  # a wrapper
            end += len(_INTERFACE_END)
            headers = _SHARED.read_text() + "".join(line + "\n" for line in text[:end].splitlines() if line.startswith("#include"))
            own, interface = text[end:], text[:end]
        elif _KERNELS in text and all(not line.strip() or line.startswith("//") for line in text[: text.index(_KERNELS)].splitlines()):  # kernels
            headers, own, interface = _KERNELS, text.replace(_KERNELS, "", 1), None
        else:
            return None
        folder = shared / _digest(torch.__version__, kept, headers)
        return _Parts(folder, kept, headers, own, interface)

    @property
    def header(self) -> Path:
        return self.folder / "aoti.h"

    @property
    def interface_object(self) -> Path:
        return self.folder / f"interface-{_digest(self.interface or '')}.o"

    def ready(self) -> bool:
        """Whether compiling from the parts saves time: a wrapper's interface is compiled (its headers may be
        precompiled too), the kernels' headers are precompiled."""
        return self.interface_object.exists() if self.interface is not None else self.header.with_name("aoti.h.gch").exists()

    def compile_own(self, source: str, target: str) -> None:
        """The object from the block's own code (on the precompiled headers, where built) and, for a wrapper, the
        kept interface's object, linked together."""
        own = Path(source).with_suffix(".own.cpp")
        own.write_text(f'#include "{self.header}"\n{self.own}')
        if self.interface is None:
            _run(self._command(str(own), target))
            return
        _run(self._command(str(own), str(own.with_suffix(".o"))))
        _run(f"{self.command.split()[0]} -r -nostdlib {self.interface_object} {own.with_suffix('.o')} -o {target}")

    def keep(self) -> None:
        """Keep the headers, the interface's text and the command, for `prepare_headers` to compile."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomically(self.header, self.headers)
            write_atomically(self.folder / "command", self.command)
            if self.interface is not None:
                write_atomically(self.interface_object.with_suffix(".cpp"), f"#define ATTN_REGEX_KIND template\n{_SHARED.read_text()}{self.interface}")
        except OSError:  # only a cache
            pass

    def _command(self, source: str, target: str) -> str:
        return self.command.replace(_SOURCE, source).replace(_TARGET, target)


_SHARE_FIRST: ContextVar[bool] = ContextVar("share_first", default=False)


@contextmanager
def sharing_first() -> Iterator[None]:
    """Builds inside compile the shared parts first where they are not compiled yet (as `prepare_headers` would
    after them), then only their own code, instead of compiling whole: `attn pull`, which prepares the shared
    parts anyway, so saves the whole compile (a build that does not go on to prepare would wait longer)."""
    token = _SHARE_FIRST.set(True)
    try:
        yield
    finally:
        _SHARE_FIRST.reset(token)


def prepare_headers(shared: Path) -> int:
    """Compile what the packages built here share, where their first builds kept it and it is not compiled yet:
    each wrapper's runtime interface into an object, and the wrappers' and kernels' headers into precompiled headers
    (GCC, ≈ 124 and 148 MB), two at a time (2-core Xeon: 7–17 s in all). How many files were compiled."""
    return _compile_kept([kept.parent for kept in sorted(Path(shared).glob("*/command"))])


def _compile_kept(folders: list[Path]) -> int:
    jobs = []
    for folder in folders:
        if not (folder / "command").exists():  # (keeping it failed: nothing to compile)
            continue
        command = (folder / "command").read_text()
        header = folder / "aoti.h"
        if header.exists() and not header.with_name("aoti.h.gch").exists():
            jobs.append((command, f"-x c++-header {header}", header.with_name("aoti.h.gch")))
        jobs += [(command, str(source), source.with_suffix(".o")) for source in folder.glob("interface-*.cpp") if not source.with_suffix(".o").exists()]

    def compile_one(command: str, source: str, target: Path) -> int:
        tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp")
        try:
            _run(command.replace(_SOURCE, source).replace(_TARGET, str(tmp)))
            os.replace(tmp, target)
            return 1
        except Exception:  # only a cache: later wrappers compile whole, or parse the headers
            return 0
        finally:
            tmp.unlink(missing_ok=True)

    with ThreadPoolExecutor(2) as pool:
        return sum(pool.map(lambda job: compile_one(*job), jobs))


def _run(command: str) -> None:
    from torch._inductor.cpp_builder import run_compile_cmd

    run_compile_cmd(command, cwd=os.getcwd())


def write_atomically(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(text)
        os.replace(tmp, path)


def _digest(*texts: str) -> str:
    return hashlib.sha256("\0".join(texts).encode()).hexdigest()[:20]
