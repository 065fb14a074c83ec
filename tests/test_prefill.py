"""Many rows through the MLP package (model/prefill.py): built in a child process beside the step's packages, each
layer run with its own weights, the eager numbers within bfloat16 rounding, loaded later without building; and eager
wherever it cannot be (no AMX, forced off, a failed build, a build whose check fails)."""

from __future__ import annotations

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


def opened(path, mode):
    model = load_model(path)
    quantize(model, mode)
    return model


def mlp_packages(folder) -> list:
    return sorted(folder.glob("mlp-*.pt2"))


@needs_amx
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_many_rows_run_through_the_package_with_each_layers_own_weights(tiny_llama, mode, tmp_path):
    eager, model = opened(tiny_llama, mode), opened(tiny_llama, mode)
    compile_decode_step(model, 64, cache_dir=tmp_path)
    assert model.decode_step.prefill_built and len(mlp_packages(tmp_path)) == 1
    assert all(block.mlp._fused is not None for block in model.layers)

    x = torch.randn(ROWS, model.cfg.dim, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for i, (ours, ref) in enumerate(zip(model.layers, eager.layers)):
            want, got = ref.mlp.forward(x), ours.mlp.forward(x)
            assert (got - want).abs().max() <= 0.01 * want.abs().max(), i  # bfloat16 rounding: measured ≤ 0.4% here
        other = eager.layers[0].mlp.forward(x)  # the layers' weights differ: layer 0's everywhere would not match
        assert (model.layers[1].mlp.forward(x) - other).abs().max() > 0.1 * other.abs().max()
        few = x[: prefill.MIN_ROWS - 1]  # fewer rows go eagerly, exactly as eager
        assert torch.equal(model.layers[1].mlp.forward(few), eager.layers[1].mlp.forward(few))

        prompt = torch.arange(5, 5 + ROWS)[None]
        eager.setup_cache(64)
        want, got = eager(prompt, 0), model(prompt, 0)
        assert (got - want).abs().max() <= 0.02 * want.abs().max()

    later = opened(tiny_llama, mode)  # a later run loads it, building nothing
    compile_decode_step(later, 64, cache_dir=tmp_path, build=False)
    assert not later.decode_step.prefill_built and all(block.mlp._fused is not None for block in later.layers)
    with torch.inference_mode():
        assert torch.equal(later.layers[1].mlp.forward(x), model.layers[1].mlp.forward(x))


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
    assert all(block.mlp._fused is None for block in model.layers) and mlp_packages(tmp_path) == []


def test_a_build_that_fails_leaves_the_prefill_eager_and_the_step_built(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)  # (the child fails anyway)
    monkeypatch.setattr(prefill.sys, "executable", "false")  # the child exits 1 at once
    eager, model = opened(tiny_llama, "int4"), opened(tiny_llama, "int4")
    compile_decode_step(model, 64, cache_dir=tmp_path)
    assert type(model.decode_step).__name__ == "AotStep" and model.decode_step.built and not model.decode_step.prefill_built
    assert all(block.mlp._fused is None for block in model.layers)
    assert mlp_packages(tmp_path) == [] and not list(tmp_path.glob("tmp*"))  # nothing half-written left
    prompt = torch.arange(5, 5 + ROWS)[None]
    eager.setup_cache(64)
    with torch.inference_mode():
        assert torch.equal(model(prompt, 0), eager(prompt, 0))


@needs_amx
def test_a_build_whose_check_fails_is_not_kept(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(prefill, "_agrees", lambda model: False)
    model = opened(tiny_llama, "int4")
    assert _start_prefill(model, tmp_path, True).finish() is False
    assert all(block.mlp._fused is None for block in model.layers)
    assert mlp_packages(tmp_path) == [] and not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("tmp*"))
