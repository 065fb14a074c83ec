"""`attn batch` as a user meets it: records against `attn generate` alone, error records, order,
exit codes, and Ctrl-C / a closed pipe in a subprocess."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tests.test_generate_cli import slow_model, spawn  # noqa: F401  (slow_model is a fixture)

PROMPTS = ["hello world", "a fluffy blue creature roamed the verdant forest", "def main():", "Café naïve", "Summarize: attention lets", "hi"]


def jsonl(*objs) -> bytes:
    return "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs).encode()


def records(out: str) -> list[dict]:
    assert out == "" or out.endswith("\n")
    return [json.loads(line) for line in out.splitlines()]


def alone(attn, model, prompt: str, *flags: str) -> dict:
    r = attn(["generate", "-m", str(model), "--json", *flags, prompt])
    assert r.code == 0, r
    return json.loads(r.out)


def test_greedy_texts_equal_generate_alone(attn, tiny_llama):
    """More prompts than rows (refills), rows ending at different steps (EOS off, different -n)."""
    reqs = [{"id": f"p{i}", "prompt": p, "max_tokens": 4 + 3 * i} for i, p in enumerate(PROMPTS)]
    r = attn(["batch", "-m", str(tiny_llama), "--raw", "--temp", "0", "--ignore-eos", "--parallel", "3"], stdin=jsonl(*reqs))
    assert r.code == 0, r
    got = records(r.out)
    assert [g["id"] for g in got] == [q["id"] for q in reqs] and [g["line"] for g in got] == list(range(1, 7))
    for g, q in zip(got, reqs):
        ref = alone(attn, tiny_llama, q["prompt"], "--raw", "--temp", "0", "--ignore-eos", "-n", str(q["max_tokens"]))
        assert g["text"] == ref["text"] and g["finish_reason"] == "length"
        assert g["usage"] == ref["usage"]


def test_lines_chat_and_eos_as_generate(attn, tiny_llama):
    text = "\n".join(["hello world", "", "   ", "def main():", "hi"]) + "\n"
    r = attn(["batch", "-m", str(tiny_llama), "--lines", "--temp", "0", "-n", "12", "-"], stdin=text.encode())
    assert r.code == 0, r
    got = records(r.out)
    assert [g["id"] for g in got] == [g["line"] for g in got] == [1, 4, 5]  # blank lines skipped, ids are line numbers
    for g, p in zip(got, ["hello world", "def main():", "hi"]):
        ref = alone(attn, tiny_llama, p, "--temp", "0", "-n", "12")  # chat template on by default, EOS on
        assert (g["text"], g["finish_reason"], g["usage"]) == (ref["text"], ref["finish_reason"], ref["usage"])


def test_per_request_settings_seeds_and_stops(attn, tiny_llama):
    """Each request's own sampling settings, seed and stop strings give what `generate` gives with them."""
    plain = alone(attn, tiny_llama, "hello world", "--raw", "--temp", "0", "-n", "20", "--ignore-eos")["text"]
    stop = plain[6:9]
    reqs = [
        {"id": 1, "prompt": "hello world", "temperature": 1.0, "seed": 11, "max_tokens": 15},
        {"id": 2, "prompt": "hello world", "temperature": 0.8, "top_k": 5, "seed": 12, "max_tokens": 9},
        {"id": 3, "prompt": "hello world", "stop": [stop], "max_tokens": 20},
        {"id": 4, "prompt": "def main():", "temperature": 1.2, "top_p": 0.9, "min_p": 0.05, "seed": 13, "max_tokens": 12},
        {"id": 5, "prompt": "hello world", "temperature": 1.0, "seed": 11, "max_tokens": 15},
    ]
    r = attn(["batch", "-m", str(tiny_llama), "--raw", "--temp", "0", "--ignore-eos", "--parallel", "2"], stdin=jsonl(*reqs))
    assert r.code == 0, r
    got = {g["id"]: g for g in records(r.out)}
    for q in reqs:
        flags = ["--raw", "--ignore-eos", "-n", str(q["max_tokens"]), "--temp", str(q.get("temperature", 0))]
        for key, flag in (("top_k", "--top-k"), ("top_p", "--top-p"), ("min_p", "--min-p"), ("seed", "--seed")):
            if key in q:
                flags += [flag, str(q[key])]
        for s in q.get("stop", []):
            flags += ["--stop", s]
        ref = alone(attn, tiny_llama, q["prompt"], *flags)
        assert got[q["id"]]["text"] == ref["text"], q
        assert got[q["id"]]["finish_reason"] == ref["finish_reason"]
    assert got[3]["finish_reason"] == "stop" and got[3]["text"] == plain[: plain.index(stop)]
    assert got[1]["text"] == got[5]["text"] and got[1]["seed"] == 11


