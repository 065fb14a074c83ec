"""Many rows through the blocks by one package, a block's work after its attention and the next block's before it
(model/prefill.py): built in a child process beside the step's packages, each call run with its own blocks' weights,
the eager numbers within bfloat16 rounding, loaded later without building; and eager wherever it cannot be (no AMX,
forced off, a failed build, a build whose check fails, a hook on a block)."""

from __future__ import annotations

import re
import zipfile

import pytest
import torch

from model import prefill
from model.compile import _start_prefill, compile_decode_step
from model.loading import load_model
from model.quant import quantize

AMX = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
needs_amx = pytest.mark.skipif(not AMX, reason="no AMX tiles on this CPU: inductor's WoQ-int4 template has no AMX micro-kernel to run here")
ROWS = 24  # a prompt of this many tokens runs through the package (prefill.MIN_ROWS and up)


@pytest.fixture(autouse=True)
def prefill_allowed(monkeypatch):
    monkeypatch.delenv("ATTN_PREFILL", raising=False)  # (tests/conftest.py turns it off for the rest of the suite)
    monkeypatch.setenv("ATTN_LANES", "0")  # the AMX packages take int4pack layers (an AVX2 CPU would give lanes ones)


def opened(path, mode):
    model = load_model(path)
    quantize(model, mode)
    return model


def packages(folder) -> list:
    return sorted(folder.glob("mid-*.pt2"))


def threads_built_for(package) -> set[int]:
    """The thread counts inductor wrote into a package's template loops."""
    with zipfile.ZipFile(package) as z:
        sources = [z.read(n).decode() for n in z.namelist() if n.endswith(".cpp")]
    return {int(n) for src in sources for n in re.findall(r"constexpr int64_t num_threads = (\d+);", src)}


def call_inputs(model, gen, rows: int = ROWS) -> tuple:
    """Random rows for one call of the package: the residual x, the heads y of the block before, cos, sin."""
    a = model.layers[0].attn
    cos, sin = (t.contiguous() for t in model.rope_at(0, rows)[a.rope_index])
    return torch.randn(rows, model.cfg.dim, generator=gen), torch.randn(rows, a.n_heads * a.head_dim, generator=gen), cos, sin


def close(got, want, share=0.01) -> bool:
    return got.shape == want.shape and bool((got - want).abs().max() <= share * want.abs().max())


@needs_amx
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_many_rows_run_through_the_package_with_each_blocks_own_weights(tiny_llama, mode, tmp_path):
    eager, model = opened(tiny_llama, mode), opened(tiny_llama, mode)
    compile_decode_step(model, 64, cache_dir=tmp_path)
    assert model.decode_step.prefill_built and len(packages(tmp_path)) == 1
    # built by a child that runs one thread, for this process's threads (one thread's template runs ≈ 1.8× slower)
    assert threads_built_for(packages(tmp_path)[0]) == {torch.get_num_threads()}
    assert model.prompt_run is not None and eager.prompt_run is None
    n = len(model.layers)

    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for i in range(1, n):  # a call between two blocks: block i − 1 after its attention, block i before its own
            args = call_inputs(model, gen)
            want = prefill._Pair(eager.layers[i - 1], eager.layers[i])(*args)
            got = model.prompt_run.run(i, *args)
            assert all(close(g, w) for g, w in zip(got, want, strict=True)), i  # bfloat16 rounding: measured ≤ 0.4% here
        x, y, cos, sin = call_inputs(model, gen)
        first = model.prompt_run.run(0, x, y, cos, sin)  # no block before the first: the residual passes unchanged
        assert torch.equal(first[0], x)
        assert all(close(g, w) for g, w in zip(first[1:], eager.layers[0].attn.project(eager.layers[0].attn_norm(x[None]), (cos, sin))))
        last = model.prompt_run.run(n, x, y, cos, sin)  # no block after the last: only its residual is used
        assert close(last[0], eager.layers[-1].finish(x, eager.layers[-1].attn.o(y)))
        # the blocks' weights differ: the first call's (those the package was built with) everywhere would not match
        assert not close(model.prompt_run.run(n, x, y, cos, sin)[0], model.layers[0].finish(x, model.layers[0].attn.o(y)), 0.1)

        eager.setup_cache(64)
        few = torch.arange(5, 5 + prefill.MIN_ROWS - 1)[None]  # fewer rows go eagerly, exactly as eager
        assert torch.equal(model(few, 0), eager(few, 0))
        prompt = torch.arange(5, 5 + ROWS)[None]
        want, got = eager(prompt, 0), model(prompt, 0)
        assert close(got, want, 0.02)
        after = torch.arange(7, 7 + ROWS)[None]  # a chunk after cached tokens: its keys see the cache's
        want, got = eager(after, ROWS), model(after, ROWS)
        assert close(got, want, 0.02)

        # 8 rows of a batch, one token each at its own position (a position tensor): through the package too
        for m in (eager, model):
            m.setup_cache(64, 8)
        pos = torch.arange(8) + 3
        ids = torch.arange(8)[:, None] + 11
        want, got = eager.step(ids, pos, 12), model.step(ids, pos, 12)
        assert close(got, want, 0.02)
        assert close(model.layers[1].attn.cache.k, eager.layers[1].attn.cache.k, 0.02)

        # a hook on a block sees the blocks one by one: eagerly, exactly as eager
        seen = []
        hook = model.layers[1].register_forward_hook(lambda mod, args, out: seen.append(out))
        try:
            assert torch.equal(model(prompt, 0), eager(prompt, 0)) and len(seen) == 1
        finally:
            hook.remove()

    later = opened(tiny_llama, mode)  # a later run loads it, building nothing
    compile_decode_step(later, 64, cache_dir=tmp_path, build=False)
    assert not later.decode_step.prefill_built and later.prompt_run is not None
    assert model.decode_step.prefill_missing == later.decode_step.prefill_missing == []
    with torch.inference_mode():
        assert torch.equal(later.prompt_run.run(1, x, y, cos, sin)[0], model.prompt_run.run(1, x, y, cos, sin)[0])


