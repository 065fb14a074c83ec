"""`attn bench`: the --json shape, the int8 quality block, --compare transformers, and its absence."""

from __future__ import annotations

import builtins
import json

from model.quant.kernels import one_row_kernel

TIMING_KEYS = {"median", "min", "max", "values"}


def bench_json(attn, path, *extra) -> dict:
    r = attn(["bench", "-m", str(path), "-p", "8", "-p", "12", "-n", "4", "-r", "2", "--json", *extra])
    assert r.code == 0, r
    return json.loads(r.out)


def test_bench_json_keys(attn, tiny_llama):
    d = bench_json(attn, tiny_llama)
    assert {"model", "device", "dtype", "quantize", "compile", "compile_s", "threads", "repetitions",
            "load_ms", "weights_mb", "kv_cache_mb", "results", "quality", "compare"} <= d.keys()
    assert d["dtype"] == "float32" and d["quantize"] == "none" and d["quality"] is None
    assert [r["prompt_tokens"] for r in d["results"]] == [8, 12]
    for row in d["results"]:
        assert row["gen_tokens"] == 4 and row["peak_memory_mb"] > 0
        for key in ("prefill_tps", "decode_tps", "ttft_ms"):
            assert row[key].keys() == TIMING_KEYS and len(row[key]["values"]) == 2
            assert 0 < row[key]["min"] <= row[key]["median"] <= row[key]["max"]


def test_bench_int8_reports_quality(attn, tiny_llama):
    d = bench_json(attn, tiny_llama, "--quantize", "int8", "--threads", "1")
    assert d["quantize"] == "int8" and d["threads"] == 1
    q = d["quality"]
    assert {"text_tokens", "top1_agreement", "perplexity", "perplexity_float32", "perplexity_diff",
            "greedy_identical", "greedy_prompts", "greedy_tokens"} == q.keys()
    assert 0.9 <= q["top1_agreement"] <= 1.0 and q["text_tokens"] > 100
    assert 0 <= q["greedy_identical"] <= q["greedy_prompts"] == 5 and q["greedy_tokens"] == 32


def test_bench_float32_quality_is_identical_to_itself(attn, tiny_llama):
    """The check itself: float32 eager against float32 eager agrees everywhere."""
    d = bench_json(attn, tiny_llama, "--quality")
    q = d["quality"]
    assert q["top1_agreement"] == 1.0 and q["perplexity_diff"] == 0.0
    assert q["greedy_identical"] == q["greedy_prompts"] == 5


def test_bench_compare_transformers(attn, tiny_llama):
    d = bench_json(attn, tiny_llama, "--compare", "transformers")
    row = d["results"][0]
    assert d["compare"] == "transformers"
    assert row["transformers"]["decode_tps"]["median"] > 0
    assert row["ratio"]["decode"] > 0 and row["ratio"]["prefill"] > 0


def test_bench_table_on_stdout(attn, tiny_llama):
    r = attn(["bench", "-m", str(tiny_llama), "-p", "8", "-n", "3", "-r", "1"])
    assert r.code == 0, r
    assert "decode tok/s" in r.out and "weights" in r.out


def test_bench_compare_without_transformers_is_one_clear_error(attn, tiny_llama, monkeypatch):
    real_import = builtins.__import__

    def no_transformers(name, *a, **kw):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    r = attn(["bench", "-m", str(tiny_llama), "--compare", "transformers"])
    assert r.code == 1
    assert r.err.strip().splitlines() == ["attn: error: --compare transformers needs the transformers package (pip install transformers)"]
    assert r.out == ""


def test_generate_accepts_quantize_and_compile_flags(attn, tiny_llama):
    r = attn(["generate", "-m", str(tiny_llama), "--raw", "--temp", "0", "-n", "5", "--quantize", "int8", "--json", "hello"])
    assert r.code == 0, r
    assert json.loads(r.out)["usage"]["completion_tokens"] >= 1


def test_generate_compile_prints_the_same_tokens(attn, tiny_llama):
    args = ["generate", "-m", str(tiny_llama), "--raw", "--temp", "0", "-n", "12", "--ignore-eos", "--json", "hello"]
    eager = attn(args)
    compiled = attn([*args, "--compile"])
    assert eager.code == 0 and compiled.code == 0, compiled
    assert json.loads(compiled.out)["text"] == json.loads(eager.out)["text"]
    assert "compiling the one-token step" in compiled.err


