"""Tables on terminals 40, 60, 80 and 120 columns wide: nothing that identifies a row, and no number, is cut."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import run_cli

PROMPT = "a fluffy blue creature roamed the verdant forest"
WIDTHS = [40, 60, 80, 120]


def table(width: int, *args: str) -> str:
    r = run_cli([*args, "--format", "table", "-q"], env={"NO_COLOR": "1", "COLUMNS": str(width)})
    assert r.code == 0 and r.err == "", r
    lines = r.out.splitlines()
    assert all(len(line) <= width for line in lines), [line for line in lines if len(line) > width]
    assert not re.search(r"\d…|…\d", r.out), r.out  # a number cut short ends or starts at an ellipsis
    return r.out


def as_json(*args: str) -> dict:
    r = run_cli([*args, "--format", "json", "-q"])
    assert r.code == 0, r
    return json.loads(r.out)


@pytest.mark.parametrize("width", WIDTHS)
def test_heads_table(tiny_models, width):
    path, _ = tiny_models["llama"]
    args = ["heads", "-m", str(path), PROMPT, "--probe", "induction", "--probe-length", "8", "--top", "5"]
    out = table(width, *args)
    want = [(h["layer"], h["head"], h["induction"]) for h in as_json(*args)["heads"]]
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s+\d+\s+\d+\s", line)]
    assert [(int(r[0]), int(r[1])) for r in rows] == [(layer, head) for layer, head, _ in want]
    assert [r[-1] for r in rows] == [f"{x:.3f}" for _, _, x in want]  # the sort column is always shown, last
    header = next(line for line in out.splitlines() if "layer" in line and "head" in line).split()
    assert header[:2] == ["layer", "head"] and header[-1] == "induct"
    if width >= 80:
        assert len(header) == 11
    else:
        flat = re.sub(r"\s+", " ", out)
        assert "too narrow for" in flat and "--format csv has every column" in flat


@pytest.mark.parametrize("width", WIDTHS)
def test_explain_panels(tiny_models, width):
    path, _ = tiny_models["llama"]
    out = table(width, "explain", "-m", str(path), PROMPT, "--token", "-1", "--layer", "1", "--head", "3")
    q = len(as_json("inspect", "-m", str(path), PROMPT, "-l", "0")["tokens"]) - 1
    head = "\n".join(out.splitlines()[:2])
    assert f"(token {q})" in head and "layer 1" in head and "head 3" in head  # whole, before the first stage's body
    for stage in ("1 · input to the layer", "2 · query and keys", "3 · scores and the mask", "4 · softmax", "5 · values and output", "6 · KV heads"):
        assert stage in out
    # Every listed source keeps its index j: the row of each table starts with it.
    for n in range(q - 2, q + 1):
        assert re.search(rf"^│\s+{n}\s", out, re.M), n


@pytest.mark.parametrize("width", WIDTHS)
def test_inspect_table(tiny_models, width):
    path, _ = tiny_models["llama"]
    long = PROMPT + " and the quick brown fox"  # past ten tokens: two-digit indices over the strip
    out = table(width, "inspect", "-m", str(path), long, "--layer", "1", "--head", "0", "--head", "3")
    n = len(as_json("inspect", "-m", str(path), long, "-l", "0")["tokens"])
    assert n > 20
    ruler = next(line for line in out.splitlines() if line.lstrip().startswith("L kv"))
    marks = [int(x) for x in re.findall(r"\d+", ruler.split(" h ", 1)[1].split("1st")[0])]
    assert marks and marks == sorted(set(marks)) and marks[-1] < n  # readable: no two indices run together
    assert re.search(r"^1\s+0\s+0 ", out, re.M) and re.search(r"^1\s+1\s+3 ", out, re.M)  # layer, kv head, head of each row


def test_inspect_one_row_per_layer_has_no_rules(tiny_models):
    path, _ = tiny_models["llama"]
    out = table(80, "inspect", "-m", str(path), PROMPT, "--head", "3")
    assert "─" not in out and len([ln for ln in out.splitlines() if re.match(r"^\s*\d+\s+\d+\s+3 ", ln)]) == 2
    out = table(80, "inspect", "-m", str(path), PROMPT)
    assert len([ln for ln in out.splitlines() if ln.startswith("─")]) == 1  # two layers of four heads: one rule between them