@needs_amx
@pytest.mark.parametrize("kind", ["gemma3", "olmo2"])
def test_other_blocks_run_through_the_package_too(tiny_models, kind, tmp_path):
    """Gemma 3: four norms, their weights read as 1 + w, q/k norms per head, local and global RoPE; OLMo 2: norms after
    the attention and the MLP only, q/k norms over all heads. The norms' weights are the package's inputs, not its
    constants: as constants inductor folded 1 + w into one of its own, which no other block could be given."""
    eager, model = opened(tiny_models[kind][0], "int4"), opened(tiny_models[kind][0], "int4")
    compile_decode_step(model, 64, cache_dir=tmp_path)
    assert model.prompt_run is not None and model.decode_step.prefill_missing == []
    eager.setup_cache(64)
    with torch.inference_mode():
        prompt = torch.arange(5, 5 + ROWS)[None]
        assert close(model(prompt, 0), eager(prompt, 0), 0.02)  # measured: 0.8% (gemma3), 1.0% (olmo2)
        after = torch.arange(7, 7 + ROWS)[None]
        assert close(model(after, ROWS), eager(after, ROWS), 0.02)


def test_without_amx_or_when_turned_off_nothing_is_built(tiny_llama, tmp_path, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("no build may start")

    monkeypatch.setattr(prefill, "start", no_build)
    model = opened(tiny_llama, "int4")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not prefill.available(model) and _start_prefill(model, tmp_path, True) is None
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setenv("ATTN_PREFILL", "eager")
    assert not prefill.available(model) and _start_prefill(model, tmp_path, True) is None
    monkeypatch.delenv("ATTN_PREFILL")
    assert not prefill.available(load_model(tiny_llama))  # float layers: nothing for the template to take
    assert model.prompt_run is None and packages(tmp_path) == []


def no_compiler(*args) -> None:
    raise RuntimeError("no C++ compiler")


def test_a_build_that_fails_leaves_the_prefill_eager_and_the_step_built(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)  # (the child fails anyway)
    monkeypatch.setattr(prefill, "_build", no_compiler)  # the children fail at once
    eager, model = opened(tiny_llama, "int4"), opened(tiny_llama, "int4")
    compile_decode_step(model, 64, cache_dir=tmp_path)
    assert type(model.decode_step).__name__ == "AotStep" and model.decode_step.built and not model.decode_step.prefill_built
    assert model.prompt_run is None and model.decode_step.prefill_missing == ["mid"]  # (the CLI says so)
    assert packages(tmp_path) == [] and not list(tmp_path.glob("tmp*"))  # nothing half-written left
    prompt = torch.arange(5, 5 + ROWS)[None]
    eager.setup_cache(64)
    with torch.inference_mode():
        assert torch.equal(model(prompt, 0), eager(prompt, 0))
    later = opened(tiny_llama, "int4")  # a later run (or one after an update of attn) loads the step, builds nothing
    compile_decode_step(later, 64, cache_dir=tmp_path, build=False)
    assert type(later.decode_step).__name__ == "AotStep" and later.decode_step.prefill_missing == ["mid"]


def test_without_fork_the_prompt_stays_eager(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.delattr(prefill.os, "fork")  # (Windows has none)
    model = opened(tiny_llama, "int4")
    assert _start_prefill(model, tmp_path, True) is None
    assert model.prompt_run is None and packages(tmp_path) == [] and not list(tmp_path.glob("tmp*"))


@needs_amx
def test_a_build_whose_check_fails_is_not_kept(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(prefill, "_agrees", lambda model: False)
    model = opened(tiny_llama, "int4")
    model.setup_cache(64)  # (as compile_decode_step does first: the RoPE tables)
    assert _start_prefill(model, tmp_path, True).finish() is False
    assert model.prompt_run is None
    assert packages(tmp_path) == [] and not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("tmp*"))


def test_which_blocks_can_run_the_packages(tiny_models, monkeypatch):
    """Gated MLPs, RoPE, every product an int4pack layer (a bias too: the package is given it, as the norms' weights)."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    for kind in ("llama", "qwen2", "qwen3", "gemma2"):  # (qwen2: a qkv bias; qwen3: q/k norms; gemma2: four norms)
        assert prefill.packages(opened(tiny_models[kind][0], "int4")) == ["mid"], kind
    assert prefill.packages(opened(tiny_models["gpt2"][0], "int4")) == []  # learned positions, a plain MLP
