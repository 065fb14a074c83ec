"""Where models live on this machine: $ATTN_HOME, its models/ directory, and what is in it."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from model.errors import AttnError
from model.loading import SAFETENSORS_DTYPES, read_header


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
    problem: str | None = None  # why it cannot run, where that shows without loading it (unreadable config or weights)


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
        for f in sorted(path.glob("model*.safetensors")):  # the weights, not the GGUF blocks beside them
            for dtype, count in _safetensors_counts(f).items():
                dtypes[dtype] = dtypes.get(dtype, 0) + count
                parameters += count
        dtype = max(dtypes, key=dtypes.get) if dtypes else "?"
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        problem = None if dtypes else "its weights cannot be read"
        try:
            if not isinstance(json.loads((path / "config.json").read_text(encoding="utf-8")), dict):
                problem = "its config.json is not a JSON object"
        except (OSError, ValueError):
            problem = "its config.json is not valid JSON"
        found.append(LocalModel(path.name, path, parameters, dtype, size, problem))
    return found


def _safetensors_counts(path: Path) -> dict[str, int]:
    """Element count per dtype name, from the (checked) safetensors header only; {} for a broken file."""
    try:
        header = read_header(path)
    except (AttnError, OSError):
        return {}
    counts: dict[str, int] = {}
    for info in header.values():
        name = str(SAFETENSORS_DTYPES[info["dtype"]]).removeprefix("torch.")
        counts[name] = counts.get(name, 0) + math.prod(info["shape"])
    return counts
