"""attn heads over many prompts: every measure pooled over all rows of all prompts (mean, spread,
count) equals the same pooling of transformers' attention patterns, prompt by prompt."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch

from model.heads import head_stats
from model.loading import load_model

LENGTHS = [(14, 1), (5, 2), (9, 3), (3, 4), (11, 5), (7, 6)]


def dataset(model) -> list[list[int]]:
    out = []
    for T, seed in LENGTHS:
        g = torch.Generator().manual_seed(seed)
        out.append(torch.randint(3, model.cfg.vocab_size, (T,), generator=g).tolist())
    out[0][9] = out[0][3]  # repeats, so the duplicate-token detector has rows
    out[4][8] = out[4][2]
    return out


def pooled_reference(hf, prompts: list[list[int]], window: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """Each measure's rows from transformers' attentions, prompt by prompt, pooled: (mean, sd) (L, H) and the row count
    (previous_token: its ratio of sums over all rows, no sd)."""
    rows: dict[str, list[torch.Tensor]] = {}
    num, den = [], []
    for ids in prompts:
        with torch.no_grad():
            att = torch.stack(hf(torch.tensor([ids]), output_attentions=True).attentions)[:, 0].double()  # (L, H, T, T)
        T = len(ids)
        i = torch.arange(1, T)
        dist = (i[:, None] - torch.arange(T)[None, :]).clamp_min(0).double()
        r = att[:, :, 1:]
        got = {
            "entropy": -(r * torch.log2(r.clamp_min(1e-30))).sum(-1),
            "distance": (r * dist).sum(-1),
            "previous": att[:, :, i[1:], i[1:] - 1],  # row 1 left out: its previous token is the first
            "self": att[:, :, i, i],
        }
        num.append(att[:, :, i[1:], i[1:] - 1].sum(-1))  # previous_token: a ratio of sums over rows 2..
        den.append(att[:, :, 2:, 1:].sum((-2, -1)))
        if not window:
            got["first"] = r[..., 0]
            dup_rows = [k for k in range(1, T) if ids[k] in ids[:k]]
            if dup_rows:  # attention on the earlier copies, in the rows that have one
                got["duplicate_token"] = torch.stack(
                    [sum(att[:, :, k, j] for j in range(k) if ids[j] == ids[k]) for k in dup_rows], dim=-1
                )
        for name, v in got.items():
            rows.setdefault(name, []).append(v)
    out = {}
    for name, vs in rows.items():
        allrows = torch.cat(vs, dim=-1)  # (L, H, R)
        out[name] = (allrows.mean(-1), allrows.std(-1, correction=0), allrows.shape[-1])
    out["previous_token"] = (sum(num) / sum(den), None, sum(len(p) - 2 for p in prompts))
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2", "mistral_window", "gemma2", "pythia"])
def test_pooled_measures_equal_transformers(tiny_models, kind):
    path, hf = tiny_models[kind]
    model = load_model(path)
    prompts = dataset(model)
    s = head_stats(model, prompts, None, parallel=3)  # batches of up to 3, right-padded
    assert s.prompts == len(prompts) and s.tokens == sum(T for T, _ in LENGTHS)
    for name, (mean, sd, n) in pooled_reference(hf, prompts, window=kind in ("mistral_window", "gemma2")).items():
        torch.testing.assert_close(s.get(name), mean.float(), rtol=1e-4, atol=1e-5, msg=name)
        if sd is not None:
            torch.testing.assert_close(s.sd[name], sd.float(), rtol=1e-3, atol=1e-5, msg=name)
        assert s.n[name].tolist() == [n] * model.cfg.n_layers, name


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gemma3", "phi3", "qwen3", "olmo2", "pythia"])
def test_one_prompt_is_a_dataset_of_one(tiny_models, kind):
    """The batched, padded path gives each prompt what it gives alone: the pooled means are the
    row-count-weighted means of the per-prompt runs (soft caps, sliding windows, parallel residuals too)."""
    model = load_model(tiny_models[kind][0])
    prompts = dataset(model)
    together = head_stats(model, prompts, None, parallel=6)
    alone = [head_stats(model, [p], None) for p in prompts]
    for name in ("entropy", "distance", "first", "previous", "self"):
        n = [a.n[name].double() for a in alone]  # (L,) the rows each prompt has for it, per layer (a window hides some)
        mean = sum(w[:, None] * a.get(name).double().nan_to_num() for w, a in zip(n, alone)) / sum(n)[:, None]  # (L, H)
        torch.testing.assert_close(together.get(name), mean.float(), rtol=1e-5, atol=1e-6, equal_nan=True, msg=name)
        assert together.n[name].tolist() == sum(n).tolist(), name


# --- the command ------------------------------------------------------------------------------------

TEXTS = ["a fluffy blue creature roamed the verdant forest", "the quick brown fox jumps over the lazy dog", "def main():", "hello hello world"]


def heads_json(attn, *args, stdin: bytes | None = None) -> dict:
    r = attn(["heads", *args, "--format", "json"], stdin=stdin)
    assert r.code == 0, r
    return json.loads(r.out)


def test_cli_pools_equal_the_token_weighted_mean_of_per_prompt_runs(attn, tiny_llama, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(TEXTS[:2] + [""] + TEXTS[2:]) + "\n")
    d = heads_json(attn, "-m", str(tiny_llama), "-f", str(f), "--lines", "--parallel", "3")
    alone = [heads_json(attn, "-m", str(tiny_llama), t) for t in TEXTS]
    lengths = [len(a["tokens"]) for a in alone]
    assert d["dataset"]["prompts"] == 4 and d["dataset"]["tokens"] == sum(lengths) and "tokens" not in d
    key = lambda r: (r["layer"], r["head"])  # noqa: E731
    per_prompt = [{key(r): r for r in a["heads"]} for a in alone]
    for name in ("entropy", "distance", "first", "previous", "self"):
        weights = [n - (2 if name == "previous" else 1) for n in lengths]  # the rows each prompt has for it
        assert d["dataset"]["rows"][name] == [sum(weights)] * 2
        for row in d["heads"]:
            want = sum(w * p[key(row)][name] for w, p in zip(weights, per_prompt)) / sum(weights)
            assert row[name] == pytest.approx(want, rel=1e-5, abs=1e-6), name
            assert row[f"{name}_sd"] >= 0 and row[f"{name}_n"] == sum(weights)
    jl = tmp_path / "prompts.jsonl"
    jl.write_text("".join(json.dumps({"id": i, "prompt": t, "max_tokens": 9}) + "\n" for i, t in enumerate(TEXTS)))
    same = heads_json(attn, "-m", str(tiny_llama), "-f", str(jl), "--jsonl", "--parallel", "3")
    assert same["heads"] == d["heads"]


def test_cli_formats_and_errors(attn, tiny_llama, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n".join(TEXTS) + "\nhi\n")
    base = ["heads", "-m", str(tiny_llama), "-f", str(f), "--lines"]
    r = attn(base + ["--format", "csv", "-o", str(tmp_path / "g.svg")])
    assert r.code == 0, r
    header = next(csv.reader(io.StringIO(r.out)))
    assert {"entropy", "entropy_sd", "entropy_n", "previous_sd"} <= set(header)
    assert "1 prompt(s) under three tokens left out" in r.err  # "hi"
    svg = (tmp_path / "g.svg").read_text()
    assert "mean over 4 prompts" in svg and "(sd over" in svg
    r = attn(base + ["--format", "table"])
    assert r.code == 0 and "means over 4 prompts" in r.out and "±" in r.out
    r = attn(["heads", "-m", str(tiny_llama), "--jsonl"], stdin=b'{"prompt": "hello world"}\nnot json\n')
    assert r.code == 2 and "line 2: not valid JSON" in r.err
    r = attn(["heads", "-m", str(tiny_llama), "--lines"], tty=True)
    assert r.code == 2 and "-f FILE or stdin" in r.err
