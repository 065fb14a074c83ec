"""llama.cpp as the yardstick of `attn bench --compare llama.cpp`: the GGUF that matches attn's mode, and
llama.cpp (through llama-cpp-python) in a child process that talks JSON over a pipe (cli/llamacpp_runner.py).

A child process, because llama.cpp is C: a crash in it (some llama.cpp versions segfault on CPUs with
AMX when they repack quantized weights into AMX tiles) must end as one line from attn, not take attn
down; and because nothing llama.cpp prints may reach attn's stdout. When it crashes with its repacked
weight buffers, it is loaded again without them where the installed version allows that, and the
output says so: a weaker configuration is never reported as llama.cpp's default.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from cli.common import note
from model.errors import AttnError
from weights.files import attn_home
from weights.gguf import SOURCE_GGUF
from weights.registry import REGISTRY

PACKAGE = "llama-cpp-python"
PINNED = "0.3.8"  # pyproject's `bench` extra; why this version: README, Performance
INSTALL = 'pip install -e ".[bench]"'

# attn's mode → the llama.cpp weights it is measured against: the first type is what the model's GGUF
# is requantized to; a GGUF already of one of the listed types is used as it is (int4 keeps the
# file's own Q4_0/Q4_1 blocks). 16-bit modes are compared with F16, as in the performance issue.
QUANTIZE_TYPES: dict[str, tuple[str, ...]] = {"int4": ("Q4_1", "Q4_0"), "int8": ("Q8_0",)}
DTYPE_TYPES: dict[str, tuple[str, ...]] = {"float32": ("F32",), "bfloat16": ("F16",), "float16": ("F16",)}

# Weight buffers that hold the file's tensors as they are; any other (AMX, CPU_AARCH64, CPU_REPACK)
# holds weights repacked into a CPU-specific layout ("extra buffer types" in llama.cpp).
PLAIN_BUFFERS = {"CPU", "CPU_Mapped"}


def installed_version() -> str:
    """The installed llama-cpp-python; without it, the one error that says how to install it."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise AttnError(
            f"--compare llama.cpp needs the {PACKAGE} package: {INSTALL} (or pip install {PACKAGE}=={PINNED}; "
            "it compiles llama.cpp, a few minutes)"
        ) from None


def gguf_types(quantize: str, dtype: str) -> tuple[str, ...]:
    """The llama.cpp weight types matching attn's mode (--quantize wins over --dtype)."""
    if quantize != "none":
        if quantize not in QUANTIZE_TYPES:
            raise AttnError(f"--compare llama.cpp has no llama.cpp counterpart for --quantize {quantize}")
        return QUANTIZE_TYPES[quantize]
    return DTYPE_TYPES[dtype]


# --- the GGUF files -------------------------------------------------------------------------------


def source_gguf(model_dir: Path, name: str) -> Path:
    """The GGUF file this model directory was converted from (kept there by pull/convert)."""
    kept = model_dir / SOURCE_GGUF
    if kept.is_file():
        return kept
    hint = f": `attn pull --force {name}` keeps it" if name in REGISTRY else ""
    raise AttnError(f"--compare llama.cpp needs the GGUF the model was converted from, and {kept} is missing{hint}")


def file_type(path: Path) -> str | None:
    """The GGUF's general.file_type in llama-quantize's spelling (Q4_1, Q8_0, F16, …), None when absent."""
    from gguf import GGUFReader, LlamaFileType

    field = GGUFReader(path).fields.get("general.file_type")
    if field is None:
        return None
    name = LlamaFileType(int(field.parts[field.data[0]][0])).name
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def gguf_for_mode(src: Path, types: tuple[str, ...], llama: LlamaCpp, quiet: bool) -> tuple[Path, str]:
    """The GGUF to run and its type: src itself when it is of an accepted type, else src requantized with
    llama.cpp's own quantize, cached under $ATTN_HOME/llamacpp by source hash and type."""
    have = file_type(src)
    if have in types:
        return src, have
    want = types[0]
    digest = _sha256(src)[:16]
    out = attn_home() / "llamacpp" / f"{src.stem}-{digest}-{want}.gguf"
    if out.is_file():
        return out, want
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    note(f"requantizing {src.name} ({have}) to {want} with llama.cpp, once: {out}", quiet)
    try:
        llama.quantize(src, tmp, want)
        os.replace(tmp, out)  # a complete file or none: an interrupted run leaves only the temp name
    finally:
        tmp.unlink(missing_ok=True)
    return out, want


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# --- the child process ---------------------------------------------------------------------------


class Crashed(Exception):
    """The llama.cpp child died (a signal or an exit) instead of answering."""

    def __init__(self, during: str, status: str, lines: list[str]) -> None:
        # faulthandler's stack dump says where in Python; the lines before it (GGML_ASSERT, …) say why.
        telling = [s for s in lines if not s.startswith(('File "', "Thread 0x", "Current thread", "Extension modules", "<no Python frame>"))]
        tail = " | ".join(telling[-3:])
        super().__init__(f"{status} during {during}" + (f"; its last output: {tail}" if tail else ""))
        self.during, self.status, self.lines = during, status, lines[-40:]