def test_bad_lines_give_error_records_and_exit_1(attn, tiny_llama):
    lines = [
        {"id": "ok1", "prompt": "hello world"},
        "not json",
        "[1, 2]",
        {"id": "typo", "prompt": "hi", "temprature": 0.5},
        {"id": "both", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]},
        {"id": "neg", "prompt": "hi", "temperature": -1},
        {"id": "topp", "prompt": "hi", "top_p": 0},
        {"id": "n0", "prompt": "hi", "max_tokens": 0},
        {"id": "long", "prompt": "word " * 300},
        {"id": "empty", "prompt": ""},
        {"id": "ok2", "messages": [{"role": "user", "content": "hi"}]},
    ]
    r = attn(["batch", "-m", str(tiny_llama), "--temp", "0", "-n", "5"], stdin=jsonl(*lines))
    assert r.code == 1, r
    got = records(r.out)
    assert [g["line"] for g in got] == list(range(1, 12))  # every line has its record, in input order
    errors = {g["id"]: g["error"] for g in got if "error" in g}
    assert set(errors) == {2, 3, "typo", "both", "neg", "topp", "n0", "long", "empty"}
    assert "not valid JSON" in errors[2] and "JSON object" in errors[3] and "'temprature'" in errors["typo"]
    assert "'temperature' must be a number >= 0" in errors["neg"] and "exceeds the context" in errors["long"]
    assert {"text", "finish_reason", "usage", "seed"} <= set(got[0]) and {"text", "usage"} <= set(got[-1])
    assert r.err == ""
    r = attn(["batch", "-m", str(tiny_llama), "--temp", "0", "-n", "5", "--truncate", "left"], stdin=jsonl(lines[8]))
    assert r.code == 0 and records(r.out)[0]["usage"]["prompt_tokens"] == 256 - 5 and "truncated" in r.err


def test_order_completion_and_logprobs(attn, tiny_llama):
    reqs = [{"id": i, "prompt": p, "max_tokens": n} for i, (p, n) in enumerate(zip(PROMPTS, [30, 2, 20, 1, 9, 3]))]
    base = ["batch", "-m", str(tiny_llama), "--raw", "--temp", "0", "--ignore-eos", "--parallel", "6"]
    r = attn(base + ["--order", "completion", "--logprobs", "2"], stdin=jsonl(*reqs))
    assert r.code == 0, r
    got = records(r.out)
    assert sorted(g["id"] for g in got) == list(range(6))
    assert [g["id"] for g in got][:2] == [3, 1]  # the shortest finish first
    for g in got:
        assert len(g["logprobs"]) == g["usage"]["completion_tokens"]
        assert all(len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["id"] == e["id"] for e in g["logprobs"])
    ordered = records(attn(base, stdin=jsonl(*reqs)).out)
    assert [g["id"] for g in ordered] == list(range(6))
    assert {g["id"]: g["text"] for g in ordered} == {g["id"]: g["text"] for g in got}


