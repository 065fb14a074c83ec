"""The one generation loop (model/engine.py): the end-of-sequence rule every command follows, stop
strings, and the loop against the bare sampler."""

from __future__ import annotations

import json

from model.engine import Generation, Request, eos_ids
from model.generate import generate
from model.loading import load_model
from model.sampling import SamplingSettings
from model.tokenizer import Tokenizer
from tests.conftest import save_model

GREEDY = SamplingSettings(temperature=0)


def greedy_ids(path, prompt: str, n: int) -> list[int]:
    return [s.id for s in generate(load_model(path), Tokenizer(path).encode(prompt), n, GREEDY)]


def test_generation_yields_what_the_sampler_samples(tiny_llama):
    model, tok = load_model(tiny_llama), Tokenizer(tiny_llama)
    ids = tok.encode("hello world")
    gen = Generation(model, tok, Request(ids, 12, GREEDY), set())
    out = [t.id for t in gen]
    assert out == greedy_ids(tiny_llama, "hello world", 12) == gen.ids
    assert gen.finish_reason == "length" and gen.text == tok.decode(out)
    t = gen.timings()
    assert t["prompt_tps"] > 0 and t["decode_tps"] > 0


def test_stop_string_ends_the_generation(tiny_llama):
    model, tok = load_model(tiny_llama), Tokenizer(tiny_llama)
    ids = tok.encode("hello world")
    full = Generation(model, tok, Request(ids, 16, GREEDY), set())
    text = "".join(t.text for t in full)
    stop = text[5:8]
    gen = Generation(model, tok, Request(ids, 16, GREEDY, stops=[stop]), set())
    assert "".join(t.text for t in gen) == text[: text.index(stop)]
    assert gen.finish_reason == "stop" and gen.stop_sequence == stop


def tokenizer_eos_model(tmp_path, tokenizer_json) -> int:
    """A model where a greedy token after "hi" is the tokenizer's EOS token (tokenizer_config.json only:
    config.json's eos_token_id does not name it); how many tokens come before it."""
    save_model("llama", tmp_path, tokenizer_json, seed=0)
    seq = greedy_ids(tmp_path, "hi", 9)
    at = next(i for i in range(1, 9) if seq[i] not in seq[:i])
    target = seq[at]
    tok = Tokenizer(tmp_path)
    assert target not in tok.special_ids
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["eos_token_id"] = None
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tok_cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    tok_cfg["eos_token"] = tok.tk.id_to_token(target)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    assert target in eos_ids(load_model(tmp_path).cfg, Tokenizer(tmp_path)) and target not in load_model(tmp_path).cfg.eos_token_ids
    return at


def test_every_command_that_generates_stops_at_the_tokenizers_eos(attn, tmp_path, tokenizer_json):
    at = tokenizer_eos_model(tmp_path, tokenizer_json)
    d = json.loads(attn(["generate", "-m", str(tmp_path), "--raw", "--temp", "0", "-n", "9", "--json", "hi"]).out)
    assert d["finish_reason"] == "eos" and d["usage"]["completion_tokens"] == at + 1
    r = attn(["inspect", "-m", str(tmp_path), "--raw", "--temp", "0", "--generate", "9", "--format", "json", "hi"])
    assert r.code == 0, r
    assert json.loads(r.out)["generated"]["tokens"] == at  # the ones before EOS
    r = attn(["inspect", "-m", str(tmp_path), "--raw", "--temp", "0", "--generate", "9", "--ignore-eos", "--format", "json", "hi"])
    assert json.loads(r.out)["generated"]["tokens"] == 9