def test_the_default_loads_a_step_built_before_and_pull_builds_it(attn, tiny_llama, tmp_path, monkeypatch):
    """With neither --compile nor --no-compile (nor ATTN_COMPILE), a CPU run loads the step an earlier run built for
    the model and mode, else runs eagerly and builds nothing; `attn pull` builds it (≈ 10 s: a folder of its own, so
    that the session's package tests still build theirs)."""
    from cli.main import app
    from typer.testing import CliRunner

    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "tiny").symlink_to(tiny_llama)
    monkeypatch.setenv("ATTN_HOME", str(home))
    monkeypatch.delenv("ATTN_COMPILE")
    args = ["generate", "-m", "tiny", "--raw", "--temp", "0", "-n", "12", "--ignore-eos", "--json", "hello"]
    eager = attn([*args, "--no-compile"])
    d = bench_json(attn, "tiny")
    assert d["compile"] is False and not (home / "aoti").exists()  # nothing built, nothing said
    layers = 4 * 2 + 1  # qkv, o, gate_up, down in each of 2 layers, and the head: packed once it runs eagerly
    assert d["kernels"] == {"PackedLinear:onednn": layers}
    r = CliRunner().invoke(app, ["pull", "tiny"])
    assert r.exit_code == 0 and "already pulled" in r.stderr and "one-token step built" in r.stderr, r.output
    assert len(list((home / "aoti").glob("ready-*.json"))) == 1
    # the C++ later builds share, compiled first and used by this build (model/cxx.py): the wrapper's and the kernels' headers
    assert len(list((home / "aoti" / "cxx").glob("*/aoti.h.gch"))) == 2 and len(list((home / "aoti" / "cxx").glob("*/interface-*.o"))) == 1
    r = CliRunner().invoke(app, ["pull", "tiny"])
    assert r.exit_code == 0 and "built" not in r.stderr, r.output  # found built: nothing to do
    d = bench_json(attn, "tiny")
    # never packed: the packages read plain weights, one row through BLAS or inductor's reduction (kernels.one_row_kernel)
    assert d["compile"] is True and d["compile_s"] < 5 and d["kernels"] == {f"Linear:{one_row_kernel()}": layers}
    loaded = attn(args)
    assert loaded.code == 0 and "compiling" not in loaded.err and json.loads(loaded.out)["text"] == json.loads(eager.out)["text"]
    assert bench_json(attn, "tiny", "--no-compile")["kernels"] == {"PackedLinear:onednn": layers}
    monkeypatch.setenv("ATTN_COMPILE", "0")
    assert bench_json(attn, "tiny")["compile"] is False

    # A model that is there but cannot be opened: the pull is still a success, its step a warning.
    broken = home / "models" / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["NoSuchForCausalLM"], "model_type": "nosuch"}')
    (broken / "model.safetensors").write_bytes(b"")
    monkeypatch.delenv("ATTN_COMPILE")
    r = CliRunner().invoke(app, ["pull", "broken"])
    assert r.exit_code == 0 and "already pulled" in r.stderr and "warning: the one-token step was not built" in r.stderr, r.output


def test_bench_says_which_kernels_ran_and_the_forced_generic_path(attn, tiny_llama):
    d = bench_json(attn, tiny_llama, "--quantize", "int4", "--no-quality")
    layers = 4 * 2  # qkv, o, gate_up, down in each of 2 layers; the head stays 8-bit
    assert d["kernels"] == {"Int4Linear:int4pack": layers, "Q8Linear:int4pack": 1} and d["cpu"]
    generic = attn(["bench", "-m", str(tiny_llama), "-p", "8", "-n", "4", "-r", "1", "--json", "--quantize", "int4", "--no-quality"],
                   env={"ATTN_KERNELS": "generic"})
    assert generic.code == 0 and "ATTN_KERNELS=generic" in generic.err
    assert json.loads(generic.out)["kernels"] == {"Int4Linear:generic": layers, "Q8Linear:generic": 1}


def test_bench_batch_sizes(attn, tiny_llama):
    """--batch: a row per batch size and prompt length, aggregate rates, the KV cache each size holds
    (the tiny model's rounds to 0 MiB)."""
    d = bench_json(attn, tiny_llama, "--batch", "1,3", "--batch", "5")
    rows = d["results"]
    assert [(r["batch"], r["prompt_tokens"]) for r in rows] == [(1, 8), (3, 8), (5, 8), (1, 12), (3, 12), (5, 12)]
    for row in rows:
        assert row["decode_tps"]["median"] > 0 and row["prefill_tps"]["median"] > 0 and len(row["decode_tps"]["values"]) == 2
    kv = {r["batch"]: r["kv_cache_mb"] for r in rows if r["prompt_tokens"] == 8}
    assert kv[5] >= kv[3] >= kv[1] >= 0
    r = attn(["bench", "-m", str(tiny_llama), "-p", "8", "-n", "3", "-r", "1", "--batch", "1,2"])
    assert r.code == 0 and "× batch 1" in r.out
    for bad in (["--batch", "0"], ["--batch", "a"], ["--batch", "2", "--compare", "transformers"]):
        r = attn(["bench", "-m", str(tiny_llama), *bad])
        assert r.code == 2 and r.err.startswith("attn: error: --"), r


