"""`attn bench --compare llama.cpp`: argument handling, the missing-package error, the mode → GGUF mapping,
and the child-process protocol (crashes and the fall-back without repacked buffers) with a fake runner.
The suite does not need llama-cpp-python; the tests that run the real one skip without it."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from cli import llamacpp
from model.errors import AttnError
from tests.fake_llamacpp_runner import NOISE
from tests.realmodel import real_gguf_path, real_model_dir  # noqa: F401

FAKE_RUNNER = Path(__file__).with_name("fake_llamacpp_runner.py")
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def write_gguf(path: Path, file_type: int = 3) -> Path:
    """A minimal valid GGUF (the fake runner never reads its tensors): general.file_type 3 = MOSTLY_Q4_1."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_file_type(file_type)
    w.add_tensor("x", np.zeros(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def fake_llama(monkeypatch, tmp_path, tiny_llama) -> Path:
    """The tiny model with a model.gguf beside it, ATTN_HOME in tmp, and the fake runner as llama.cpp."""
    model = tmp_path / "tiny"
    shutil.copytree(tiny_llama, model)
    write_gguf(model / "model.gguf")
    monkeypatch.setenv("ATTN_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(llamacpp, "installed_version", lambda: "0.0-fake")
    monkeypatch.setattr(llamacpp, "runner_command", lambda fd: [sys.executable, str(FAKE_RUNNER), str(fd)])
    return model


def bench(attn, model: Path, *extra: str):
    return attn(["bench", "-m", str(model), "-p", "8", "-n", "4", "-r", "2", "--no-quality", "--compare", "llama.cpp", *extra])


# --- without the package, and bad arguments ------------------------------------------------------


def test_without_llama_cpp_python_one_clear_line(attn, monkeypatch):
    real_version = metadata.version

    def version(name: str) -> str:
        if name == "llama-cpp-python":
            raise metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(metadata, "version", version)
    # A model that does not exist: the missing package is reported first, before any loading.
    r = attn(["bench", "-m", "/nonexistent/model", "--compare", "llama.cpp"])
    assert r.code == 1 and r.out == ""
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attn: error: --compare llama.cpp needs the llama-cpp-python package")
    assert 'pip install -e ".[bench]"' in lines[0]


def test_unknown_compare_engine_is_a_usage_error(attn, tiny_llama):
    r = attn(["bench", "-m", str(tiny_llama), "--compare", "llamacpp"])
    assert r.code == 2 and r.out == ""


def test_compare_llamacpp_refuses_cuda(attn, fake_llama):
    r = bench(attn, fake_llama, "--device", "cuda")
    assert r.code in (1, 2) and r.out == ""  # 1 where CUDA is absent, 2 where it is there: CPU only either way
    assert len(r.err.strip().splitlines()) == 1


def test_mode_to_gguf_type():
    assert llamacpp.gguf_types("none", "float32") == ("F32",)
    assert llamacpp.gguf_types("none", "bfloat16") == ("F16",)
    assert llamacpp.gguf_types("none", "float16") == ("F16",)
    assert llamacpp.gguf_types("int8", "float32") == ("Q8_0",)
    assert llamacpp.gguf_types("int4", "float32")[0] == "Q4_1"  # and the file's own Q4_0 is taken as it is
    with pytest.raises(AttnError, match="no llama.cpp counterpart"):
        llamacpp.gguf_types("int3", "float32")


def test_source_gguf(tmp_path):
    own = tmp_path / "own"
    own.mkdir()
    write_gguf(own / "model.gguf")
    assert llamacpp.source_gguf(own, "own") == own / "model.gguf"
    with pytest.raises(AttnError, match="model.gguf is missing$"):
        llamacpp.source_gguf(tmp_path, "other")
    with pytest.raises(AttnError, match="is missing: `attn pull --force smollm2-135m-instruct` keeps it"):
        llamacpp.source_gguf(tmp_path, "smollm2-135m-instruct")


# --- the child-process protocol, with the fake runner ----------------------------------------------


def test_compare_llamacpp_json(attn, fake_llama, tmp_path):
    r = bench(attn, fake_llama, "--json")
    assert r.code == 0, r
    assert NOISE not in r.out and NOISE not in r.err  # the child's stdout and stderr are captured
    d = json.loads(r.out)
    assert d["compare"] == "llama.cpp" and d["cpu_info"]["cores"] >= 1
    info = d["compare_info"]
    assert info["engine"] == "llama.cpp" and info["version"] == "0.0-fake" and info["pinned"] == llamacpp.PINNED
    assert info["gguf_type"] == "F32" and info["source_gguf"] == str(fake_llama / "model.gguf")
    assert info["extra_buffers"] is True and info["repacked"] is False and info["crash"] is None
    assert info["threads"] == d["threads"] and info["system_info"] == "FAKE = 1"
    # Requantized once from the Q4_1 source, cached under $ATTN_HOME by source hash and type.
    cached = Path(info["gguf"])
    assert cached.parent == tmp_path / "home" / "llamacpp" and cached.name.endswith("-F32.gguf")
    assert cached.read_text().startswith("F32 from ") and not list(cached.parent.glob(".*tmp"))
    assert "requantizing" in r.err
    for row in d["results"]:
        theirs = row["llama.cpp"]
        assert len(theirs["decode_tps"]["values"]) == 2
        # The fake's timings: 1 ms per prompt token, 2 ms per generated token.
        assert theirs["prefill_tps"]["median"] == pytest.approx(1000, rel=0.01)
        assert theirs["decode_tps"]["median"] == pytest.approx(500, rel=0.01)
        assert row["ratio"]["decode"] == pytest.approx(row["decode_tps"]["median"] / 500, rel=0.01, abs=0.006)  # the ratio is rounded to 2 decimals
        assert 0 <= theirs["same_greedy_tokens"] <= 4

    again = bench(attn, fake_llama, "--json", "--quantize", "int8", "-q")
    assert again.code == 0, again
    assert json.loads(again.out)["compare_info"]["gguf_type"] == "Q8_0"
    third = bench(attn, fake_llama, "--json")
    assert "requantizing" not in third.err and json.loads(third.out)["compare_info"]["gguf"] == str(cached)


def test_compare_llamacpp_table(attn, fake_llama):
    r = bench(attn, fake_llama)
    assert r.code == 0, r
    assert "llama.cpp decode" in r.out and "× decode" in r.out
    assert "llama.cpp: llama-cpp-python 0.0-fake (attn's bench extra pins 0.3.8), F32 GGUF" in r.out
    assert "not repacked" in r.out and NOISE not in r.out


def test_crash_with_repacked_buffers_reruns_without_them_and_says_so(attn, fake_llama, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA", "crash-repacked")
    r = bench(attn, fake_llama, "--json")
    assert r.code == 0, r
    info = json.loads(r.out)["compare_info"]
    assert info["extra_buffers"] is False and info["repacked"] is False
    crash = info["crash"]
    assert crash["status"] == "killed by SIGSEGV" and crash["during"] == "generation"
    assert crash["buffers"] == {"CPU_Mapped": 1.5, "AMX": 2.5} and "GGML_ASSERT(fake) failed" in crash["log"]
    warning = [line for line in r.err.splitlines() if "crashed" in line]
    assert len(warning) == 1 and "NOT llama.cpp's default configuration" in warning[0]

    table = bench(attn, fake_llama)
    assert table.code == 0, table
    assert "llama.cpp CRASHED with its repacked weight buffers (killed by SIGSEGV during generation)" in table.out


def test_crash_while_loading_reloads_without_repacked_buffers(attn, fake_llama, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA", "crash-load")
    r = bench(attn, fake_llama, "--json")
    assert r.code == 0, r
    info = json.loads(r.out)["compare_info"]
    assert info["extra_buffers"] is False and info["crash"]["during"] == "loading"


def test_second_crash_without_repacked_buffers_is_one_error(attn, fake_llama, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA", "crash-always")
    r = bench(attn, fake_llama, "--json")
    assert r.code == 1 and r.out == ""
    errors = [line for line in r.err.splitlines() if line.startswith("attn: error:")]
    assert len(errors) == 1 and "crashed again, without its repacked weight buffers: killed by SIGSEGV" in errors[0]
    assert "NOT llama.cpp's default configuration" in r.err  # the first crash was announced before


def test_crash_where_buffers_cannot_be_turned_off_is_one_error(attn, fake_llama, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA", "crash-no-switch")
    r = bench(attn, fake_llama, "--json", "-q")
    assert r.code == 1 and r.out == ""
    (line,) = r.err.strip().splitlines()
    assert line.startswith("attn: error: llama.cpp crashed with its repacked weight buffers (killed by SIGSEGV during generation")
    assert "GGML_ASSERT(fake) failed" in line and "cannot load without them" in line


def test_crash_without_repacking_is_not_retried(attn, fake_llama, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA", "crash-plain")
    r = bench(attn, fake_llama, "-q")
    assert r.code == 1 and r.out == ""
    (line,) = r.err.strip().splitlines()
    assert line.startswith("attn: error: llama.cpp crashed: killed by SIGSEGV during generation")


# --- the real llama-cpp-python (skipped where it is not installed, as in CI) -----------------------


needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason=f"llama-cpp-python is not installed ({llamacpp.INSTALL})")


@needs_llama_cpp
@pytest.mark.slow
def test_real_runner_greedy_on_the_default_gguf(real_gguf_path):  # noqa: F811
    with llamacpp.LlamaCpp(threads=2) as llama:
        info = llama.start()
        assert info["version"] == metadata.version("llama-cpp-python") and "AVX" in info["system_info"]
        loaded = llama.load(real_gguf_path, n_ctx=64)
        assert loaded["file_type"] == "Q4_1" and loaded["n_vocab"] == 49152 and loaded["buffers"]
        a = llama.run([1, 504, 3458, 282], 6)
        b = llama.run([1, 504, 3458, 282], 6)
        assert a["tokens"] == b["tokens"] and len(a["tokens"]) == 6  # greedy, and the cache is reset between runs
        assert a["ttft_s"] > 0 and a["decode_s"] > 0


@needs_llama_cpp
@pytest.mark.slow
def test_real_compare_int8(attn, real_model_dir, real_gguf_path, tmp_path, monkeypatch):  # noqa: F811
    model = tmp_path / "model"
    model.mkdir()
    for f in real_model_dir.iterdir():
        (model / f.name).symlink_to(f)
    if not (model / "model.gguf").exists():  # a test cache pulled before pull kept the source GGUF
        (model / "model.gguf").symlink_to(real_gguf_path)
    monkeypatch.setenv("ATTN_HOME", str(tmp_path / "home"))
    r = attn(["bench", "-m", str(model), "-p", "8", "-n", "8", "-r", "1", "--quantize", "int8", "--no-quality",
              "--compare", "llama.cpp", "--threads", "2", "--json"])
    assert r.code == 0, r
    d = json.loads(r.out)  # nothing llama.cpp printed is in stdout
    info = d["compare_info"]
    assert info["gguf_type"] == "Q8_0" and info["crash"] is None and info["threads"] == 2
    assert llamacpp.file_type(Path(info["gguf"])) == "Q8_0"
    assert d["results"][0]["llama.cpp"]["decode_tps"]["median"] > 0
