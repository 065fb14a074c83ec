"""oneDNN-packed float linear layers (model/quant/packed.py), the eager CPU default: against a float64
reference, swapped in and out of a model, and chosen (or not) as models open. Parity of packed models
with transformers: tests/test_parity.py (every family, both layouts)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.decoder import Linear
from model.loading import load_model
from model.quant import PackedLinear, pack, packs, unpack
from tests.test_quant import bf16_bound, float_linear


def reference(x: torch.Tensor, lin: Linear) -> torch.Tensor:
    y = x.double() @ lin.weight.detach().double()
    return y + lin.bias.detach().double() if lin.bias is not None else y


@settings(max_examples=25, deadline=None)
@given(n_in=st.integers(1, 200), n_out=st.integers(1, 150), rows=st.sampled_from([1, 3, 17]), bias=st.booleans(), seed=st.integers(0, 99))
def test_packed_layer_matches_a_float64_reference(n_in, n_out, rows, bias, seed):
    lin = float_linear(n_in, n_out, bias, seed)
    x = torch.randn(2, rows, n_in, generator=torch.Generator().manual_seed(seed + 1))
    layer = PackedLinear.from_linear(lin)
    assert torch.equal(layer.dense_weight(), lin.weight.detach())  # the packed layout holds W exactly
    want = reference(x, lin)
    scale = x.abs().double() @ lin.weight.detach().abs().double()
    for got in (layer(x), torch.stack([layer(x[0]), layer(x[1])]), layer(x.transpose(0, 1)).transpose(0, 1)):  # 3-D, 2-D, strided
        assert got.shape == (2, rows, n_out) and got.dtype == torch.float32
        assert ((got.double() - want).abs() <= 1e-6 * scale + 1e-6).all()
    # bfloat16 weights and activations: within bfloat16's rounding of the float64 product, where oneDNN has bfloat16
    if not packs(torch.device("cpu"), torch.bfloat16):
        return
    lin16 = float_linear(n_in, n_out, bias, seed).to(torch.bfloat16)
    got16 = PackedLinear.from_linear(lin16)(x.to(torch.bfloat16))
    w16 = lin16.weight.detach().float()
    assert got16.dtype == torch.bfloat16
    assert ((got16.float() - reference(x.to(torch.bfloat16).float(), lin16).float()).abs() <= bf16_bound(x.abs(), w16.abs()) + 1e-2).all()


def test_a_tied_head_keeps_its_rows_for_the_embedding_and_others_refuse_columns():
    lin = float_linear(24, 50, False, 0)
    head = PackedLinear.from_linear(lin, tied=True)
    ids = torch.tensor([[0, 7, 49]])
    assert torch.equal(head.columns(ids), lin.weight.detach().t()[ids])
    assert torch.equal(head.dense_weight(), lin.weight.detach())
    with pytest.raises(RuntimeError, match="tied head"):
        PackedLinear.from_linear(lin).columns(ids)


@pytest.mark.parametrize("kind", ["llama", "llama_mha", "gpt2"])
def test_pack_and_unpack_swap_every_linear_and_keep_the_weights(tiny_models, kind, monkeypatch):
    from model.quant.kernels import one_row_kernel

    monkeypatch.setenv("ATTN_ONE_ROW", "reduce" if kind == "llama" else "blas")  # both layouts, whatever the CPU
    path, _ = tiny_models[kind]
    plain = load_model(path)
    weights = {n: m.weight.detach().clone() for n, m in plain.named_modules() if isinstance(m, Linear)}
    model = load_model(path, out_in=True)  # the checkpoint's (out, in) storage, as the CLI loads to pack
    assert all(torch.equal(m.weight, plain.get_submodule(n).weight) for n, m in model.named_modules() if isinstance(m, Linear))
    assert pack(model) == len(weights)
    assert not any(isinstance(m, Linear) for m in model.modules())
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    for m in (plain, model):
        m.setup_cache(16, batch=2)
    want = plain(ids, 0)
    got = model(ids, 0)
    assert (got - want).abs().max().item() <= 1e-5
    assert unpack(model) == len(weights)  # every layer, the head too (it runs inside the compiled packages)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    assert all(torch.equal(model.get_submodule(n).weight, weights[n]) for n in weights)  # bit for bit back
    # the layout the compiled one-row products read: (out, in) for inductor's reduction, (in, out) for BLAS
    stored = "blas" if all(model.get_submodule(n).weight.is_contiguous() for n in weights) else "reduce"
    assert stored == one_row_kernel() and (stored == "blas" or all(model.get_submodule(n).weight.t().is_contiguous() for n in weights))
    assert (model(ids, 0) - want).abs().max().item() <= 1e-5  # eagerly too (oneDNN on (out, in) weights, BLAS on (in, out))


@pytest.mark.parametrize("one_row", ["reduce", "blas"])
@pytest.mark.parametrize("ahead", [False, True], ids=["torch.compile", "aoti"])
def test_a_compiled_step_takes_plain_layers_and_gives_the_eager_tokens(tiny_llama, ahead, aot_dir, monkeypatch, one_row):
    """Compiling swaps the packed layers for plain ones, stored as the compiled one-row products read them
    (kernels.one_row_kernel): (out, in) for inductor's reduction along each row, (in, out) for BLAS's `x @ W`
    (the head too: the ahead-of-time packages run it). Both give the eager tokens."""
    monkeypatch.setenv("ATTN_ONE_ROW", one_row)
    from model.compile import CompileFailed, compile_decode_step
    from model.generate import generate
    from model.sampling import SamplingSettings

    greedy = SamplingSettings(temperature=0)
    prompt = list(range(5, 13))
    plain = load_model(tiny_llama)
    model = load_model(tiny_llama, out_in=True)
    pack(model)
    want = [s.id for s in generate(model, prompt, 16, greedy)]
    try:
        compile_decode_step(model, len(prompt) + 16, cache_dir=aot_dir if ahead else None)
    except CompileFailed as e:
        pytest.skip(f"torch.compile unavailable here: {e}")
    assert type(model.decode_step).__name__ == ("AotStep" if ahead else "InductorStep")
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    for name, layer in model.named_modules():
        if isinstance(layer, Linear):
            stored = layer.weight.is_contiguous() if one_row == "blas" else layer.weight.t().is_contiguous()
            assert stored and torch.equal(layer.weight, plain.get_submodule(name).weight)
    assert [s.id for s in generate(model, prompt, 16, greedy)] == want


def test_models_open_packed_on_the_cpu_unless_told_otherwise(tiny_llama, monkeypatch):
    from cli.common import Dtype
    from cli.models import open_model

    m = open_model(str(tiny_llama), "cpu", Dtype.float32, quiet=True)
    n = sum(isinstance(x, PackedLinear) for x in m.model.modules())
    assert n > 0 and m.kernels == {"PackedLinear:onednn": n}
    bf16 = open_model(str(tiny_llama), "cpu", Dtype.bfloat16, quiet=True)
    assert bf16.kernels == ({"PackedLinear:onednn": n} if packs(torch.device("cpu"), torch.bfloat16) else {})
    # float16, quantized layers and ATTN_KERNELS=generic keep their own products
    assert not any(isinstance(x, PackedLinear) for x in open_model(str(tiny_llama), "cpu", Dtype.float16, quiet=True).model.modules())
    assert "PackedLinear:onednn" not in open_model(str(tiny_llama), "cpu", Dtype.float32, quiet=True, quantize="int8").kernels
    monkeypatch.setenv("ATTN_KERNELS", "generic")
    generic = open_model(str(tiny_llama), "cpu", Dtype.float32, quiet=True)
    assert generic.kernels == {} and not any(isinstance(x, PackedLinear) for x in generic.model.modules())
    assert not packs(torch.device("meta"), torch.float32) and not packs(torch.device("cpu"), torch.float16)


def test_one_row_layout_choice_and_the_tiled_copy(monkeypatch):
    """ATTN_ONE_ROW forces the compiled one-row kernel (else: BLAS on Intel CPUs, inductor's reduction elsewhere);
    `in_out` copies an (in, out) view of (out, in) storage into (in, out) storage, tiled or not, bit for bit."""
    from model.quant.kernels import one_row_kernel
    from model.quant.packed import in_out

    for forced in ("blas", "reduce"):
        monkeypatch.setenv("ATTN_ONE_ROW", forced)
        assert one_row_kernel() == forced
    monkeypatch.setenv("ATTN_ONE_ROW", "")
    intel = "GenuineIntel" in open("/proc/cpuinfo").read()
    assert one_row_kernel() == ("blas" if intel else "reduce")
    for n_out, n_in in ((3072, 576), (33, 17), (48, 64)):
        view = torch.randn(n_out, n_in).t()
        copy = in_out(view)
        assert copy.is_contiguous() and torch.equal(copy, view)


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_unpacking_a_quantized_model_never_dequantizes_it(tiny_models, mode, monkeypatch):
    """Readying a quantized model for the compiled step (unpack, then whether the head folds into the packages)
    keeps its 4- and 8-bit layers as they are and never reads their dense `weight`, which dequantizes the whole
    matrix (it once cost the default model's int4 step 2.4 s to load, against 0.06)."""
    from model.compile import _foldable_head
    from model.quant import quantize
    from model.quant.int4 import BlockLinear

    monkeypatch.setenv("ATTN_ONE_ROW", "blas")  # the layout pass that runs over every layer
    model = load_model(tiny_models["llama"][0])
    quantize(model, mode)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BlockLinear)}

    def refuse(self):
        raise AssertionError("dequantized")

    monkeypatch.setattr(BlockLinear, "dense_weight", refuse)
    unpack(model)
    assert _foldable_head(model) is None and layers == {n: m for n, m in model.named_modules() if isinstance(m, BlockLinear)}


def test_bfloat16_stays_plain_where_onednn_has_no_bfloat16_path(monkeypatch, tiny_llama):
    """An AVX2 CPU (a Zen3): oneDNN refuses to pack bfloat16 weights there; the layers keep their plain products."""
    from cli.common import Dtype
    from cli.models import open_model
    from model import quant

    monkeypatch.setattr(quant.packed, "onednn_bf16", lambda: False)
    assert packs(torch.device("cpu"), torch.float32) and not packs(torch.device("cpu"), torch.bfloat16)
    m = open_model(str(tiny_llama), "cpu", Dtype.bfloat16, quiet=True)
    assert m.kernels == {} and not any(isinstance(x, PackedLinear) for x in m.model.modules())
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.inference_mode():
        m.model.setup_cache(4)
        assert torch.isfinite(m.model(ids, 0).float()).all()
