"""Every bad input, broken file and odd event ends in one clear line and the documented exit code."""

from __future__ import annotations

import gc
import json
import os
import random
import resource
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from model.errors import AttnError
from model.generate import generate
from model.loading import load_model
from model.sampling import SamplingSettings
from model.tokenizer import Tokenizer


@pytest.fixture
def model_copy(tiny_llama, tmp_path) -> Path:
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    return d


def one_line_error(r, code: int, *needles: str) -> None:
    assert r.code == code, r
    assert r.out == "", r
    assert r.err.count("\n") == 1 and r.err.startswith("attn: error: "), r
    assert "Traceback" not in r.err
    for n in needles:
        assert n in r.err, (n, r.err)


def gen(attn, model: Path, *extra: str, prompt: str = "hi"):
    return attn(["generate", "-m", str(model), "--raw", "--temp", "0", "-n", "2", *extra, prompt])


# --- model directories and config.json --------------------------------------------------


def test_model_path_missing(attn, tmp_path):
    one_line_error(gen(attn, tmp_path / "nowhere"), 1, "nowhere")


def test_tracebacks_follow_the_parsed_verbose_option(attn, tmp_path):
    """-v shows the traceback of an error; a `-v` that is the value of another option does not."""
    missing = str(tmp_path / "nowhere")
    r = attn(["generate", "-m", missing, "--raw", "-v", "hi"])
    assert r.code == 1 and r.out == "" and "Traceback" in r.err
    assert r.err.splitlines()[-1].startswith("attn: error: ") and "nowhere" in r.err.splitlines()[-1]  # still ends with the one line
    for value_is_v in (["--stop", "-v", "hi"], ["-p", "-v"], ["--system", "-v", "hi"]):
        one_line_error(attn(["generate", "-m", missing, "--raw", *value_is_v]), 1, "nowhere")
    for args in (["inspect", "-m", missing, "-t", "-v", "hi"], ["explain", "-m", missing, "--token", "-v", "hi"]):
        one_line_error(attn(args), 1, "nowhere")
    one_line_error(attn(["inspect", "-m", missing, "-v", "--top", "x", "hi"]), 2, "--top")  # a usage error: the parser's traceback helps nobody
    r = attn(["generate", "-m", missing, "--raw", "--stop", "-v", "hi"], env={"ATTN_DEBUG": "1"})
    assert r.code == 1 and "Traceback" in r.err