def test_a_run_that_cannot_compile_packs_the_model_it_opened_plain(tiny_llama, tmp_path, monkeypatch):
    """generate and bench open the model plain (the layout the compiled step reads) and pack it only where the run
    goes on eagerly: here the step cannot be built, so the weights end up packed, as for any eager run, and the
    packing counts in the load time."""
    import model.compile
    from cli.common import Dtype
    from cli.models import open_model
    from cli.speed import apply_speed_options
    from model.quant import PackedLinear

    monkeypatch.setenv("ATTN_HOME", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    m = open_model(str(tiny_llama), "cpu", Dtype.auto, quiet=True, defer_packing=True)
    assert m.packing_deferred and m.kernels == {} and not any(isinstance(x, PackedLinear) for x in m.model.modules())

    def fail(*args, **kwargs):
        raise model.compile.CompileFailed("no C++ compiler here")

    monkeypatch.setattr(model.compile, "compile_decode_step", fail)
    before = m.load_ms
    assert apply_speed_options(m, True, 16, quiet=True) is None
    layers = 4 * 2 + 1  # qkv, o, gate_up, down in each of 2 layers, and the head
    assert m.kernels == {"PackedLinear:onednn": layers} and not m.packing_deferred and m.load_ms > before
    packed = m.load_ms
    assert apply_speed_options(m, False, 16, quiet=True) is None  # a second call does not pack again (nor count it)
    assert m.kernels == {"PackedLinear:onednn": layers} and m.load_ms == packed


def test_a_cuda_step_that_inductor_could_not_compile_says_so(tiny_llama, monkeypatch):
    """GraphStep captures the eager step where inductor fails (model/compile.py); the run says why, in one line."""
    import torch

    import model.compile
    from cli import speed
    from cli.common import Dtype
    from cli.models import open_model

    m = open_model(str(tiny_llama), "cpu", Dtype.auto, quiet=True)
    m.device = torch.device("cuda")  # (what the notes read; the step itself is faked)

    def graphed_eagerly(model_, *args, **kwargs):
        model_.decode_step = type("GraphStep", (), {"inductor": False, "why": "Unsupported: an opaque object"})()
        return 1.0

    monkeypatch.setattr(model.compile, "compile_decode_step", graphed_eagerly)
    notes = []
    monkeypatch.setattr(speed, "note", lambda text, quiet=False: notes.append(text))
    assert speed.apply_speed_options(m, True, 16) == 1.0
    assert notes == [
        "compiling the one-token step (CUDA: inductor, then one CUDA graph; ≈ 25 s the first time, ≈ 10 s once inductor's cache in $ATTN_HOME holds it)",
        "warning: inductor could not compile the step (Unsupported: an opaque object): its eager ops run as one CUDA graph instead, slower",
    ]


def test_a_step_loaded_without_the_prompts_package_says_so(tiny_llama, monkeypatch):
    """A step built or loaded while the prompt's AMX package is not (its build failed; attn updated since): one line on
    stderr, and how to build it (model/prefill.py; the step's `prefill_missing`, tests/test_prefill.py)."""
    import model.compile
    import model.prefill
    from cli import speed
    from cli.common import Dtype
    from cli.models import open_model

    m = open_model(str(tiny_llama), "cpu", Dtype.auto, quiet=True, quantize="int4")

    def without_the_package(model_, *args, **kwargs):
        model_.decode_step = type("AotStep", (), {"prefill_missing": ["mid"]})()
        return 1.0

    monkeypatch.setattr(model.compile, "compile_decode_step", without_the_package)
    monkeypatch.setattr(model.prefill, "available", lambda model_: True)
    notes = []
    monkeypatch.setattr(speed, "note", lambda text, quiet=False: notes.append(text))
    assert speed.apply_speed_options(m, True, 16) == 1.0
    assert notes[-1] == "the prompt's package for AMX is not built for this model and mode: the prompt runs eagerly, ≈ 3.6–4.5× slower (it could not be built)"
    assert "the prompt's products for AMX" in notes[0]  # (what the build said it would build)
    assert speed.apply_speed_options(m, None, 16) == 1.0  # a default run: it only loads
    assert notes[-1].endswith("(--compile builds it, once)")


def test_a_step_built_by_another_version_of_attn_is_said_at_each_default_run(attn, tiny_llama, monkeypatch):
    """After an update of attn its packages' keys change: a default run (neither flag) runs eagerly and says so, in
    one line, and how to build the step again (model/compile.BuiltByAnother; the record is kept: tests/test_fastpaths)."""
    import model.compile

    calls = []

    def built_by_another(model_, max_len, cache_dir=None, build=True):
        calls.append(build)
        raise model.compile.BuiltByAnother("built by another version of attn")

    monkeypatch.setattr(model.compile, "compile_decode_step", built_by_another)
    monkeypatch.delenv("ATTN_COMPILE")  # (the suite's default: eager)
    args = ["generate", "-m", str(tiny_llama), "--raw", "--temp", "0", "-n", "6", "--ignore-eos", "--json", "hello"]
    r = attn(args)
    assert r.code == 0 and calls == [False], r.err
    assert "attn: the compiled step for this model and mode was built by another version of attn: this run is eager, slower (`attn pull` or --compile builds it again, once)\n" in r.err
    assert json.loads(r.out)["text"] == json.loads(attn([*args, "--no-compile"]).out)["text"]
    assert "another version" not in attn([*args, "--quiet"]).err
