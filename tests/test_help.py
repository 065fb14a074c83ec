"""--help as a newcomer reads it: every default shown, no type placeholders on flags, choice errors phrased as attn's others."""

from __future__ import annotations

import re

import pytest

from tests.conftest import run_cli

COMMANDS = ["generate", "inspect", "explain", "heads", "explore", "bench", "pull", "models", "convert"]
# Options that have no default: absent means "not given" (no prompt file, no system message, …).
NO_DEFAULT = {"--prompt", "--file", "--system", "--stop", "--find", "--output", "--logprobs", "--compare", "--help"}


def option_blocks(help_text: str) -> dict[str, str]:
    """Each option's part of the help: from its line to the next option's, keyed by its long name."""
    blocks: dict[str, str] = {}
    name = None
    for line in help_text.splitlines():
        m = re.match(r"^  (?:-\w, )?(--[\w-]+)", line)
        if m:
            name = m.group(1)
            blocks[name] = line
        elif name and line.startswith("    "):
            blocks[name] += " " + line.strip()
        else:
            name = None
    return blocks


def command_params(command: str):
    from typer.main import get_command

    import cli.main

    cli.main._register()
    return get_command(cli.main.app).commands[command].params


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_with_a_default_shows_it(command):
    r = run_cli([command, "--help"], env={"COLUMNS": "100"})
    assert r.code == 0 and r.err == "", r
    blocks = option_blocks(r.out)
    assert "<bool>" not in r.out and "list[" not in r.out  # flags take no value; repeatable options name one
    for p in command_params(command):
        if p.param_type_name != "option":
            continue
        long = next(o for o in p.opts if o.startswith("--"))
        flag_off = getattr(p, "is_flag", False) and p.default is False and not p.secondary_opts
        if long in NO_DEFAULT or flag_off:
            continue
        text = re.sub(r"\s+", " ", blocks[long])
        assert "default: " in text, f"attn {command} --help: {long} shows no default: {text!r}"


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "--format", "yaml", "x"], "--format must be table, json or csv (got 'yaml')"),
        (["inspect", "--direction", "up", "x"], "--direction must be from or to (got 'up')"),
        (["explain", "--format", "csv", "x"], "--format must be table or json (got 'csv')"),
        (["heads", "--sort", "bogus", "x"], "--sort must be a column, by its header or JSON name: layer, head, kv, entropy, dist, first, prev, self, prev-tok, dup-tok or induct (got 'bogus')"),
        (["heads", "--measure", "layer", "x"], "--measure must be a measure or detector, by its header or JSON name: entropy, dist, first, prev, self, prev-tok, dup-tok or induct (got 'layer')"),
        (["generate", "--truncate", "right", "x"], "--truncate must be error or left (got 'right')"),
        (["generate", "--quantize", "int2", "x"], "--quantize must be none, int8 or int4 (got 'int2')"),
        (["pull", "--dtype", "int3"], "--dtype must be float32, bfloat16 or float16 (got 'int3')"),
        (["inspect", "--top", "x", "y"], "--top must be an integer (got 'x')"),
        (["generate", "--temp", "-1", "x"], "--temp must be ≥ 0.0 (got '-1')"),
        (["explain", "--preview", "100", "x"], "--preview must be ≤ 64 (got '100')"),
        (["batch", "--invalid-utf8", "bogus", "x.jsonl"], "--invalid-utf8 must be error or replace (got 'bogus')"),
    ],
)
def test_bad_values_are_phrased_as_attn_errors(args, message):
    r = run_cli(args)
    assert r.code == 2 and r.out == "", r
    assert r.err == f"attn: error: {message}\n"


def test_a_bad_value_from_an_attn_variable_names_the_variable():
    for env, message in (({"ATTN_SEED": "abc"}, "ATTN_SEED (for --seed) must be an integer (got 'abc')"), ({"ATTN_TEMP": "-3"}, "ATTN_TEMP (for --temp) must be ≥ 0.0 (got '-3')")):
        r = run_cli(["generate", "x"], env=env)
        assert (r.code, r.out, r.err) == (2, "", f"attn: error: {message}\n"), r


def test_heads_sort_takes_the_names_the_table_prints(tiny_models):
    path, _ = tiny_models["llama"]
    for name, key in (("prev-tok", "previous_token"), ("dist", "distance"), ("previous_token", "previous_token"), ("dup-tok", "duplicate_token")):
        r = run_cli(["heads", "-m", str(path), "a fluffy blue creature", "--sort", name, "--format", "json"])
        assert r.code == 0 and r.err == "", r
        import json

        vals = [h[key] for h in json.loads(r.out)["heads"] if h[key] is not None]
        assert vals == sorted(vals, reverse=True), name
