"""`attn inspect` as a user meets it: the JSON/CSV contract, selection and its errors, the table
under NO_COLOR on 40 columns, the pictures, --generate through the KV cache, and the real model."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import xml.etree.ElementTree as ET

import pytest
import torch

from cli.common import DEMO_SENTENCE
from cli.render import table, to_json
from model.tokenizer import Tokenizer

SENTENCE = "a fluffy blue creature roamed the verdant forest"


def no_constants(name: str):
    raise AssertionError(f"JSON holds {name}")


def inspect_json(attn, path, *args: str, err: str = "") -> dict:
    r = attn(["inspect", "-m", str(path), *args])
    assert r.code == 0, r
    assert r.err.startswith(err) and (err or r.err == "")
    return json.loads(r.out, parse_constant=no_constants)


def hf_attentions(hf, ids: list[int]):
    with torch.no_grad():
        return hf(torch.tensor([ids]), output_attentions=True).attentions


def check_contract(d: dict) -> None:
    """The object docs/cli.md promises, with plain finite floats."""
    assert {"model", "tokens", "query", "direction", "values", "positions", "heads"} <= d.keys()
    assert isinstance(d["model"], str)
    for i, t in enumerate(d["tokens"]):
        assert t.keys() >= {"index", "id", "text"} and t["index"] == i
        assert isinstance(t["id"], int) and isinstance(t["text"], str)
    assert d["query"] == {"index": d["query"]["index"], "text": d["tokens"][d["query"]["index"]]["text"]}
    assert d["direction"] in ("from", "to") and d["values"] in ("weights", "scores", "value-norms")
    assert all(isinstance(p, int) and 0 <= p < len(d["tokens"]) for p in d["positions"])
    assert isinstance(d["renormalized"], bool)
    for h in d["heads"]:
        assert {"layer", "head", "kv_head", "values", "first_token_share"} <= h.keys()
        assert len(h["values"]) == len(d["positions"])
        assert all(type(x) is float and math.isfinite(x) for x in h["values"])
        assert 0.0 <= h["first_token_share"] <= 1.0


# --- JSON and CSV -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_json_is_the_contract_and_matches_transformers(attn, tiny_models, kind):
    path, hf = tiny_models[kind]
    d = inspect_json(attn, path, SENTENCE)
    check_contract(d)
    ids = [t["id"] for t in d["tokens"]]
    assert ids == Tokenizer(path).encode(SENTENCE)
    q = len(ids) - 1
    assert d["query"]["index"] == q and d["direction"] == "from" and d["values"] == "weights"
    assert d["positions"] == list(range(q + 1))
    ref = hf_attentions(hf, ids)
    H, G = hf.config.num_attention_heads, getattr(hf.config, "num_key_value_heads", hf.config.num_attention_heads)
    assert [(h["layer"], h["head"]) for h in d["heads"]] == [(l, h) for l in range(len(ref)) for h in range(H)]
    for h in d["heads"]:
        assert h["kv_head"] == h["head"] // (H // G)
        want = ref[h["layer"]][0, h["head"], q, : q + 1]
        assert (torch.tensor(h["values"]) - want).abs().max().item() <= 1e-5
        assert abs(sum(h["values"]) - 1.0) <= 1e-5
        assert h["first_token_share"] == pytest.approx(h["values"][0], abs=1e-7)


def test_scores_and_value_norms_are_finite_json(attn, tiny_llama):
    for view in ("scores", "value-norms"):
        for direction in ("from", "to"):
            d = inspect_json(attn, tiny_llama, SENTENCE, "--values", view, "--direction", direction, "-t", "3")
            check_contract(d)
            assert d["values"] == view and d["direction"] == direction
            assert d["positions"] == (list(range(4)) if direction == "from" else list(range(3, len(d["tokens"]))))


def test_direction_to_is_the_column(attn, tiny_models):
    path, hf = tiny_models["qwen2"]
    d = inspect_json(attn, path, SENTENCE, "--direction", "to", "-t", "2")
    ids = [t["id"] for t in d["tokens"]]
    ref = hf_attentions(hf, ids)
    assert d["positions"] == list(range(2, len(ids)))
    for h in d["heads"]:
        want = ref[h["layer"]][0, h["head"], 2:, 2]
        assert (torch.tensor(h["values"]) - want).abs().max().item() <= 1e-5


def test_csv_parses_and_agrees_with_json(attn, tiny_llama):
    args = ["inspect", "-m", str(tiny_llama), SENTENCE, "-t", "creature", "-l", "1", "-q"]
    r = attn(args + ["--format", "csv"])
    assert r.code == 0 and r.err == "", r
    rows = list(csv.reader(io.StringIO(r.out)))
    assert rows[0] == ["layer", "head", "kv_head", "query", "position", "token", "value"]
    d = json.loads(attn(args + ["--format", "json"]).out)
    assert len(rows) - 1 == len(d["heads"]) * len(d["positions"])
    by_key = {(int(r[0]), int(r[1]), int(r[4])): (int(r[2]), int(r[3]), r[5], float(r[6])) for r in rows[1:]}
    for h in d["heads"]:
        for p, x in zip(d["positions"], h["values"]):
            assert by_key[(h["layer"], h["head"], p)] == (h["kv_head"], d["query"]["index"], d["tokens"][p]["text"], x)


# --- selection and its errors ----------------------------------------------------------------------


def test_token_by_index_negative_text_and_occurrence(attn, tiny_llama):
    text = "so the cat saw the dog and the bird"
    d = inspect_json(attn, tiny_llama, text, "-t", "0", "-l", "0")
    labels = [t["text"] for t in d["tokens"]]
    assert d["query"]["index"] == 0 and d["positions"] == [0]
    assert inspect_json(attn, tiny_llama, text, "-t", "-2", "-l", "0")["query"]["index"] == len(labels) - 2
    the = [i for i, s in enumerate(labels) if s.strip() == "the"]
    assert len(the) == 3
    several = f"attn: --token 'the' occurs 3 times ({the[0]}:␣the {the[1]}:␣the {the[2]}:␣the): using the first; --occurrence N picks another\n"
    assert inspect_json(attn, tiny_llama, text, "-t", "the", "-l", "0", err=several)["query"]["index"] == the[0]
    assert inspect_json(attn, tiny_llama, text, "-t", "the", "--occurrence", "2", "-l", "0")["query"]["index"] == the[1]
    assert inspect_json(attn, tiny_llama, text, "-t", "the", "--occurrence", "-1", "-l", "0")["query"]["index"] == the[2]
    assert inspect_json(attn, tiny_llama, text, "-t", "THE", "-l", "0", "-q")["query"]["index"] == the[0]  # case only as a fallback


def test_one_matching_rule_for_token_occurrence_and_find():
    from cli.tokens import find_positions, match_text, pick_token

    words = [b"the", b" cat", b" saw", b" the", b" dog"]
    assert match_text(words, "the").spans == [[0], [3]]  # with and without the leading space
    assert match_text(words, " the").spans == [[0], [3]]
    assert pick_token(words, "the", 2) == (3, None)
    q, said = pick_token(words, "the", None)
    assert q == 0 and said == "--token 'the' occurs 2 times (0:the 3:␣the): using the first; --occurrence N picks another"
    assert find_positions(words, "the", 4, "from") == ([0, 3], "--find 'the' matches 2 tokens: 0:the 3:␣the")
    assert pick_token(words, "THE", -1) == (3, "--token 'THE' matches 3:␣the ignoring case")
    split = [b"a", b" ver", b"d", b"ant", b" forest"]
    m = match_text(split, "verdant")
    assert (m.spans, m.how) == ([[1, 2, 3]], "part")
    assert pick_token(split, "verdant", None) == (3, "--token 'verdant' is split into 1:␣ver 2:d 3:ant: using its last piece, 3:ant")
    assert pick_token([b"a", b" fluffy"], "fluff", None) == (1, "--token 'fluff' is part of token 1:␣fluffy")
    assert find_positions(split, "verdant", 4, "from")[0] == [1, 2, 3]
    # Bytes, not text: a character split over two tokens is still found.
    cjk = ["我们".encode()[:2], "我们".encode()[2:], b"!"]
    assert match_text(cjk, "我").spans == [[0, 1]]


def test_token_notes_go_to_stderr_only(attn, tiny_llama):
    text = "so the cat saw the dog"
    r = attn(["inspect", "-m", str(tiny_llama), text, "-t", "the", "-l", "0", "--format", "json"])
    assert r.code == 0 and json.loads(r.out)["query"]["text"] == " the"
    assert r.err == "attn: --token 'the' occurs 2 times (2:␣the 10:␣the): using the first; --occurrence N picks another\n"
    r = attn(["inspect", "-m", str(tiny_llama), text, "-t", "the", "-l", "0", "--format", "json", "-q"])
    assert r.code == 0 and r.err == ""
    r = attn(["explain", "-m", str(tiny_llama), text, "-t", "the", "--occurrence", "-1", "-l", "0", "--head", "0", "--format", "json"])
    assert r.code == 0 and r.err == "" and json.loads(r.out)["query"]["index"] == 10


def test_tokens_are_labelled_by_one_rule_in_every_command(attn, tiny_llama):
    """Text is UTF-8 with a piece of a character as <0xE6> (never U+FFFD), JSON adds the raw bytes; tables show ␣."""
    text = "我们 café 😀"
    outs = {}
    for cmd in ("inspect", "explain", "heads"):
        extra = ["--layer", "0", "--head", "0"] if cmd == "explain" else []
        r = attn([cmd, "-m", str(tiny_llama), text, *extra, "--format", "json", "-q"])
        assert r.code == 0 and r.err == "", r
        assert "\ufffd" not in r.out
        outs[cmd] = json.loads(r.out)["tokens"]
    assert outs["inspect"] == outs["explain"] == outs["heads"]
    toks = outs["inspect"]
    assert b"".join(bytes(t["bytes"]) for t in toks) == text.encode()
    assert toks[0]["text"] == "<0xE6><0x88>" and toks[1]["text"] == "<0x91>"  # 我 = E6 88 91, split in two
    for t in toks:
        assert t["text"] == bytes(t["bytes"]).decode("utf-8", "backslashreplace") or "<0x" in t["text"]
    r = attn(["explain", "-m", str(tiny_llama), SENTENCE, "-t", "-1", "-l", "0", "--head", "0", "--format", "table"], env={"NO_COLOR": "1"})
    assert r.code == 0 and "␣f" in r.out and "' f" not in r.out and '"t" (token 22)' in r.out


def test_layer_and_head_selection_negative_and_repeated(attn, tiny_llama):
    d = inspect_json(attn, tiny_llama, SENTENCE, "-l", "-1", "--head", "3", "--head", "-4", "--head", "3")
    assert [(h["layer"], h["head"], h["kv_head"]) for h in d["heads"]] == [(1, 0, 0), (1, 3, 1)]


def one_error_line(r, code: int, *needles: str) -> None:
    assert r.code == code, r
    assert r.out == ""
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attn: error: "), r.err
    for n in needles:
        assert n in lines[0], lines[0]


def test_selection_errors_are_one_line_exit_2(attn, tiny_llama):
    base = ["inspect", "-m", str(tiny_llama), SENTENCE]
    r = attn(base + ["-t", "zebra"])
    one_error_line(r, 2, "zebra", "0:a", "1:␣f")  # the tokens, with their indices
    one_error_line(attn(base + ["-l", "2"]), 2, "--layer 2", "0..1")
    one_error_line(attn(base + ["-l", "-3"]), 2, "-2..-1")
    one_error_line(attn(base + ["--head", "4"]), 2, "--head 4", "0..3")
    one_error_line(attn(base + ["-t", "99"]), 2, "--token 99", "0..")
    one_error_line(attn(base + ["-t", "creature", "--occurrence", "2"]), 2, "--occurrence must be 1..1")
    one_error_line(attn(base + ["-t", "0", "--skip-first"]), 2, "--skip-first")
    one_error_line(attn(base + ["-t", "blue", "--find", "forest"]), 2, "after the chosen token")
    one_error_line(attn(base + ["-o", "x.png"]), 2, ".html or .svg")


# --- views ---------------------------------------------------------------------------------------


def test_skip_first_renormalises_and_keeps_the_raw_share(attn, tiny_llama):
    raw = inspect_json(attn, tiny_llama, SENTENCE, "-t", "creature", "-q")
    d = inspect_json(attn, tiny_llama, SENTENCE, "-t", "creature", "--skip-first", "-q")
    assert d["skip_first"] is True and d["renormalized"] is True and raw["renormalized"] is False
    assert d["positions"] == raw["positions"][1:]
    for h, r in zip(d["heads"], raw["heads"]):
        assert h["first_token_share"] == r["first_token_share"] == r["values"][0]
        assert abs(sum(h["values"]) - 1.0) <= 1e-6 and max(h["values"]) <= 1.0
        rest = sum(r["values"][1:])
        assert h["values"] == pytest.approx([x / rest for x in r["values"][1:]], rel=1e-5)
        assert h["sink_only"] is False  # the tiny random model has no sinks
    for direction, token in (("to", "2"), ("from", "-1")):
        for view in ("weights", "value-norms"):
            d = inspect_json(attn, tiny_llama, SENTENCE, "-t", token, "--skip-first", "--direction", direction, "--values", view, "-q")
            assert all(x <= 1.0 for h in d["heads"] for x in h["values"]) or view == "value-norms"


def crafted_view(first: list[float], find: str | None = None):
    """build_view over a hand-made capture: one query row per head, weights in float32 as the probe keeps them."""
    from types import SimpleNamespace

    from cli.inspect import build_view
    from model.probe import Capture, LayerCapture

    rows = [[f, *[(1 - f) * s for s in (0.9, 0.05, 0.05)]] for f in first]  # the rest split 90/5/5 over tokens 1..3
    w = torch.tensor(rows, dtype=torch.float32)
    w[0] = torch.tensor([1 - 1e-7, 9e-8, 5e-9, 5e-9])  # a sink that leaves 1e-7 for the rest: 1 − sink is noise in float32
    lc = LayerCapture(w, w, w[:, :1].expand_as(w), torch.zeros(4, dtype=torch.bool), w[:, 1:].double().sum(-1, keepdim=True).expand_as(w))
    heads = list(range(len(first)))
    cap = Capture(3, "from", "weights", heads, heads, [0, 1, 2, 3], {0: lc})
    labels = ["a", " b", " c", " d"]
    return build_view(SimpleNamespace(name="crafted", quantize="none"), [0, 1, 2, 3], labels, cap, True, find, [1] if find else [], 4, None)


def test_skip_first_on_crafted_sinks():
    """A sink at 1 − 1e-7: every renormalised row sums to 1 (within 1e-6), no weight exceeds 1, and the
    head is marked and ranked after the heads with real weight elsewhere, its raw share still shown."""
    v = crafted_view([0.0, 0.5, 0.999, 0.2])
    for r in v.rows:
        assert abs(sum(r.values) - 1.0) <= 1e-6 and max(r.values) <= 1.0, r
    assert [r.sink_only for r in sorted(v.rows, key=lambda r: r.head)] == [True, False, True, False]
    sink = next(r for r in v.rows if r.head == 0)
    assert sink.values[0] == pytest.approx(0.9, abs=1e-6) and sink.first_share == pytest.approx(1 - 1e-7, abs=1e-7)
    ranked = crafted_view([0.0, 0.5, 0.999, 0.2], find="b")
    order = [r.head for r in ranked.rows]
    assert set(order[:2]) == {1, 3} and set(order[2:]) == {0, 2}  # all four give ≈ 0.9 to " b": the two sink heads go last
    doc = json.loads(to_json(ranked))
    assert [h["sink_only"] for h in doc["heads"]] == [False, False, True, True]
    out = table(ranked, 80, False, 10)
    assert "* 2 heads put under 1% of their weight off the first token" in out and "ranked last" in out


def test_find_ranks_heads_by_weight_on_the_matching_tokens(attn, tiny_llama):
    split = "attn: --token 'creature' is split into 9:cre 10:at 11:ure: using its last piece, 11:ure\nattn: --find 'blue' is found in 3 tokens: 5:␣b 6:lu 7:e\n"
    d = inspect_json(attn, tiny_llama, SENTENCE, "-t", "creature", "--find", "blue", err=split)
    labels = [t["text"] for t in d["tokens"]]
    assert "".join(labels[d["query"]["index"] - 3 : d["query"]["index"] + 1]) == " creature"  # a word in pieces: its last
    # The tiny tokenizer spells " blue" in pieces: --find takes every piece of the word.
    assert d["find"]["text"] == "blue" and "".join(labels[p] for p in d["find"]["positions"]) == " blue"
    js = [d["positions"].index(p) for p in d["find"]["positions"]]
    matches = [h["match"] for h in d["heads"]]
    assert matches == sorted(matches, reverse=True)
    assert all(h["match"] == pytest.approx(sum(h["values"][j] for j in js)) for h in d["heads"])
    table = attn(["inspect", "-m", str(tiny_llama), SENTENCE, "-t", "creature", "--find", "blue", "--format", "table"], env={"NO_COLOR": "1"})
    assert table.code == 0 and "ranked" in table.out


def test_top_means_the_same_in_every_format_and_0_means_all(attn, tiny_llama, tmp_path):
    """An explicit --top K lists the same K in the table, JSON, CSV and the picture; --top 0 is all (as in heads)."""
    base = ["inspect", "-m", str(tiny_llama), SENTENCE, "-t", "-1", "-l", "1", "-q"]
    full = json.loads(attn(base + ["--format", "json"]).out)
    assert all("top" not in h for h in full["heads"])  # without --top: unchanged
    d = json.loads(attn(base + ["--top", "2", "--format", "json"]).out)
    for h, f in zip(d["heads"], full["heads"]):
        assert h["values"] == f["values"]
        ranked = sorted(range(len(f["values"])), key=lambda j: -f["values"][j])[:2]
        assert h["top"] == [full["positions"][j] for j in ranked]
    rows = list(csv.reader(io.StringIO(attn(base + ["--top", "2", "--format", "csv"]).out)))[1:]
    assert {(int(r[1]), int(r[4])) for r in rows} == {(h["head"], p) for h in d["heads"] for p in h["top"]}
    all_json = json.loads(attn(base + ["--top", "0", "--format", "json"]).out)
    assert all(len(h["top"]) == len(full["positions"]) for h in all_json["heads"])
    table = attn(base + ["--top", "0", "--format", "table"], env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert table.code == 0 and "all sources" in table.out and "top 0" not in table.out
    find = base + ["--find", "blue"]
    ranked = json.loads(attn(find + ["--format", "json"]).out)["heads"]
    two = json.loads(attn(find + ["--top", "2", "--format", "json"]).out)["heads"]
    assert two == ranked[:2]
    assert {int(r[1]) for r in list(csv.reader(io.StringIO(attn(find + ["--top", "2", "--format", "csv"]).out)))[1:]} == {h["head"] for h in two}
    pic = tmp_path / "a.svg"
    assert attn(find + ["--top", "2", "-o", str(pic)]).code == 0
    assert set(re.findall(r"<title>layer (\d+) head (\d+) →", pic.read_text())) == {(str(h["layer"]), str(h["head"])) for h in two}
    assert attn(find + ["--top", "0", "--format", "json"]).out == attn(find + ["--format", "json"]).out


def test_demo_sentence_when_no_prompt_and_a_terminal(attn, tiny_llama):
    r = attn(["inspect", "-m", str(tiny_llama), "--head", "3"], tty=True)
    assert r.code == 0, r
    assert "demo sentence" in r.err
    d = json.loads(r.out)
    assert "".join(t["text"] for t in d["tokens"]) == DEMO_SENTENCE
    assert {h["head"] for h in d["heads"]} == {3} and len(d["heads"]) == 2  # every layer


def test_table_without_colour_fits_40_columns(attn, tiny_llama):
    r = attn(["inspect", "-m", str(tiny_llama), SENTENCE, "-t", "creature", "--format", "table", "--skip-first", "-q"], env={"NO_COLOR": "1", "COLUMNS": "40"})
    assert r.code == 0 and r.err == "", r
    d = inspect_json(attn, tiny_llama, SENTENCE, "-t", "creature", "-q")
    q = d["query"]["index"]
    assert "\x1b" not in r.out
    lines = r.out.splitlines()
    assert all(len(line) <= 40 for line in lines), [l for l in lines if len(l) > 40]
    assert f"[{q} {d['tokens'][q]['text']}]" in r.out and "renormalised" in r.out and "--format json" in r.out
    assert re.search(r"^ *1 +0 +0 ", r.out, re.M)  # layer 1, kv head 0, head 0 opens its group
    assert re.search(r"^ +1 ", r.out, re.M)  # head 1 shares kv head 0: no repeated group label


def test_table_of_a_long_prompt_is_windowed(attn, tiny_llama):
    long = " ".join(["the quick brown fox jumps over the lazy dog"] * 13)  # ≈ 250 tokens: within the 256 positions
    r = attn(["inspect", "-m", str(tiny_llama), long, "-t", "-1", "-l", "0", "--format", "table"], env={"NO_COLOR": "1", "COLUMNS": "80"})
    assert r.code == 0, r
    lines = r.out.splitlines()
    assert len(lines) < 30 and all(len(line) <= 80 for line in lines)
    assert "tokens …" in r.out and "max per" in r.out


def test_html_is_self_contained_and_svg_is_standalone(attn, tiny_llama, tmp_path):
    for name in ("a.html", "a.svg"):
        out = tmp_path / name
        r = attn(["inspect", "-m", str(tiny_llama), SENTENCE, "-t", "creature", "-o", str(out)])
        assert r.code == 0 and r.out == "", r
        assert name in r.err
        text = out.read_text(encoding="utf-8")
        for ref in ("http://", "https://", "//cdn", "<link", "<script src", "@import", "<img"):
            assert ref not in text.replace('xmlns="http://www.w3.org/2000/svg"', ""), ref
        assert "␣b" in text  # a token label, shown with its space made visible
    root = ET.parse(tmp_path / "a.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert (tmp_path / "a.html").read_text().startswith("<!doctype html>")


# --- generation: the KV-cache path -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generated_tokens_equal_one_full_pass(attn, tiny_models, kind):
    path, hf = tiny_models[kind]
    prompt = "the quick brown fox"
    n_prompt = len(Tokenizer(path).encode(prompt))
    for token, direction in (("-1", "from"), ("-3", "from"), (str(n_prompt + 1), "to"), ("1", "to")):
        d = inspect_json(attn, path, prompt, "--generate", "6", "--temp", "0", "--ignore-eos", "-t", token, "--direction", direction, err="attn: generated 6 tokens: ")
        assert d["generated"]["tokens"] == 6 and len(d["tokens"]) == n_prompt + 6
        ids = [t["id"] for t in d["tokens"]]
        ref = hf_attentions(hf, ids)
        q = d["query"]["index"]
        for h in d["heads"]:
            full = ref[h["layer"]][0, h["head"]]
            want = full[q, : q + 1] if direction == "from" else full[q:, q]
            assert (torch.tensor(h["values"]) - want).abs().max().item() <= 1e-5


# --- the real default model --------------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_has_a_blue_head(attn, real_model_dir):
    d = inspect_json(attn, real_model_dir, SENTENCE, "--token", "creature", "--find", "blue")
    assert d["query"]["text"] == " creature"
    assert [d["tokens"][p]["text"] for p in d["find"]["positions"]] == [" blue"]
    assert d["heads"][0]["match"] > 0.5
    r = attn(["inspect", "-m", str(real_model_dir), SENTENCE, "--token", "creature", "--find", "blue", "--format", "table"], env={"NO_COLOR": "1"})
    assert r.code == 0 and "2:␣blue" in r.out


@pytest.mark.slow
def test_real_model_finds_a_repeated_word_with_and_without_its_space(attn, real_model_dir):
    d = inspect_json(attn, real_model_dir, "the cat saw the dog", "--token", "the", "--occurrence", "2", "-l", "0")
    assert d["query"] == {"index": 3, "text": " the"} and d["tokens"][0]["text"] == "the"
    r = attn(["inspect", "-m", str(real_model_dir), SENTENCE, "--token", "verdant", "-l", "0", "--format", "json"])
    assert r.code == 0 and json.loads(r.out)["query"]["index"] == 8
    assert r.err == "attn: --token 'verdant' is split into 6:␣ver 7:d 8:ant: using its last piece, 8:ant\n"


@pytest.mark.slow
def test_real_model_skip_first_never_shows_a_weight_above_1(attn, real_model_dir):
    """The issue's command: layer 18 head 8 ranked first with 1:␣fluffy 1.40 (1 − sink in float32)."""
    args = [SENTENCE, "--token", "creature", "--find", "fluffy", "--skip-first"]
    d = inspect_json(attn, real_model_dir, *args)
    for h in d["heads"]:
        assert abs(sum(h["values"]) - 1.0) <= 1e-6 and max(h["values"]) <= 1.0, (h["layer"], h["head"])
    marked = [h["sink_only"] for h in d["heads"]]
    assert any(marked) and marked == sorted(marked)  # the sink heads, marked, all after the others
    assert 1 - d["heads"][0]["first_token_share"] >= 0.01
    r = attn(["inspect", "-m", str(real_model_dir), *args, "--top", "3", "--format", "table"], env={"NO_COLOR": "1", "COLUMNS": "100"})
    assert r.code == 0 and "1.40" not in r.out and "ranked last" in r.out
