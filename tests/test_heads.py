"""attn heads: measures equal those of transformers' attention; hand-built heads rank first; the command's outputs."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
import torch

from model.heads import detector_score, duplicate_pattern, head_patterns, head_stats, induction_pattern, induction_sequence
from model.loading import load_model
from tests.conftest import run_cli

PROMPT = "a fluffy blue creature roamed the verdant forest"
COLUMNS = ["layer", "head", "kv_head", "entropy", "distance", "first", "previous", "self", "previous_token", "duplicate_token", "induction"]


def random_ids(model, T: int, seed: int = 7) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.cfg.vocab_size, (T,), generator=g).tolist()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_measures_equal_those_of_transformers_attention(tiny_models, kind):
    path, hf = tiny_models[kind]
    model = load_model(path)
    ids = random_ids(model, 14)
    ids[9] = ids[3]  # one repeat, so the duplicate-token detector has rows
    got = head_patterns(model, ids)
    with torch.no_grad():
        att = torch.stack(hf(torch.tensor([ids]), output_attentions=True).attentions)[:, 0]  # (L, H, T, T)
    T = len(ids)
    rows = att[:, :, 1:]  # row 0 sees only itself: left out
    i = torch.arange(1, T)
    dist = (i[:, None] - torch.arange(T)[None, :]).clamp_min(0).float()
    ref = {
        "entropy": -(rows * torch.log2(rows.clamp_min(1e-30))).sum(-1).mean(-1),
        "distance": (rows * dist).sum(-1).mean(-1),
        "first": rows[..., 0].mean(-1),
        "previous": att[:, :, i[1:], i[1:] - 1].mean(-1),  # rows 2..: row 1's previous token is the first
        "self": att[:, :, i, i].mean(-1),
        "previous_token": att[:, :, i[1:], i[1:] - 1].sum(-1) / att[:, :, 2:, 1:].sum((-2, -1)),  # of what is off the first token
        "duplicate_token": att[:, :, 9, 3],  # the only row with an earlier copy
        "induction": att[:, :, 9, 4],  # ...whose follower is position 4
    }
    for name, want in ref.items():
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-5, msg=name)


def test_detection_patterns():
    ids = [5, 1, 2, 3, 1, 2, 3]
    dup = duplicate_pattern(ids)
    assert dup.nonzero().tolist() == [[4, 1], [5, 2], [6, 3]]
    assert induction_pattern(ids).nonzero().tolist() == [[4, 2], [5, 3], [6, 4]]
    w = torch.zeros(2, 7, 7)
    w[0, torch.arange(7), torch.arange(7)] = 1  # head 0 attends to itself
    w[1, 4, 2] = w[1, 5, 3] = w[1, 6, 4] = 1  # head 1 is a perfect induction head on the rows that count
    assert detector_score(w, induction_pattern(ids)).tolist() == [0.0, 1.0]
    assert detector_score(w, duplicate_pattern([1, 2, 3])) is None  # no repeats: the detector has nothing to score
    seq = induction_sequence(list(range(10, 60)), 8, seed=3, prefix=[0])
    assert seq[0] == 0 and seq[1:9] == seq[9:] and len(set(seq[1:9])) == 8


def hand_built(tiny_models, T: int):
    """Tiny gpt2 with token embeddings zeroed and layer 0's heads set by hand: head 1 attends to the previous
    token, head 2 to the first, head 3 half to each (all to the first in row 1, where they are one token)."""
    model = load_model(tiny_models["gpt2"][0])
    cfg = model.cfg
    H, D, C = cfg.n_heads, cfg.head_dim, cfg.dim
    beta = 30.0 * D**0.5  # scores of 30 after the 1/√D scale: softmax puts ~all weight on the chosen key
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied: the token embedding is zero, so layer 0 sees positions only
        attn = model.layers[0].attn
        X = model.layers[0].attn_norm(model.pos_emb.weight[:T])  # (T, C): what Wq, Wk read at each position
        pinv = torch.linalg.pinv(X)  # (C, T): X @ pinv = I, so x_i @ (pinv @ M) = row i of M
        shift = torch.diag(torch.ones(T - 1), -1)  # shift[i, i-1] = 1
        u = torch.zeros(D)
        u[0] = 1.0
        pad = lambda m: torch.nn.functional.pad(m, (0, D - m.shape[1]))  # (T, T') → (T, D)  # noqa: E731
        # Head 1: q_i = e_i, k_j = e_{j+1}, so q_i·k_j = 1 exactly when j = i − 1.
        q1, k1 = pad(torch.eye(T)), pad(shift.t().contiguous())
        # Head 2: every q_i = u, only k_0 = u: q_i·k_j = 1 exactly when j = 0.
        q2 = u.expand(T, D).clone()
        k2 = torch.zeros(T, D)
        k2[0] = u
        # Head 3: head 1's vectors plus one more dimension in which every q_i and only k_0 are 1:
        # q_i·k_j = [j = i − 1] + [j = 0], a tie between the previous and the first token from row 2 on.
        heads = {1: (q1, k1), 2: (q2, k2)}
        if T < D:  # room for the extra dimension
            extra = torch.zeros(T, D)
            extra[:, T] = 1.0
            k3 = k1.clone()
            k3[0, T] = 1.0
            heads[3] = (q1 + extra, k3)
        w, b = attn.qkv.weight, attn.qkv.bias
        for h, (qm, km) in heads.items():
            w[:, h * D : (h + 1) * D] = pinv @ qm * beta**0.5
            w[:, (H + h) * D : (H + h + 1) * D] = pinv @ km * beta**0.5
            b[h * D : (h + 1) * D] = 0
            b[(H + h) * D : (H + h + 1) * D] = 0
    return model


def test_hand_built_heads_rank_first(tiny_models):
    T = 16
    model = hand_built(tiny_models, T)
    ids = random_ids(model, T)
    s = head_stats(model, [ids], None)
    L, H = s.entropy.shape
    rank = lambda t: [divmod(int(i), H) for i in t.nan_to_num(nan=-1.0).flatten().argsort(descending=True)]  # noqa: E731  # NaN (a sink head's prev-tok) last
    assert rank(s.previous)[0] == (0, 1) and s.previous[0, 1] > 0.99
    assert rank(s.previous_token)[0] == (0, 1)
    assert rank(s.first)[0] == (0, 2) and s.first[0, 2] > 0.99
    assert rank(-s.distance)[0] == (0, 1)  # always one token back: the nearest attention apart from self
    assert s.entropy[0, 1] < 0.05 and s.entropy[0, 2] < 0.05
    assert s.induction is None and s.duplicate_token is None  # no probe; no repeated token in `ids`


def test_previous_and_previous_token_differ_as_documented(tiny_models):
    """prev: the raw share on token i − 1 over rows i ≥ 2; prev-tok: that share of what is off the first token."""
    T = 12
    model = hand_built(tiny_models, T)
    s = head_stats(model, [random_ids(model, T)], None)
    prev, prev_tok, first = s.previous[0], s.previous_token[0], s.first[0]
    # Head 1 looks at the previous token only.
    assert prev[1] > 0.99 and prev_tok[1] > 0.99
    # Head 2 looks at the first token only: no previous-token share (row 1, where they coincide, is left
    # out; it gave 1/(T − 1) before), and prev-tok is NaN: nothing is left off the first token.
    assert prev[2] < 1e-6 and torch.isnan(prev_tok[2]) and first[2] > 0.99
    # Head 3 splits rows 2.. between the first and the previous token: half the raw share, all of the rest.
    assert abs(prev[3] - 0.5) < 1e-3 and prev_tok[3] > 0.99
    assert abs(first[3] - (1 + 0.5 * (T - 2)) / (T - 1)) < 1e-3
    r = run_cli(["heads", "-m", str(tiny_models["gpt2"][0]), "a b c d e", "--format", "json"])  # NaN is JSON null, never NaN
    assert r.code == 0 and "NaN" not in r.out


# --- the command ---------------------------------------------------------------------------------


def heads_json(path, *args: str, tty: bool = False) -> dict:
    r = run_cli(["heads", "-m", str(path), *args, "--format", "json"], tty=tty)
    assert r.code == 0, r
    return json.loads(r.out)


def test_heads_json_shape(tiny_models):
    path, _ = tiny_models["llama"]
    d = heads_json(path, PROMPT)
    assert set(d) >= {"model", "tokens", "heads"} and d["probe"] is None
    assert [t["index"] for t in d["tokens"]] == list(range(len(d["tokens"])))
    assert len(d["heads"]) == 2 * 4
    for h in d["heads"]:
        assert list(h) == COLUMNS
        assert h["kv_head"] == h["head"] // 2
        assert h["induction"] is None  # the probe was not run
        for k in ("entropy", "distance", "first", "previous", "self", "previous_token"):
            assert type(h[k]) is float
    prev = [h["previous"] for h in d["heads"]]
    assert prev == sorted(prev, reverse=True)  # default sort without the probe


def test_heads_without_prompt_runs_the_induction_probe(tiny_models):
    path, _ = tiny_models["gpt2"]
    d = heads_json(path, "--probe-length", "20", "--sort", "layer", tty=True)
    ids = d["probe"]["ids"]
    assert len(ids) == 40 and ids[:20] == ids[20:]
    assert [t["id"] for t in d["tokens"]] == ids
    assert [(h["layer"], h["head"]) for h in d["heads"]] == [(l, h) for l in range(2) for h in range(4)]
    for h in d["heads"]:
        assert all(type(h[k]) is float for k in COLUMNS[3:])
    again = heads_json(path, "--probe-length", "20", "--sort", "layer", tty=True)
    assert again == d  # seeded: the same probe, the same numbers
    r = run_cli(["heads", "-m", str(path), "--probe", "none"], tty=True)  # nothing to measure: a usage error, not a crash
    assert (r.code, r.out) == (2, "") and r.err == "attn: error: --probe none with no prompt leaves nothing to measure: give a prompt, or drop --probe none\n", r


def test_index_columns_sort_smallest_first_with_or_without_ascending(tiny_models):
    path, _ = tiny_models["llama"]
    for extra in ([], ["--ascending"]):
        d = heads_json(path, PROMPT, "--sort", "layer", *extra)
        assert [(h["layer"], h["head"]) for h in d["heads"]] == sorted((h["layer"], h["head"]) for h in d["heads"])


def test_heads_probe_with_prompt_sort_and_top(tiny_models):
    path, _ = tiny_models["llama"]
    d = heads_json(path, PROMPT, "--probe", "induction", "--sort", "entropy", "--ascending", "--top", "3")
    assert len(d["heads"]) == 3
    ent = [h["entropy"] for h in d["heads"]]
    assert ent == sorted(ent)
    assert all(type(h["induction"]) is float for h in d["heads"])
    assert d["tokens"][0]["text"] == "a"  # measures on the prompt, detectors on the probe


def test_heads_csv_and_table(tiny_models):
    path, _ = tiny_models["llama"]
    r = run_cli(["heads", "-m", str(path), PROMPT, "--format", "csv"])
    assert r.code == 0, r
    rows = list(csv.DictReader(io.StringIO(r.out)))
    assert list(rows[0]) == COLUMNS and len(rows) == 8
    assert all(row["induction"] == "" for row in rows) and all(float(row["entropy"]) >= 0 for row in rows)
    r = run_cli(["heads", "-m", str(path), PROMPT, "--format", "table", "--top", "3"], env={"NO_COLOR": "1"})
    assert r.code == 0, r
    assert "\x1b[" not in r.out and "sorted by previous" in r.out and "5 more row(s)" in r.out
    assert len([ln for ln in r.out.splitlines() if re.match(r"^\s+\d+\s+\d+\s+\d+\s", ln)]) == 3


def test_heads_picture_alone_leaves_stdout_empty(tiny_models, tmp_path):
    """-o makes the picture the product, as in inspect: stdout only when --format asks for it."""
    path, _ = tiny_models["gpt2"]
    out = tmp_path / "heads.svg"
    r = run_cli(["heads", "-m", str(path), PROMPT, "-o", str(out)])
    assert r.code == 0 and r.out == "" and r.err == f"attn: wrote {out}\n", r
    assert out.read_text(encoding="utf-8").count("<rect x=") == 2 * 4


def test_sizes_are_in_binary_units():
    from cli.common import size_text

    assert (size_text(538_090_408), size_text(3 * 2**30), size_text(20_000)) == ("513.2 MiB", "3.00 GiB", "19.5 KiB")


@pytest.mark.parametrize("suffix", ["svg", "html"])
def test_heads_picture(tiny_models, tmp_path, suffix):
    path, _ = tiny_models["gpt2"]
    out = tmp_path / f"heads.{suffix}"
    r = run_cli(["heads", "-m", str(path), PROMPT, "--format", "csv", "-o", str(out), "--measure", "first"])
    assert r.code == 0, r
    doc = out.read_text(encoding="utf-8")
    assert doc.count("<rect x=") == 2 * 4  # one cell per (layer, head)
    assert "first per layer × head" in doc
    refs = re.findall(r"(?:src|href)\s*=|url\(|@import|https?://", doc)
    assert refs == (["http://"] if suffix == "svg" else [])  # only the SVG namespace name, never fetched
    if suffix == "html":
        assert doc.startswith("<!DOCTYPE html>") and "<svg" in doc
    else:
        import xml.etree.ElementTree as ET

        ET.fromstring(doc.split("\n", 1)[1])  # well-formed XML


@pytest.mark.parametrize(
    "args, message",
    [
        ([PROMPT, "--sort", "induction"], "--sort induction: that detector was not run"),
        ([PROMPT, "--sort", "bogus"], "bogus"),
        ([PROMPT, "-o", "heads.png"], "must be a .svg or .html file"),
        ([PROMPT, "--probe", "induction", "--probe-length", "200"], "exceeds the model's 256 positions"),
        (["a"], "need at least three"),
        ([PROMPT, "-o", "x.svg", "--measure", "layer"], "--measure must be a measure or detector"),
        ([PROMPT, "-o", "x.svg", "--sort", "layer"], "-o draws a measure: --sort layer is not one"),
    ],
)
def test_heads_usage_errors(tiny_models, args, message):
    path, _ = tiny_models["llama"]
    r = run_cli(["heads", "-m", str(path), *args, "--format", "json"])
    assert r.code == 2, r
    assert r.out == ""
    assert message in r.err and r.err.startswith("attn: error: ") and r.err.count("\n") == 1


# --- the real default model (slow) ---------------------------------------------------------------


@pytest.mark.slow
def test_real_model_has_induction_heads(real_model_dir):
    d = heads_json(real_model_dir, tty=True)  # no prompt: the induction probe
    top = sorted(d["heads"], key=lambda h: -h["induction"])[:5]
    summary = [(h["layer"], h["head"], round(h["induction"], 3)) for h in top]
    assert top[0]["induction"] > 0.5, f"strongest induction heads: {summary}"


@pytest.mark.slow
def test_real_model_blue_head_is_a_previous_token_head(real_model_dir):
    """The head that sends ' creature' to ' blue' is a positional previous-token head (on random tokens), not a meaning one."""
    from model.explain import query_rows
    from model.tokenizer import Tokenizer

    ids, pieces = Tokenizer(real_model_dir).encode_with_offsets(PROMPT)
    q, blue = pieces.index(" creature"), pieces.index(" blue")
    rows = query_rows(load_model(real_model_dir), ids, q)  # (L, H, q + 1)
    best = divmod(int(rows[:, :, blue].flatten().argmax()), rows.shape[1])
    d = heads_json(real_model_dir, PROMPT, "--probe", "induction", "--sort", "previous_token", "--top", "5")
    strongest = [(h["layer"], h["head"]) for h in d["heads"]]
    assert best in strongest, f"blue head {best}; strongest previous-token heads {strongest}"
