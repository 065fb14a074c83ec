"""Many rows through the MLP's and the attention's packages (model/prefill.py): built in child processes beside the step's
packages, each layer run with its own weights, the eager numbers within bfloat16 rounding, loaded later without
building; and eager wherever it cannot be (no AMX, forced off, a failed build, a build whose check fails)."""

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
    return sorted(folder.glob("mlp-*.pt2")) + sorted(folder.glob("attn-*.pt2"))


def threads_built_for(package) -> set[int]:
    """The thread counts inductor wrote into a package's template loops."""
    with zipfile.ZipFile(package) as z:
        sources = [z.read(n).decode() for n in z.namelist() if n.endswith(".cpp")]
    return {int(n) for src in sources for n in re.findall(r"constexpr int64_t num_threads = (\d+);", src)}


def through_packages(model) -> list:
    """Every module that runs many rows through a package."""
    return [m for m in model.modules() if getattr(m, "_fused", None) is not None]


@needs_amx
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_many_rows_run_through_the_package_with_each_layers_own_weights(tiny_llama, mode, tmp_path):
    eager, model = opened(tiny_llama, mode), opened(tiny_llama, mode)
    compile_decode_step(model, 64, cache_dir=tmp_path)
    assert model.decode_step.prefill_built and len(packages(tmp_path)) == 2
    # built by children that run one thread, for this process's threads (one thread's template runs ≈ 1.8× slower)
    assert [threads_built_for(p) for p in packages(tmp_path)] == [{torch.get_num_threads()}] * 2
    assert through_packages(model) == [m for b in model.layers for m in (b.attn.qkv, b.attn.o, b.mlp)]

    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for i, (ours, ref) in enumerate(zip(model.layers, eager.layers)):
            for name in ("mlp", "attn.qkv", "attn.o"):
                x = torch.randn(ROWS, model.cfg.dim, generator=gen)  # (o's input: heads × head width = dim here)
                want, got = ref.get_submodule(name).forward(x), ours.get_submodule(name).forward(x)
                assert got.shape == want.shape, (i, name)
                assert (got - want).abs().max() <= 0.01 * want.abs().max(), (i, name)  # bfloat16 rounding: measured ≤ 0.4% here
        x = torch.randn(ROWS, model.cfg.dim, generator=gen)
        for name in ("mlp", "attn.o"):  # the layers' weights differ: layer 0's everywhere would not match
            other = eager.layers[0].get_submodule(name).forward(x)
            assert (model.layers[1].get_submodule(name).forward(x) - other).abs().max() > 0.1 * other.abs().max()
        few = x[: prefill.MIN_ROWS - 1]  # fewer rows go eagerly, exactly as eager
        assert torch.equal(model.layers[1].mlp.forward(few), eager.layers[1].mlp.forward(few))
        assert torch.equal(model.layers[1].attn.o.forward(few), eager.layers[1].attn.o.forward(few))

        prompt = torch.arange(5, 5 + ROWS)[None]
        eager.setup_cache(64)
        want, got = eager(prompt, 0), model(prompt, 0)
        assert (got - want).abs().max() <= 0.02 * want.abs().max()

    later = opened(tiny_llama, mode)  # a later run loads them, building nothing
    compile_decode_step(later, 64, cache_dir=tmp_path, build=False)
    assert not later.decode_step.prefill_built and len(through_packages(later)) == 3 * len(later.layers)
    assert model.decode_step.prefill_missing == later.decode_step.prefill_missing == []
    with torch.inference_mode():
        assert torch.equal(later.layers[1].mlp.forward(x), model.layers[1].mlp.forward(x))
        assert torch.equal(later.layers[1].attn.o.forward(x), model.layers[1].attn.o.forward(x))


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
    assert through_packages(model) == [] and model.decode_step.prefill_missing == ["mlp", "attn"]  # (the CLI says so)
    assert packages(tmp_path) == [] and not list(tmp_path.glob("tmp*"))  # nothing half-written left
    prompt = torch.arange(5, 5 + ROWS)[None]
    eager.setup_cache(64)
    with torch.inference_mode():
        assert torch.equal(model(prompt, 0), eager(prompt, 0))
    later = opened(tiny_llama, "int4")  # a later run (or one after an update of attn) loads the step, builds nothing
    compile_decode_step(later, 64, cache_dir=tmp_path, build=False)
    assert type(later.decode_step).__name__ == "AotStep" and later.decode_step.prefill_missing == ["mlp", "attn"]


def test_without_fork_the_prompt_stays_eager(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.delattr(prefill.os, "fork")  # (Windows has none)
    model = opened(tiny_llama, "int4")
    assert _start_prefill(model, tmp_path, True) is None
    assert through_packages(model) == [] and packages(tmp_path) == [] and not list(tmp_path.glob("tmp*"))


@needs_amx
def test_a_build_whose_check_fails_is_not_kept(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(prefill, "_agrees", lambda model, package: False)
    monkeypatch.setattr(prefill, "packages", lambda model: ["attn"])  # (one package is enough here: ≈ 10 s less)
    model = opened(tiny_llama, "int4")
    assert _start_prefill(model, tmp_path, True).finish() is False
    assert through_packages(model) == []
    assert packages(tmp_path) == [] and not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("tmp*"))


def test_o_goes_through_the_qkv_package_only_where_it_fits(tiny_models, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    llama, qwen = opened(tiny_models["llama"][0], "int4"), opened(tiny_models["qwen2"][0], "int4")
    assert prefill.packages(llama) == prefill.packages(qwen) == ["mlp", "attn"]
    block = llama.layers[0]
    assert prefill._runs(block, "attn") == [block.attn.qkv, block.attn.o]  # o's 64 rows within the qkv's 128
    block = qwen.layers[0]
    assert prefill._runs(block, "attn") == [block.attn.qkv]  # the qkv has a bias the o has not: o stays eager