def test_usage_errors_exit_2(attn, tiny_llama):
    r = attn(["batch", "-m", str(tiny_llama)], tty=True)
    assert r.code == 2 and "no input" in r.err and r.out == ""
    r = attn(["batch", "-m", str(tiny_llama), "--parallel", "0"], stdin=b"{}")
    assert r.code == 2 and r.err.startswith("attn: error: ")
    r = attn(["batch", "-m", str(tiny_llama), "--order", "random"], stdin=b"{}")
    assert r.code == 2


def test_no_chat_template_is_an_error_record_for_messages(attn, tmp_path, tokenizer_json):
    from tests.conftest import save_model

    save_model("llama", tmp_path, tokenizer_json, chat=False)
    reqs = [{"id": "m", "messages": [{"role": "user", "content": "hi"}]}, {"id": "p", "prompt": "hi"}]
    r = attn(["batch", "-m", str(tmp_path), "-n", "3"], stdin=jsonl(*reqs))
    got = records(r.out)
    assert r.code == 1 and "chat template" in got[0]["error"] and "text" in got[1]


def test_records_held_back_are_written_on_interruption():
    from cli.batch import Order, Records

    written = []
    rec = Records(Order.input, 4)
    rec._write = written.append
    rec.done(2, {"id": 2})
    rec.done(0, {"id": 0})
    assert written == [{"id": 0}]
    rec.done(3, {"id": 3})
    rec.flush_finished()  # 1 never finished: 2 and 3 still come out, in order
    assert written == [{"id": 0}, {"id": 2}, {"id": 3}]


# --- the installed command in a subprocess: Ctrl-C and a closed pipe ---------------------------


def test_requests_that_are_not_strict_json_or_text_are_error_records(attn, tiny_llama):
    """A lone UTF-16 surrogate escape, NaN or Infinity (Python's json takes them, and would write them back): one
    error record each, and the others still run; a byte-order mark does not spoil line 1."""
    text = "\ufeff" + "\n".join([
        '{"id": "a", "prompt": "hi", "max_tokens": 2}',
        '{"id": "sur", "prompt": "h\\udc00i", "max_tokens": 2}',
        '{"id": "\\ud800", "prompt": "hi", "max_tokens": 2}',
        '{"id": NaN, "prompt": "hi"}',
        '{"id": "inf", "prompt": "hi", "temperature": 1e400}',
        '{"id": "long", "prompt": "hi", "max_tokens": 1000000}',
        '{"id": "d", "prompt": "hi", "max_tokens": 2}',
    ]) + "\n"
    r = attn(["batch", "-m", str(tiny_llama), "--raw", "--temp", "0", "-"], stdin=text.encode())
    assert r.code == 1 and r.err == "", r
    def strict(name):
        raise AssertionError(f"{name} in the output: not JSON")

    got = [json.loads(line, parse_constant=strict) for line in r.out.splitlines()]
    assert [g["line"] for g in got] == list(range(1, 8))
    assert "text" in got[0] and "text" in got[6]
    assert "surrogate" in got[1]["error"] and "surrogate" in got[2]["error"] and got[2]["id"] == 3  # (its id is no text: the line)
    assert "NaN is not a JSON value" in got[3]["error"] and "'temperature' must be a number >= 0" in got[4]["error"]
    assert "max_tokens (1000000) exceeds the context" in got[5]["error"] and "--max-tokens" not in got[5]["error"]


def test_stats_are_written_when_interrupted(slow_model, tmp_path):  # noqa: F811
    reqs = [{"id": 1, "prompt": "hello", "max_tokens": 2}, {"id": 2, "prompt": "yo", "max_tokens": 15000}]
    (tmp_path / "in.jsonl").write_bytes(jsonl(*reqs))
    p = spawn(["batch", "--raw", "-m", str(slow_model), "--ignore-eos", "--stats", "--parallel", "2", "--order", "completion", str(tmp_path / "in.jsonl")],
              stdin=subprocess.DEVNULL)
    first = p.stdout.readline()  # request 1 has finished
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and json.loads(first)["id"] == 1, err
    assert "1 of 2 written, interrupted" in err.decode() and "tok/s overall" in err.decode()


