"""Many rows through a block's two packages, before and after the attention (model/prefill.py): built in child processes
beside the step's packages, each layer run with its own weights, the eager numbers within bfloat16 rounding, loaded later
without building; and eager wherever it cannot be (no AMX, forced off, a failed build, a build whose check fails)."""

from __future__ import annotations

import re
import zipfile

import pytest
import torch

from model import prefill
from model.compile import _start_prefill, compile_decode_step
from model.decoder import Span
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
    return sorted(folder.glob("pre-*.pt2")) + sorted(folder.glob("post-*.pt2"))


def threads_built_for(package) -> set[int]:
    """The thread counts inductor wrote into a package's template loops."""
    with zipfile.ZipFile(package) as z:
        sources = [z.read(n).decode() for n in z.namelist() if n.endswith(".cpp")]
    return {int(n) for src in sources for n in re.findall(r"constexpr int64_t num_threads = (\d+);", src)}


def through_packages(model) -> list:
    """Every block that runs many rows through the packages."""
    return [b for b in model.layers if b._fused is not None]


def package_inputs(model, gen, rows: int = ROWS) -> dict:
    """Random rows for each package: pre (x, cos, sin), post (x, the heads y)."""
    a = model.layers[0].attn
    cos, sin = (t.contiguous() for t in model.rope_at(0, rows)[a.rope_index])
    return {
        "pre": (torch.randn(rows, model.cfg.dim, generator=gen), cos, sin),
        "post": (torch.randn(rows, model.cfg.dim, generator=gen), torch.randn(rows, a.n_heads * a.head_dim, generator=gen)),
    }


def eagerly(block, name, args) -> list:
    out = prefill.WRAPPERS[name](block)(*args)
    return list(out) if isinstance(out, tuple) else [out]


@needs_amx
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_many_rows_run_through_the_package_with_each_layers_own_weights(tiny_llama, mode, tmp_path):
    eager, model = opened(tiny_llama, mode), opened(tiny_llama, mode)
    compile_decode_step(model, 64, cache_dir=tmp_path)
    assert model.decode_step.prefill_built and len(packages(tmp_path)) == 2
    # built by children that run one thread, for this process's threads (one thread's template runs ≈ 1.8× slower)
    assert [threads_built_for(p) for p in packages(tmp_path)] == [{torch.get_num_threads()}] * 2
    assert through_packages(model) == list(model.layers)

    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for i, (ours, ref) in enumerate(zip(model.layers, eager.layers)):
            for name, args in package_inputs(model, gen).items():
                for got, want in zip(ours._fused.run(name, *args), eagerly(ref, name, args), strict=True):
                    assert got.shape == want.shape, (i, name)
                    assert (got - want).abs().max() <= 0.01 * want.abs().max(), (i, name)  # bfloat16 rounding: measured ≤ 0.4% here
        args = package_inputs(model, gen)["post"]  # the layers' weights differ: layer 0's everywhere would not match
        (other,) = eagerly(eager.layers[0], "post", args)
        assert (model.layers[1]._fused.run("post", *args)[0] - other).abs().max() > 0.1 * other.abs().max()

        eager.setup_cache(64)
        few = torch.arange(5, 5 + prefill.MIN_ROWS - 1)[None]  # fewer rows go eagerly, exactly as eager
        assert torch.equal(model(few, 0), eager(few, 0))
        prompt = torch.arange(5, 5 + ROWS)[None]
        want, got = eager(prompt, 0), model(prompt, 0)
        assert (got - want).abs().max() <= 0.02 * want.abs().max()
        after = torch.arange(7, 7 + ROWS)[None]  # a chunk after cached tokens: its keys see the cache's
        want, got = eager(after, ROWS), model(after, ROWS)
        assert (got - want).abs().max() <= 0.02 * want.abs().max()

        # 8 rows of a batch, one token each at its own position (a position tensor): through the packages too
        for m in (eager, model):
            m.setup_cache(64, 8)
        pos = torch.arange(8) + 3
        x = torch.randn(8, 1, model.cfg.dim, generator=gen)
        want = eager.layers[1].forward(x, Span(pos), eager.rope_at(pos, 1), None)
        got = model.layers[1].forward(x, Span(pos), model.rope_at(pos, 1), None)
        assert (got - want).abs().max() <= 0.02 * want.abs().max()
        assert torch.allclose(model.layers[1].attn.cache.k, eager.layers[1].attn.cache.k, atol=0.02)

    later = opened(tiny_llama, mode)  # a later run loads them, building nothing
    compile_decode_step(later, 64, cache_dir=tmp_path, build=False)
    assert not later.decode_step.prefill_built and through_packages(later) == list(later.layers)
    assert model.decode_step.prefill_missing == later.decode_step.prefill_missing == []
    with torch.inference_mode():
        assert torch.equal(later.layers[1]._fused.run("post", *args)[0], model.layers[1]._fused.run("post", *args)[0])


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
    assert through_packages(model) == [] and packages(tmp_path) == []