def test_directory_without_config(attn, tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(gen(attn, tmp_path / "empty"), 1, "empty", "config.json")


def test_config_not_json(attn, model_copy):
    (model_copy / "config.json").write_text("{ not json")
    one_line_error(gen(attn, model_copy), 1, "config.json", "invalid JSON")


def test_unsupported_model_type(attn, model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    one_line_error(gen(attn, model_copy), 1, "'mamba'", "gpt2", "llama", "mistral", "qwen2")


@pytest.mark.parametrize("change, said", [({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer (got 0)"),
                                          ({"rope_theta": "big"}, "rope_theta must be a number (got 'big')"), ({"rope_theta": -1}, "rope_theta must be a positive number (got -1.0)")])
def test_config_values_out_of_range(attn, model_copy, change, said):
    cfg = json.loads((model_copy / "config.json").read_text())
    if "rope_theta" in change and isinstance(cfg.get("rope_parameters"), dict):  # (transformers 5 writes it there)
        cfg["rope_parameters"] = {**cfg["rope_parameters"], **change}
    (model_copy / "config.json").write_text(json.dumps({**cfg, **change}))
    one_line_error(gen(attn, model_copy), 1, said)


# --- safetensors files -----------------------------------------------------------------


def weights_file(d: Path) -> Path:
    return d / "model.safetensors"


def test_truncated_safetensors(attn, model_copy):
    f = weights_file(model_copy)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    one_line_error(gen(attn, model_copy), 1, "model.safetensors", "truncated")


def test_header_length_larger_than_file(attn, model_copy):
    f = weights_file(model_copy)
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 10**15)  # a lying length must not be allocated
    f.write_bytes(bytes(data))
    one_line_error(gen(attn, model_copy), 1, "model.safetensors", "header length")


def test_header_not_json(attn, model_copy):
    f = weights_file(model_copy)
    data = bytearray(f.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8 : 8 + n] = b"x" * n
    f.write_bytes(bytes(data))
    one_line_error(gen(attn, model_copy), 1, "model.safetensors", "not valid JSON")


def rewrite(d: Path, change) -> None:
    from safetensors.torch import load_file

    tensors = load_file(weights_file(d))
    change(tensors)
    save_file(tensors, weights_file(d))


@pytest.mark.parametrize("index", ['{"weight_map": 5}', '{"weight_map": {"a": 1}}', '{"metadata": {}}', "not json"])
def test_a_broken_shard_index_is_one_error_line(attn, model_copy, index):
    weights_file(model_copy).rename(model_copy / "model-00001-of-00001.safetensors")
    (model_copy / "model.safetensors.index.json").write_text(index)
    one_line_error(gen(attn, model_copy), 1, "model.safetensors.index.json: not a valid safetensors index")


def test_wrong_shape_names_file_and_tensor(attn, model_copy):
    rewrite(model_copy, lambda t: t.__setitem__("model.layers.1.mlp.down_proj.weight", torch.zeros(64, 100)))
    one_line_error(gen(attn, model_copy), 1, "model.safetensors", "model.layers.1.mlp.down_proj.weight", "[64, 100]")


def test_unsupported_dtype(attn, model_copy):
    rewrite(model_copy, lambda t: t.__setitem__("model.norm.weight", torch.zeros(64, dtype=torch.int32)))
    one_line_error(gen(attn, model_copy), 1, "model.norm.weight", "dtype")


def test_missing_tensor(attn, model_copy):
    rewrite(model_copy, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    one_line_error(gen(attn, model_copy), 1, "missing tensor model.layers.0.self_attn.k_proj.weight")


def test_unexpected_tensor(attn, model_copy):
    rewrite(model_copy, lambda t: t.__setitem__("model.layers.0.self_attn.rotary.inv_freq", torch.zeros(8)))
    one_line_error(gen(attn, model_copy), 1, "unexpected tensor model.layers.0.self_attn.rotary.inv_freq")


def test_sharded_index_names_a_missing_shard(attn, tmp_path, tokenizer_json):
    from tests.conftest import save_model

    save_model("llama", tmp_path, tokenizer_json, shards="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    one_line_error(gen(attn, tmp_path), 1, shard.name)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_safetensors_never_crash(tiny_llama, tmp_path_factory, data):
    """Random byte mutations of a valid file: it loads, or raises AttnError; nothing else."""
    d = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(tiny_llama, d, dirs_exist_ok=True)
    f = weights_file(d)
    raw = bytearray(f.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, 8 + n + 64))  # the length and the header are where parsing can go wrong
        raw[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    f.write_bytes(bytes(raw))
    try:
        load_model(d)
    except AttnError as e:
        assert "\n" not in str(e)


# --- tokenizer and chat template --------------------------------------------------------


def test_tokenizer_missing(attn, model_copy):
    (model_copy / "tokenizer.json").unlink()
    one_line_error(gen(attn, model_copy), 1, "tokenizer.json")


def test_tokenizer_unreadable(attn, model_copy):
    (model_copy / "tokenizer.json").write_text('{"model": 42}')
    one_line_error(gen(attn, model_copy), 1, "tokenizer.json", "unreadable tokenizer")


def test_tokenizer_larger_than_embedding(attn, model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["vocab_size"] = 100
    (model_copy / "config.json").write_text(json.dumps(cfg))
    one_line_error(gen(attn, model_copy), 1, "tokenizer has", "100 rows")


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('touch /tmp/attn-pwned').read() }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{% set x = [].append.__self__ %}{{ x.__class__.__init__.__globals__ }}",
        5,  # not a template at all
        "{% for i in range(10**9) %}{{ i }}{% endfor %}",  # the sandbox's range limit
        "{{ messages[0]['content'] / 2 }}",  # a TypeError inside
    ],
)
def test_hostile_chat_template_is_refused(attn, model_copy, template):
    cfg = json.loads((model_copy / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (model_copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = attn(["generate", "-m", str(model_copy), "--chat", "-n", "2", "hi"])
    one_line_error(r, 1, "chat template")
    assert not Path("/tmp/attn-pwned").exists()


# --- prompts -------------------------------------------------------------------------------


def test_empty_prompt_is_a_usage_error(attn, tiny_llama):
    one_line_error(gen(attn, tiny_llama, prompt=""), 2, "empty prompt")


def test_whitespace_prompt_with_raw_generates(attn, tiny_llama):
    r = gen(attn, tiny_llama, "--json", prompt="   ")
    assert r.code == 0 and json.loads(r.out)["usage"]["prompt_tokens"] >= 1


def test_invalid_utf8_stdin_names_the_offset(attn, tiny_llama):
    r = attn(["generate", "-m", str(tiny_llama), "--raw", "-n", "2"], stdin=b"good text \xff\xfe more")
    one_line_error(r, 2, "stdin", "byte offset 10")
    r = attn(["generate", "-m", str(tiny_llama), "--raw", "-n", "2", "--invalid-utf8", "replace", "--json"], stdin=b"good \xff")
    assert r.code == 0 and "warning" in r.err and "byte offset 5" in r.err


def test_invalid_utf8_arguments_name_the_offset(attn, tiny_llama, tmp_path):
    """A command-line argument that is not UTF-8 (Python holds its bytes as lone surrogates): exit 2 naming the
    argument and the byte offset, as for stdin, whatever option it is the value of; `--invalid-utf8 replace` accepts it."""
    bad = b"good \xff\xfe".decode("utf-8", "surrogateescape")
    for args in (["generate", "-m", str(tiny_llama), "--raw", "-n", "2", bad], ["generate", "-m", str(tiny_llama), "-n", "2", "--system", bad, "hi"],
                 ["inspect", "-m", str(tiny_llama), "a b c", "-t", bad], ["heads", "-m", str(tiny_llama), bad]):
        one_line_error(attn(args), 2, 'the argument "good \\xff\\xfe" is not valid UTF-8 at byte offset 5')
    r = attn(["generate", "-m", str(tiny_llama), "--raw", "-n", "2", "--invalid-utf8", "replace", "--json", bad])
    assert r.code == 0 and "warning" in r.err and "byte offset 5" in r.err and json.loads(r.out)["usage"]["prompt_tokens"] >= 2
    named = tmp_path / b"caf\xe9.txt".decode("utf-8", "surrogateescape")  # a file name that is not UTF-8 is still a file
    named.write_bytes(b"a file named in Latin-1")
    r = attn(["generate", "-m", str(tiny_llama), "--raw", "-n", "2", "--json", "-f", str(named)])
    assert r.code == 0 and json.loads(r.out)["usage"]["prompt_tokens"] > 2, r


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=60))
def test_any_stdin_bytes_end_cleanly(attn, tiny_llama, data):
    r = attn(["generate", "-m", str(tiny_llama), "--raw", "--temp", "0", "-n", "1", "--json"], stdin=data)
    assert r.code in (0, 2), r
    if r.code == 2:
        last = r.err.splitlines()[-1]
        assert last.startswith("attn: error: ") and ("byte offset" in last or "no prompt" in last or "empty" in last)
    else:
        json.loads(r.out)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40))
def test_any_unicode_prompt_generates_or_is_rejected(attn, tiny_llama, text):
    r = attn(["generate", "-m", str(tiny_llama), "--raw", "--temp", "0", "-n", "1", "--json", "--", text])
    assert r.code in (0, 2), r
    if r.code == 0:
        assert "text" in json.loads(r.out)


def test_cuda_without_cuda_is_a_runtime_error(attn, tiny_llama):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    one_line_error(gen(attn, tiny_llama, "--device", "cuda"), 1, "CUDA is not available")


def test_non_finite_logits_stop_with_the_step(attn, model_copy):
    rewrite(model_copy, lambda t: t.__setitem__("model.norm.weight", torch.full((64,), float("inf"))))
    one_line_error(gen(attn, model_copy), 1, "NaN/inf logits at generation step 0")


def test_missing_arguments_are_named(attn):
    one_line_error(attn(["convert"]), 2, "missing argument GGUF")
    one_line_error(attn(["convert", "x.gguf"]), 2, "missing argument OUT_DIR")


def test_stdin_with_crlf_line_ends_joins_the_prompt_cleanly(attn, tiny_llama):
    r = attn(["generate", "-m", str(tiny_llama), "--raw", "--echo", "-n", "1", "--temp", "0", "X"], stdin=b"Hi\r\n\r\n")
    assert r.code == 0 and r.out.startswith("Hi\n\nX"), r


def test_a_seed_past_64_bits_is_a_usage_error(attn, tiny_llama):
    for command in ("generate", "batch"):
        r = attn([command, "-m", str(tiny_llama), "--raw", "-n", "2", "--seed", str(2**64), "-"], stdin=b"hi")
        one_line_error(r, 2, "--seed must be ≤ 9223372036854775807")
    r = attn(["batch", "-m", str(tiny_llama), "--raw", "-n", "2", "-"], stdin=b'{"prompt": "hi", "seed": 9223372036854775808}\n')
    assert r.code == 1 and "seed" in json.loads(r.out)["error"] and "9223372036854775807" in json.loads(r.out)["error"], r


def test_a_prompt_over_the_context_is_one_error_line_in_every_command(attn, tiny_llama):
    long = "word " * 100  # 301 tokens; the model has 256 positions
    for command in ("inspect", "explain", "heads", "explore"):
        one_line_error(attn([command, "-m", str(tiny_llama), "--raw", long]), 1, "prompt of 301 tokens exceeds the model's 256 positions")


def test_bad_generation_config_values_name_the_file(attn, model_copy):
    """A value in generation_config.json that no flag overrides and that is no number or out of range: exit 1 naming
    the file and its key (not a flag the user never gave, not an internal error); a flag that overrides it wins."""
    cases = {'{"top_p": 2, "do_sample": true}': "top_p must be in (0, 1] (got 2.0)", '{"temperature": "hot"}': "temperature must be a number (got 'hot')",
             '{"top_k": -3, "do_sample": true}': "top_k must be >= 0 (got -3)", '{"repetition_penalty": 0}': "repetition_penalty must be > 0 and finite (got 0.0)"}
    for text, said in cases.items():
        (model_copy / "generation_config.json").write_text(text)
        one_line_error(attn(["generate", "-m", str(model_copy), "--raw", "-n", "2", "hi"]), 1, f"generation_config.json: {said}")
    (model_copy / "generation_config.json").write_text('{"top_p": 2, "do_sample": true}')
    assert attn(["generate", "-m", str(model_copy), "--raw", "-n", "2", "--top-p", "0.9", "hi"]).code == 0


def test_non_finite_attention_is_one_error_line(attn, model_copy, tmp_path):
    """Weights that make a layer's attention NaN: inspect, explain and explore say so (exit 1) instead of writing
    NaN into JSON (which is then not JSON) or failing inside the table."""
    def poison(t):
        w = t["model.layers.1.self_attn.q_proj.weight"]
        t["model.layers.1.self_attn.q_proj.weight"] = torch.full_like(w, float("inf"))
    rewrite(model_copy, poison)
    for args in (["inspect", "--format", "json"], ["inspect", "--format", "table"], ["inspect", "--format", "csv"],
                 ["explain", "-l", "1", "--head", "0", "--format", "json"], ["explore", "-o", str(tmp_path / "p.html")]):
        one_line_error(attn([args[0], "-m", str(model_copy), "--raw", "the cat sat", *args[1:]]), 1, "layer 1's attention is NaN/inf")
    assert not (tmp_path / "p.html").exists()
    r = attn(["inspect", "-m", str(model_copy), "--raw", "the cat sat", "-l", "0", "--format", "json"])  # layer 0 is sound
    assert r.code == 0 and json.loads(r.out)["heads"], r


def test_cuda_out_of_memory_is_one_line_with_hint(attn, tiny_llama, monkeypatch):
    import cli.models

    def boom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(cli.models, "load_model", boom)
    one_line_error(gen(attn, tiny_llama), 1, "out of memory", "GiB", "--dtype", "--device cpu")


def test_cpu_allocator_failure_and_non_finite_logits_in_bench_are_one_line(attn, tiny_llama, model_copy, monkeypatch):
    """torch's CPU allocator raises a RuntimeError (not MemoryError) when it cannot allocate: a batch or a bench row too
    big for memory ends in one line; `bench` on NaN logits words them as generate does."""
    import cli.batch

    def boom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 12884901888 bytes.")

    with monkeypatch.context() as patched:
        patched.setattr(cli.batch, "run_batch", boom)
        r = attn(["batch", "-m", str(tiny_llama), "--raw", "-n", "2", "-"], stdin=b'{"prompt": "hi"}\n')
    one_line_error(r, 1, "out of memory; try fewer rows at once")
    rewrite(model_copy, lambda t: t.__setitem__("model.norm.weight", torch.full((64,), float("inf"))))
    one_line_error(attn(["bench", "-m", str(model_copy), "-p", "4", "-n", "2", "-r", "1", "--no-quality"]), 1, "NaN/inf logits", "try --dtype float32")


# --- soak -------------------------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
def test_soak_200_generations_no_growth(tiny_llama):
    model = load_model(tiny_llama)
    tok = Tokenizer(tiny_llama)
    rng = random.Random(0)

    def one(i: int) -> None:
        s = SamplingSettings(
            temperature=rng.choice([0, 0.7, 1.0, 1.5]), top_k=rng.choice([0, 5, 50]), top_p=rng.uniform(0.5, 1.0),
            min_p=rng.choice([0, 0.05]), repeat_penalty=rng.choice([1.0, 1.2]),
        )
        ids = tok.encode("soak test prompt number " + str(i))
        stream = tok.stream(ids)
        for step in generate(model, ids, rng.randint(1, 12), s, torch.Generator().manual_seed(i)):
            stream.push(step.id)

    for i in range(20):  # warm-up: allocator pools and caches settle
        one(i)
    gc.collect()
    rss0, fds0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _open_fds()
    cur0 = _current_rss()
    for i in range(20, 220):
        one(i)
    gc.collect()
    assert _current_rss() <= cur0 * 1.10
    assert _open_fds() <= fds0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss <= rss0 * 1.10


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_picture_path_under_a_file_is_one_error_line(attn, tiny_llama, tmp_path):
    (tmp_path / "afile").write_text("")
    for command in ("inspect", "heads", "explore"):
        out = tmp_path / "afile" / "x.html"
        one_line_error(attn([command, "-m", str(tiny_llama), "--raw", "the cat sat", "-o", str(out)]), 1, f"cannot write {out}: Not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