def test_sigint_keeps_finished_records_whole_and_exits_130(slow_model, tmp_path):  # noqa: F811
    reqs = [{"id": 1, "prompt": "hello", "max_tokens": 2}, {"id": 2, "prompt": "hi", "max_tokens": 2},
            {"id": 3, "prompt": "hello there", "max_tokens": 15000}, {"id": 4, "prompt": "yo", "max_tokens": 15000}]
    (tmp_path / "in.jsonl").write_bytes(jsonl(*reqs))
    p = spawn(["batch", "--raw", "-m", str(slow_model), "--ignore-eos", "--parallel", "4", "--order", "completion", str(tmp_path / "in.jsonl")],
              stdin=subprocess.DEVNULL)
    first = p.stdout.readline()  # a request has finished
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert b"Traceback" not in err and b"Aborted" not in err
    got = records((first + out).decode())
    assert got[0]["id"] == 1 and {g["id"] for g in got} <= {1, 2}  # finished ones, whole; the long ones left out
    assert all(g["finish_reason"] == "length" for g in got)


def test_closed_pipe_exits_141_silently(slow_model, tmp_path):  # noqa: F811
    """More records than the pipe holds: once the reader is gone, the next write ends the run, quietly."""
    (tmp_path / "in.jsonl").write_bytes(jsonl(*[{"id": i, "prompt": "hello", "max_tokens": 1} for i in range(1000)]))
    p = spawn(["batch", "--raw", "-m", str(slow_model), "--parallel", "8", str(tmp_path / "in.jsonl")], stdin=subprocess.DEVNULL)
    assert json.loads(p.stdout.readline())["id"] == 0
    p.stdout.close()  # like `| head -1`
    code = p.wait(timeout=60)
    err = p.stderr.read().decode()
    assert code == 141 and err == ""


def test_sigterm_exits_143_with_nothing_half_written(slow_model, tmp_path):  # noqa: F811
    (tmp_path / "in.txt").write_bytes(b"hello\nthere\n")
    p = spawn(["batch", "--raw", "-m", str(slow_model), "--lines", "--ignore-eos", "-n", "15000", str(tmp_path / "in.txt")], stdin=subprocess.DEVNULL)
    time.sleep(4)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert out == b"" and b"Traceback" not in err


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_rows_decode_as_alone(attn, tiny_llama, quant):
    """The quantized kernels take several rows at once: each row's greedy text is the one it has alone."""
    reqs = [{"id": i, "prompt": p, "max_tokens": 10} for i, p in enumerate(PROMPTS[:4])]
    r = attn(["batch", "-m", str(tiny_llama), "--raw", "--temp", "0", "--ignore-eos", "--quantize", quant], stdin=jsonl(*reqs))
    assert r.code == 0, r
    for g, q in zip(records(r.out), reqs):
        ref = alone(attn, tiny_llama, q["prompt"], "--raw", "--temp", "0", "--ignore-eos", "-n", "10", "--quantize", quant)
        assert g["text"] == ref["text"], q


def test_progress_bar_only_on_a_terminal(monkeypatch):
    """Requests done and tok/s drawn on stderr when it is a terminal; nothing at all otherwise."""
    import io
    import sys

    from cli.batch import Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    with Progress(3, 1, enabled=sys.stderr.isatty(), color=False) as bar:
        bar.advance(40)
        bar.bar.refresh()
        drawn = err.getvalue()
    assert "requests" in drawn and "2/3" in drawn and "tok/s" in drawn
    plain = io.StringIO()
    monkeypatch.setattr(sys, "stderr", plain)
    with Progress(3, 0, enabled=sys.stderr.isatty(), color=False) as bar:
        bar.advance(40)
    assert plain.getvalue() == ""