def no_compiler(*args) -> None:
    raise RuntimeError("no C++ compiler")


def test_a_build_that_fails_leaves_the_prefill_eager_and_the_step_built(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)  # (the child fails anyway)
    monkeypatch.setattr(prefill, "_build", no_compiler)  # the children fail at once
    eager, model = opened(tiny_llama, "int4"), opened(tiny_llama, "int4")
    compile_decode_step(model, 64, cache_dir=tmp_path)
    assert type(model.decode_step).__name__ == "AotStep" and model.decode_step.built and not model.decode_step.prefill_built
    assert through_packages(model) == [] and model.decode_step.prefill_missing == ["pre", "post"]  # (the CLI says so)
    assert packages(tmp_path) == [] and not list(tmp_path.glob("tmp*"))  # nothing half-written left
    prompt = torch.arange(5, 5 + ROWS)[None]
    eager.setup_cache(64)
    with torch.inference_mode():
        assert torch.equal(model(prompt, 0), eager(prompt, 0))
    later = opened(tiny_llama, "int4")  # a later run (or one after an update of attn) loads the step, builds nothing
    compile_decode_step(later, 64, cache_dir=tmp_path, build=False)
    assert type(later.decode_step).__name__ == "AotStep" and later.decode_step.prefill_missing == ["pre", "post"]


def test_without_fork_the_prompt_stays_eager(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.delattr(prefill.os, "fork")  # (Windows has none)
    model = opened(tiny_llama, "int4")
    assert _start_prefill(model, tmp_path, True) is None
    assert through_packages(model) == [] and packages(tmp_path) == [] and not list(tmp_path.glob("tmp*"))


@needs_amx
def test_a_build_whose_check_fails_is_not_kept(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(prefill, "_agrees", lambda model: False)
    monkeypatch.setattr(prefill, "packages", lambda model: ["pre"])  # (one package is enough here: ≈ 10 s less)
    model = opened(tiny_llama, "int4")
    model.setup_cache(64)  # (as compile_decode_step does first: the RoPE tables)
    assert _start_prefill(model, tmp_path, True).finish() is False
    assert through_packages(model) == []
    assert packages(tmp_path) == [] and not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("tmp*"))


def test_which_blocks_can_run_the_packages(tiny_models, monkeypatch):
    """Gated MLPs, RoPE, every product an int4pack layer (a bias too: it is part of the product's code in the package)."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    for kind in ("llama", "qwen2", "qwen3", "gemma2"):  # (qwen2: a qkv bias; qwen3: q/k norms; gemma2: four norms)
        assert prefill.packages(opened(tiny_models[kind][0], "int4")) == ["pre", "post"], kind
    assert prefill.packages(opened(tiny_models["gpt2"][0], "int4")) == []  # learned positions, a plain MLP