def runner_command(fd: int) -> list[str]:
    """How the child is started; faulthandler puts the Python stack of a crash in its captured stderr."""
    return [sys.executable, "-X", "faulthandler", "-m", "cli.llamacpp_runner", str(fd)]


class LlamaCpp:
    """One llama.cpp child: quantize, load a GGUF, run greedy generations; falls back once, loudly,
    to loading without repacked weight buffers when it crashes with them."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}
        self.loaded: dict = {}
        self.crash: dict | None = None
        self._load_args: dict = {}

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> dict:
        """Start the child; its llama-cpp-python version, llama.cpp's system info, and whether it can load
        without repacked buffers."""
        read_fd, write_fd = os.pipe()
        self._log = tempfile.TemporaryFile()
        # The package's parent directory as cwd (and so first on sys.path): `-m cli.llamacpp_runner`
        # finds this attn, not a `cli` package that happens to be in the user's directory.
        cwd = Path(__file__).resolve().parent.parent
        try:
            self.proc = subprocess.Popen(
                runner_command(write_fd), stdin=subprocess.PIPE, stdout=self._log, stderr=self._log,
                pass_fds=(write_fd,), cwd=cwd, text=True,
            )
        except OSError as e:
            os.close(read_fd)
            raise AttnError(f"could not start the llama.cpp process: {e.strerror or e}") from e
        finally:
            os.close(write_fd)  # the child holds the only write end: its death closes the pipe
        self._replies = os.fdopen(read_fd, "r", encoding="utf-8")
        try:
            self.info = self._request("hello", during="start-up")
        except Crashed as crash:
            raise AttnError(f"llama.cpp crashed: {crash}") from None
        return self.info

    def quantize(self, src: Path, dst: Path, type: str) -> None:
        try:
            self._request("quantize", during=f"requantizing to {type}", src=str(src.absolute()), dst=str(dst.absolute()),
                          type=type, threads=self.threads)
        except Crashed as crash:
            raise AttnError(f"llama.cpp crashed: {crash}") from None

    def load(self, path: Path, n_ctx: int, quiet: bool = False) -> dict:
        """Load the GGUF with llama.cpp's defaults (repacked buffers where it uses them)."""
        self._load_args = {"path": str(path.absolute()), "threads": self.threads, "n_ctx": n_ctx}
        try:
            self.loaded = self._request("load", during="loading", **self._load_args, extra_bufts=True)
        except Crashed as crash:
            self.fall_back(crash, quiet)
        return self.loaded

    def run(self, prompt: list[int], n: int) -> dict:
        """ttft_s, decode_s and the greedy tokens of one generation of n tokens after the prompt ids."""
        return self._request("run", during="generation", prompt=prompt, n=n)

    @property
    def repacked(self) -> bool:
        return any(name not in PLAIN_BUFFERS for name in self.loaded.get("buffers", {}))

    @property
    def extra_bufts(self) -> bool:
        return self.crash is None

    def fall_back(self, crash: Crashed, quiet: bool = False) -> None:
        """After a crash: load again without repacked buffers, or raise the crash as attn's error."""
        if self.crash is not None:
            raise AttnError(f"llama.cpp crashed again, without its repacked weight buffers: {crash}")
        if not (crash.during == "loading" or self.repacked):  # nothing was repacked: loading without it changes nothing
            raise AttnError(f"llama.cpp crashed: {crash}")
        if not self.info.get("extra_bufts_switch"):
            raise AttnError(
                f"llama.cpp crashed with its repacked weight buffers ({crash}), and llama-cpp-python "
                f"{self.info.get('version')} cannot load without them; llama-cpp-python {PINNED} ({INSTALL}) is the tested version"
            )
        self.crash = {"during": crash.during, "status": crash.status, "buffers": self.loaded.get("buffers"), "log": crash.lines}
        note(
            f"warning: llama.cpp crashed with its repacked weight buffers ({crash.status} during {crash.during}); "
            "running it again without them (use_extra_bufts=False): its numbers are NOT llama.cpp's default configuration",
            quiet,
        )
        self.close()
        self.start()
        try:
            self.loaded = self._request("load", during="loading", **self._load_args, extra_bufts=False)
        except Crashed as again:
            raise AttnError(f"llama.cpp crashed again, without its repacked weight buffers: {again}") from None

    def close(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        try:
            proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._replies.close()
        self._log.close()

    def _request(self, op: str, during: str, **args) -> dict:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self.proc.stdin.flush()
            line = self._replies.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise self._crashed(during)
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise AttnError(f"llama.cpp failed {during}: {reply['error']}")
        return reply

    def _crashed(self, during: str) -> Crashed:
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pipe closed but still running: nothing more to hear from it
            self.proc.kill()
            code = self.proc.wait()
        if code < 0:
            try:
                status = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                status = f"killed by signal {-code}"
        else:
            status = f"exit status {code}"
        self._log.seek(0)
        lines = [line.strip() for line in self._log.read().decode("utf-8", "replace").splitlines() if line.strip()]
        self.proc = None
        self._replies.close()
        self._log.close()
        return Crashed(during, status, lines)
