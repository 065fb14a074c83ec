"""Quantized linear layers (model/quant) against float references, GGUF blocks kept bit for bit,
and kernel selection with its fallback."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from hypothesis import example, given, settings
from hypothesis import strategies as st

from model.decoder import Linear
from model.errors import AttnError
from model.loading import load_model
from model.quant import Int4Linear, Q8Linear, quantize
from model.quant.blocks import GROUP, Blocks, load_blocks, q4_1_rtn, q8_0_rtn, save_blocks, u8_rtn
from model.quant import lanes as lanes_layout
from model.quant.int4 import layout, pack_rows, unpack_row_ids, unpack_rows
from model.quant.kernels import CUDA_MODES, cpu_features
from tests.test_gguf import hf_to_gguf_tensors, model_metadata, tiny_hf_model, train_tokenizer, write_gguf
from weights.gguf import BLOCKS_FILE, blocks_file, convert_gguf


def float_linear(n_in: int, n_out: int, bias: bool, seed: int) -> Linear:
    g = torch.Generator().manual_seed(seed)
    lin = Linear(n_in, n_out, bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_in, n_out, generator=g) * 0.1)
        if bias:
            lin.bias.copy_(torch.randn(n_out, generator=g))
    return lin


def bf16_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What bfloat16 activations and bfloat16 scales may change in x @ w: ~2⁻⁸ relative per product term, summed."""
    return 2**-7 * (x.abs() @ w.abs()) + 1e-5


def kernel_products(layer) -> list[torch.Tensor]:
    """W (in, out) of what the int4pack product multiplies: (q − 8)·s + z with its bfloat16 s and z; for
    Q8Linear the high and the low halves of the codes (one product of [x | x] over [hi | lo])."""
    s, z = (layer.q.sz[..., i].float().t().repeat_interleave(GROUP, dim=1) for i in (0, 1))  # (N', K') or (N', 2K')
    w = ((layer.q.codes().float() - 8) * s + z)[: layer.n_out]
    if isinstance(layer, Int4Linear):
        return [w[:, : layer.n_in].t()]
    K = w.shape[1] // 2  # Q8Linear: one product over [hi | lo], side by side along the input
    return [w[:, : layer.n_in].t(), w[:, K : K + layer.n_in].t()]


def kernel_weight(layer) -> torch.Tensor:
    """W (in, out) as the int4pack kernel computes it: the sum of the layer's products' weights."""
    return sum(kernel_products(layer))


def use_kernels(monkeypatch, which: str) -> None:
    monkeypatch.setenv("ATTN_KERNELS", which)


# --- layers against their own dense weights, and against the float weights ----------------------------


@settings(max_examples=25, deadline=None)
@given(n_in=st.integers(1, 200), n_out=st.integers(1, 150), rows=st.sampled_from([1, 3]), bias=st.booleans(), seed=st.integers(0, 99))
@example(n_in=4, n_out=79, rows=1, bias=False, seed=67)  # Q8Linear's two products nearly cancel in column 50
def test_int4_int8_q8_layers_match_a_float_reference(n_in, n_out, rows, bias, seed):
    lin = float_linear(n_in, n_out, bias, seed)
    w = lin.weight.detach().clone()  # (in, out)
    x = torch.randn(rows, n_in, generator=torch.Generator().manual_seed(seed + 1))
    for cls, step in ((Int4Linear, 15), (Q8Linear, 255)):
        q = cls.from_linear(lin)
        dense = q.dense_weight().float()
        assert dense.shape == (n_in, n_out)
        # Dequantized weights within half a quantization step (max − min of the group / levels) of the float ones.
        spread = w.abs().max() * 2 / step
        assert (dense - w).abs().max().item() <= spread / 2 * 1.01 + 1e-3
        y = q(x)
        # What the kernel multiplies by: the scale and zero it reads are bfloat16 (float16 d and m rounded);
        # an offset's rounding reaches every column of x, so it is part of the reference.
        kernel_w = kernel_weight(q)
        ref = x @ kernel_w + (lin.bias.detach() if bias else 0)
        assert y.shape == (rows, n_out)
        # bfloat16 rounding is relative to each half's terms, not to their sum: Q8Linear's two halves can
        # nearly cancel (hypothesis found n_in=4, n_out=79, seed=67), so the bound is the sum of each half's.
        bound = sum(bf16_bound(x, w_part) for w_part in kernel_products(q))
        assert ((y - ref).abs() <= bound + 1e-4).all(), cls.__name__
        assert torch.equal(q.columns(torch.tensor([0, n_out - 1])), dense.t()[[0, n_out - 1]])
        for i in {0, n_out // 2, n_out - 1}:  # one id (a decode step's embedding): its own path, no gather
            assert torch.equal(q.columns(torch.tensor([[i]]))[0, 0], dense.t()[i])


@pytest.mark.parametrize("cls", [Int4Linear, Q8Linear])
def test_generic_kernel_gives_what_the_packed_one_gives(monkeypatch, cls):
    lin = float_linear(96, 130, True, 3)
    x = torch.randn(2, 96)
    fast = cls.from_linear(lin)
    use_kernels(monkeypatch, "generic")
    slow = cls.from_linear(lin)
    assert fast.kernel != "generic" and slow.kernel == "generic"
    assert torch.equal(fast.dense_weight(), slow.dense_weight())
    for rows in (x[:1], x):
        assert torch.allclose(fast(rows), slow(rows), atol=float(bf16_bound(rows, fast.dense_weight().float()).max()))


def test_packed_layout_is_the_kernels_own():
    codes = torch.randint(0, 16, (192, 96), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert layout() is not None
    assert torch.equal(pack_rows(codes), packed) and torch.equal(unpack_rows(packed), codes.to(torch.uint8))


@pytest.mark.parametrize("tiles", [(64, True), (32, True), (32, False), (16, False)])
def test_every_layout_packs_as_it_says_and_back(tiles):
    tile, split = tiles
    codes = torch.randint(0, 16, (128, 64), dtype=torch.uint8)
    packed = pack_rows(codes, tiles)
    low, high = (0, tile // 2) if split else (0, 1)  # byte 0 of tile 0, column 0: these two rows
    assert packed[0, 0] == codes[low, 0] | codes[high, 0] << 4
    assert torch.equal(unpack_rows(packed, tiles), codes)
    rows = torch.tensor([0, 1, tile // 2, tile - 1, tile, 127])
    assert torch.equal(unpack_row_ids(packed, rows, tiles), codes[rows])
    for r in rows.tolist():
        assert torch.equal(unpack_row_ids(packed, torch.tensor([r]), tiles)[0], codes[r])


# What each vector ISA's kernel makes of the layers (its packed layout differs: 64-row tiles with AVX-512, 32 with AVX2,
# pairs of adjacent rows with none), each in a process started at that level: the layers against their dense weights.
ISA_CHECK = """
import torch
from model.decoder import Linear
from model.quant import Int4Linear, Q8Linear
from model.quant.int4 import layout
torch.manual_seed(0)
lin = Linear(96, 130, True)
with torch.no_grad():
    lin.weight.copy_(torch.randn(96, 130) * 0.1)
    lin.bias.copy_(torch.randn(130))
x = torch.randn(3, 96)
for cls in (Int4Linear, Q8Linear):
    q = cls.from_linear(lin)
    ref = x @ q.dense_weight() + lin.bias
    err = (q(x) - ref).abs().max().item()
    assert q.kernel == "int4pack" and err < 0.05 * ref.abs().max().item(), (cls.__name__, err)
print(torch.backends.cpu.get_cpu_capability(), layout())
"""


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_the_layers_are_right_at_every_vector_isa(isa):
    import os
    import subprocess
    import sys

    env = {**os.environ, "ATEN_CPU_CAPABILITY": isa}
    run = subprocess.run([sys.executable, "-c", ISA_CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[0] == isa.upper()


def test_blocks_round_trip_through_their_file(tmp_path):
    w = torch.randn(64, 96)
    blocks = {"a": q4_1_rtn(w), "b": q8_0_rtn(w), "c": Blocks("q4_0", q4_1_rtn(w).codes, q4_1_rtn(w).scale), "d": u8_rtn(w)}
    save_blocks(blocks, tmp_path / "b.safetensors")
    back = load_blocks(tmp_path / "b.safetensors")
    for k, b in blocks.items():
        assert back[k].kind == b.kind and torch.equal(back[k].codes, b.codes) and torch.equal(back[k].scale, b.scale)
        assert torch.equal(back[k].dequantize(), b.dequantize())


# --- GGUF blocks: the file's codes, bit for bit -----------------------------------------------------


def tiny_quantized_gguf(tmp_path: Path, qtype: Q, tie: bool = True) -> tuple[Path, dict[str, np.ndarray]]:
    """A tiny Llama GGUF with 2-D weights in `qtype` and the embedding in Q8_0 (as the default model has it);
    what the gguf package dequantizes each weight to, by HF name."""
    tk = train_tokenizer("gpt2")
    model = tiny_hf_model("llama", tk, tie=tie, hidden=128, inter=192)
    cfg = model.config
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    tensors = hf_to_gguf_tensors("llama", state, cfg, qtype)
    tensors = [(n, gguf.quants.quantize(state["model.embed_tokens.weight"], Q.Q8_0), Q.Q8_0) if n == "token_embd.weight" else (n, d, t) for n, d, t in tensors]
    path = write_gguf(tmp_path / "m.gguf", "llama", model_metadata("llama", cfg, tk), tensors)
    return path, state


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q4_0], ids=lambda q: q.name)
def test_gguf_blocks_are_the_files_own_bit_for_bit(tmp_path, qtype):
    path, _ = tiny_quantized_gguf(tmp_path, qtype)
    out = convert_gguf(path, tmp_path / "model")
    assert (out / BLOCKS_FILE).is_file() and blocks_file(out) == out / BLOCKS_FILE
    from safetensors.torch import load_file

    dense = load_file(out / "model.safetensors")  # what the gguf package dequantized, Q/K un-permuted
    blocks = load_blocks(out / BLOCKS_FILE)
    assert set(blocks) == {k for k, v in dense.items() if v.ndim == 2}
    for name, b in blocks.items():
        assert b.kind == ("q8_0" if name == "model.embed_tokens.weight" else qtype.name.lower())
        assert torch.equal(b.dequantize(), dense[name]), name  # bit for bit in float32

    float_model = load_model(out)
    model = load_model(out)
    used = quantize(model, "int4", blocks)
    assert used == {"Int4Linear:int4pack": 4 * 2, "Q8Linear:int4pack": 1}
    for name, a in float_model.named_modules():
        if isinstance(a, Linear):  # the quantized model's weights are exactly the file's
            assert torch.equal(model.get_submodule(name).dense_weight(), a.dense_weight()), name
    for i in range(2):  # and the codes are the file's own
        assert torch.equal(model.layers[i].attn.o.codes(), blocks[f"model.layers.{i}.self_attn.o_proj.weight"].codes)
        assert torch.equal(model.layers[i].mlp.down.codes(), blocks[f"model.layers.{i}.mlp.down_proj.weight"].codes)
    # the 4-bit layers keep no exact scales resident (dense_weight read them from the file above); the 8-bit head does
    assert all(m.scale16 is None and m.offset16 is None for m in model.modules() if isinstance(m, Int4Linear))
    assert model.lm_head.scale16 is not None
    # a blocks file changed since the model was loaded: one clear error, not other scales under these codes
    (out / BLOCKS_FILE).write_bytes((out / BLOCKS_FILE).read_bytes())
    with pytest.raises(AttnError, match="cannot read .*o_proj.weight's exact scales again .*changed since"):
        model.layers[0].attn.o.dense_weight()


def test_blocks_file_is_written_on_first_use_for_older_conversions(tmp_path):
    path, _ = tiny_quantized_gguf(tmp_path, Q.Q4_1)
    out = convert_gguf(path, tmp_path / "model")
    (out / BLOCKS_FILE).unlink()
    assert blocks_file(out) == out / BLOCKS_FILE
    (out / BLOCKS_FILE).unlink()
    (out / "model.gguf").unlink()
    assert blocks_file(out) is None  # no source: int4 quantizes the float weights instead


def test_quantized_model_logits_stay_close_to_float(tmp_path):
    path, _ = tiny_quantized_gguf(tmp_path, Q.Q4_1)
    out = convert_gguf(path, tmp_path / "model")
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    ref = load_model(out)
    ref.setup_cache(32)
    want = ref(ids, 0)
    for mode, blocks in (("int4", load_blocks(out / BLOCKS_FILE)), ("int4", None), ("int8", None)):
        model = load_model(out)
        quantize(model, mode, blocks)
        model.setup_cache(32)
        got = model(ids, 0)
        # The file's own codes differ from float32 only by the bfloat16 rounding of activations and scales.
        tol = 0.05 if blocks is not None else 0.5
        assert (got - want).abs().max().item() <= tol * want.abs().max().item(), (mode, blocks is not None)
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
        model.setup_cache(32)  # the one-token step after a cached prefix agrees with the full pass
        model(ids[:, :11], 0)  # (within bfloat16 rounding: one row and several take different kernels)
        assert (model.step(ids[:, 11:12], 11)[0, -1] - got[0, 11]).abs().max().item() <= 0.02 * got.abs().max().item()


# --- the microscope on a quantized model -------------------------------------------------------------


def test_inspect_and_explain_say_the_weights_are_quantized(attn, tiny_llama):
    import json

    for cmd in ("inspect", "explain"):
        r = attn([cmd, "-m", str(tiny_llama), "--raw", "--quantize", "int4", "-l", "1", "--head", "0", "--format", "json", "hello world"])
        assert r.code == 0, r
        assert json.loads(r.out)["quantize"] == "int4"
        assert "weights quantized (int4)" in r.err
        plain = attn([cmd, "-m", str(tiny_llama), "--raw", "-l", "1", "--head", "0", "--format", "json", "hello world"])
        assert "quantize" not in json.loads(plain.out)


@pytest.mark.slow
def test_real_model_attention_under_quantization_stays_within_the_stated_tolerance(real_model_dir):
    """README, Performance: every attention weight of every layer and head, for every token of the demo
    sentence, within 0.06 (int4, the GGUF's codes; measured 0.040) and 0.08 (int8; measured 0.052) of float32's."""
    from model.probe import capture
    from model.tokenizer import Tokenizer

    ids = Tokenizer(real_model_dir).encode("a fluffy blue creature roamed the verdant forest")
    ref = load_model(real_model_dir)
    L, H = ref.cfg.n_layers, ref.cfg.n_heads
    want = [capture(ref, ids, q, list(range(L)), list(range(H))) for q in range(len(ids))]
    for mode, bound in (("int4", 0.06), ("int8", 0.08)):
        model = load_model(real_model_dir)
        quantize(model, mode, load_blocks(blocks_file(real_model_dir)) if mode == "int4" else None)
        for q, ref_cap in enumerate(want):
            got = capture(model, ids, q, list(range(L)), list(range(H)))
            worst = max((got.layers[i].weights - ref_cap.layers[i].weights).abs().max().item() for i in range(L))
            assert worst <= bound, (mode, q, worst)


@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("ahead", [False, True], ids=["torch.compile", "aoti"])
def test_compiled_quantized_step_gives_the_eager_tokens(tiny_llama, mode, ahead, tmp_path, monkeypatch):
    """The compiled step (torch.compile, and the ahead-of-time package --compile builds) calls the same int4pack
    products on the same packed codes; greedy tokens stay the eager ones. (Lanes off, as on CPUs beyond AVX2: with
    them, test_compiled_step_through_lanes_follows_the_exact_weights.)"""
    from model.compile import CompileFailed, compile_decode_step
    from model.generate import generate
    from model.sampling import SamplingSettings

    monkeypatch.setenv("ATTN_LANES", "0")

    greedy = SamplingSettings(temperature=0)
    eager = load_model(tiny_llama)
    quantize(eager, mode)
    prompt = list(range(5, 13))
    want = [s.id for s in generate(eager, prompt, 16, greedy)]
    model = load_model(tiny_llama)
    quantize(model, mode)
    try:
        compile_decode_step(model, len(prompt) + 16, cache_dir=tmp_path if ahead else None)
    except CompileFailed as e:
        pytest.skip(f"torch.compile unavailable here: {e}")
    assert type(model.decode_step).__name__ == ("AotStep" if ahead else "InductorStep")
    assert [s.id for s in generate(model, prompt, 16, greedy)] == want


@pytest.mark.parametrize("amx", [True, False])
def test_cpu_features_name_amx_where_torch_finds_its_tiles(monkeypatch, amx):
    """`attn bench` and the package keys say "+ AMX" exactly where torch's probe finds AMX tiles (torch 2.13
    probes in torch.cpu; the probe in torch._C._cpu that attn read before is gone, so AMX machines read none)."""
    from model.quant.kernels import cpu_features

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert cpu_features() == torch.backends.cpu.get_cpu_capability() + (" + AMX" if amx else "")


def test_a_kernel_whose_layout_attn_does_not_know_is_not_used(monkeypatch):
    import model.quant.int4 as int4

    lin = float_linear(96, 130, True, 5)
    monkeypatch.setattr(int4, "layout", lambda: None)
    q = Int4Linear.from_linear(lin)
    assert q.kernel == "generic"
    x = torch.randn(2, 96)
    assert torch.allclose(q(x), x @ q.dense_weight() + lin.bias, atol=1e-4)


# --- the lanes layout: the compiled step's one-row products over 8-bit groups (model/quant/lanes.py) ---------

WIDTHS = [8, 16]  # rows a word position holds: Vectorized<float>'s width with AVX2 and with AVX-512 (lanes._width)


@pytest.mark.parametrize("level,width", [("AVX2", 8), ("AVX512", 16), ("DEFAULT", 8)])
def test_lanes_words_hold_as_many_rows_as_a_vector_has_floats(monkeypatch, level, width):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: level)
    assert lanes_layout._width() == width


@pytest.mark.parametrize("vendor,want", [("AuthenticAMD", True), ("GenuineIntel", False)])
def test_a_prompts_rows_go_through_onednn_on_amd_cpus(monkeypatch, vendor, want):
    from model.quant import kernels

    monkeypatch.setattr(kernels, "cpuinfo", lambda field: vendor if field == "vendor_id" else None)
    has = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    assert lanes_layout.prompt_through_onednn() == (want and has)


@pytest.mark.parametrize("level,amx,want4,want8", [("AVX2", False, True, True), ("AVX512", False, False, True), ("AVX512", True, False, False), ("DEFAULT", False, False, False)])
def test_lanes_are_wanted_by_the_vector_isa_and_the_bits(monkeypatch, level, amx, want4, want8):
    """AVX2: 4- and 8-bit layers; AVX-512: 8-bit only (int4pack is faster for 4-bit codes there); AMX: neither."""
    from model.quant import kernels

    monkeypatch.delenv("ATTN_LANES", raising=False)
    monkeypatch.delenv("ATTN_KERNELS", raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: level)
    monkeypatch.setattr(kernels, "cpu_features", lambda: level + (" + AMX" if amx else ""))
    cpu = torch.device("cpu")
    assert (kernels.lanes_wanted(cpu, 4), kernels.lanes_wanted(cpu, 8)) == (want4, want8)
    monkeypatch.setenv("ATTN_LANES", "1")
    assert kernels.lanes_wanted(cpu, 4) and kernels.lanes_wanted(cpu, 8)


@settings(max_examples=20, deadline=None)
@given(rows8=st.integers(1, 6), groups=st.integers(1, 5), bits=st.sampled_from([4, 8]), seed=st.integers(0, 99))
def test_lanes_pack_and_unpack_every_code_where_the_layout_says(rows8, groups, bits, seed):
    for width in WIDTHS:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(lanes_layout, "LANES", width)
            pack_and_unpack(rows8, groups, bits, seed)


def pack_and_unpack(rows8, groups, bits, seed):
    from model.quant.lanes import LANES, pack, per_word, unpack

    N, K = rows8 * LANES, groups * GROUP
    codes = torch.randint(0, 1 << bits, (N, K), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    words = pack(codes, bits)
    P = per_word(bits)
    assert words.dtype == torch.float32 and words.shape == (N // LANES, K // P, LANES)
    assert torch.equal(unpack(words, bits), codes)
    ids = torch.tensor([0, N - 1, N // 2])
    assert torch.equal(unpack(words, bits, ids), codes[ids])
    w = words.view(torch.int32)
    for r, c, lane, j in [(0, 0, 0, 0), (N // LANES - 1, K // P - 1, LANES - 1, P - 1), (0, K // P - 1, 3, 1)]:  # word [r, c, l], code j
        assert ((w[r, c, lane] >> (bits * j)) & ((1 << bits) - 1)).item() == codes[LANES * r + lane, P * c + j].item()


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q8_0", "u8"])
def test_a_layers_lanes_copy_is_its_exact_weight(kind, width, monkeypatch):
    """add_lanes keeps the layer's own codes and exact float16 scales as w = a·u + b: dequantized, bit for bit the
    layer's dense weight; its one-row product (float32, eagerly) within float32 rounding of x @ that weight, the
    padded rows cut by the layer."""
    from model.quant.lanes import dense

    monkeypatch.setattr(lanes_layout, "LANES", width)
    w = torch.randn(37, 96, generator=torch.Generator().manual_seed(5)) * 0.1  # (out, in): 37 rows, not whole words
    blocks = {"q4_0": lambda t: Blocks("q4_0", q4_1_rtn(t).codes, q4_1_rtn(t).scale), "q4_1": q4_1_rtn, "q8_0": q8_0_rtn, "u8": u8_rtn}[kind](w)
    layer = (Int4Linear if kind.startswith("q4") else Q8Linear)(blocks, None, torch.float32, torch.device("cpu"))
    layer.add_lanes()
    lanes = layer.lanes
    assert lanes.bits == (4 if kind.startswith("q4") else 8)
    assert torch.equal(dense(lanes.words, lanes.a, lanes.b, lanes.bits)[:37], layer.dense_weight().t())
    assert torch.equal(blocks.dequantize(), layer.dense_weight().t())
    x = torch.randn(1, 96, generator=torch.Generator().manual_seed(6))
    ref = x.double() @ blocks.dequantize().double().t()
    got = lanes.row(x)[:, :37]
    assert got.shape == (1, 37) and torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert layer(x).shape == (1, 37)  # eager: the int4pack products still (not compiling)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("bits", [4, 8])
def test_lanes_product_compiled_by_inductor_equals_the_eager_one(bits, width, monkeypatch):
    """What the compiled step runs: inductor's loop over the words (with lanes.INDUCTOR), a norm before it; words of
    8 rows (AVX2's vector) and of 16 (AVX-512's)."""
    from model.quant.lanes import INDUCTOR, Lanes, row_product

    monkeypatch.setattr(lanes_layout, "LANES", width)

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (40, 64), dtype=torch.uint8, generator=g)
    a, b = torch.rand(40, 2, generator=g) * 0.01, torch.randn(40, 2, generator=g) * 0.01
    lanes = Lanes(codes, a, b, bits, torch.device("cpu"))

    def normed(x, words, a, b):
        return row_product(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5), words, a, b, bits)

    x = torch.randn(1, 64, generator=g)
    try:
        compiled = torch.compile(normed, dynamic=False, options=INDUCTOR)
        got = compiled(x, lanes.words, lanes.a, lanes.b)
    except Exception as e:  # (no C++ compiler)
        pytest.skip(f"torch.compile unavailable here: {e}")
    assert torch.allclose(got, normed(x, lanes.words, lanes.a, lanes.b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("wanted", ["1", "0"])
def test_lanes_replace_the_int4pack_codes_where_wanted_and_give_them_back(tiny_llama, monkeypatch, wanted):
    """add_lanes: every int4pack layer's codes in the lanes layout instead (the head: beside them); drop_lanes: the
    int4pack codes again, the same products as before."""
    from model.quant import add_lanes, drop_lanes, layer_kernels
    from model.quant.kernels import lanes_wanted

    monkeypatch.setenv("ATTN_LANES", wanted)
    x = torch.randn(3, 1, 512, generator=torch.Generator().manual_seed(0))
    for mode, cls in (("int8", "Q8Linear"), ("int4", "Int4Linear")):
        model = load_model(tiny_llama)
        quantize(model, mode)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, (Int4Linear, Q8Linear))}
        before = {n: (m.dense_weight().clone(), m(x[..., : m.n_in])) for n, m in layers.items()}
        added = add_lanes(model)
        kernels = layer_kernels(model)
        if wanted == "0":
            assert added == 0 and not any("lanes" in k for k in kernels)
            continue
        assert added == len(layers)
        assert kernels["Q8Linear:lanes+int4pack"] == 1  # the head keeps int4pack for eager rows
        assert kernels[f"{cls}:lanes"] == len(layers) - 1
        for n, m in layers.items():
            assert (m.q is None) == (n != "lm_head")
            assert torch.equal(m.dense_weight(), before[n][0])  # from the lanes codes: the exact weight still
            y = m(x[..., : m.n_in])  # many rows, eagerly: dequantized (no prompt package attached here)
            assert torch.allclose(y, before[n][1], atol=float(bf16_bound(x[..., : m.n_in].reshape(3, -1), before[n][0].float()).max()))
        drop_lanes(model)
        assert all(m.q is not None and m.lanes is None and m.kernel == "int4pack" for m in layers.values())
        for n, m in layers.items():
            assert torch.equal(m.dense_weight(), before[n][0])
            assert torch.equal(m(x[..., : m.n_in]), before[n][1])
    monkeypatch.setenv("ATTN_KERNELS", "generic")
    monkeypatch.setenv("ATTN_LANES", "1")
    assert not lanes_wanted(torch.device("cpu"), 4) and not lanes_wanted(torch.device("cpu"), 8)  # the generic kernel forced: nothing packed, no lanes either
    monkeypatch.delenv("ATTN_KERNELS")
    monkeypatch.delenv("ATTN_LANES")
    level = torch.backends.cpu.get_cpu_capability()
    assert lanes_wanted(torch.device("cpu"), 4) == (level == "AVX2")
    assert lanes_wanted(torch.device("cpu"), 8) == (level == "AVX2" or (level == "AVX512" and "AMX" not in cpu_features()))
    assert not lanes_wanted(torch.device("meta"), 8)


@pytest.mark.parametrize("onednn", [False, True], ids=["blas-in-package", "onednn"])
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_compiled_step_through_lanes_follows_the_exact_weights(tiny_llama, monkeypatch, mode, onednn, tmp_path):
    """With lanes (ATTN_LANES=1) the ahead-of-time step multiplies one row by every quantized layer's lanes codes
    (float32 activations, exact scales), the head folded into the packages, and the prompt's rows go through the
    prompt's package (the product inside it, or the weight from it and oneDNN's product: lanes.prompt_through_onednn):
    logits follow a float model holding exactly the quantized weights, closer than the eager int4pack path (bfloat16
    activations and scales). Greedy tokens stay the eager ones."""
    import model.compile as compiling
    from model.compile import CompileFailed, compile_decode_step

    if onednn and not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setattr(compiling, "prompt_through_onednn", lambda: onednn)
    from model.generate import generate
    from model.sampling import SamplingSettings

    monkeypatch.setenv("ATTN_LANES", "1")
    greedy = SamplingSettings(temperature=0)
    prompt = list(range(5, 13))
    eager = load_model(tiny_llama)
    quantize(eager, mode)
    exact = load_model(tiny_llama)  # the same weights, dequantized exactly, as plain float layers
    for name, q in eager.named_modules():
        if isinstance(q, (Int4Linear, Q8Linear)):
            exact.get_submodule(name).weight.data = q.dense_weight().float().contiguous()
    want = [s.id for s in generate(eager, prompt, 12, greedy)]
    model = load_model(tiny_llama)
    quantize(model, mode)
    try:
        compile_decode_step(model, len(prompt) + 16, cache_dir=tmp_path)
    except CompileFailed as e:
        pytest.skip(f"torch.compile unavailable here: {e}")
    assert model.tail_step is not None  # the 8-bit head runs in the packages through its lanes copy
    layers = [m for m in model.modules() if isinstance(m, (Int4Linear, Q8Linear))]
    assert all(m.lanes is not None for m in layers)
    assert all(m.lanes._prompt is not None and m.lanes._prompt_weight == onednn for m in layers)  # many rows: the prompt's package
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        for m in (model, eager, exact):
            m.setup_cache(32)
        rows = model.forward(ids[:, :-1])  # the prompt; its keys and values then the same in all three
        want_rows = exact.forward(ids[:, :-1])
        assert (rows - want_rows).abs().max() <= 1e-4 * want_rows.abs().max() + 1e-5  # (the head's too: many rows)
        for other in (eager, exact):
            for mine, theirs in zip(model.layers, other.layers):
                theirs.attn.cache.k.copy_(mine.attn.cache.k)
                theirs.attn.cache.v.copy_(mine.attn.cache.v)
        step = model.decode_step(ids[:, -1:], len(prompt) - 1).float()
        ref = exact.forward(ids[:, -1:], len(prompt) - 1, last_only=True).float()
        bf16 = eager.forward(ids[:, -1:], len(prompt) - 1, last_only=True).float()
    assert (step - ref).abs().max() <= 1e-4 * ref.abs().max() + 1e-5
    assert (step - ref).abs().max() < (bf16 - ref).abs().max()
    assert [s.id for s in generate(model, prompt, 12, greedy)] == want


@pytest.mark.parametrize("wanted", ["1", "0"])
def test_pull_builds_the_prompt_packages_where_lanes_are_wanted(monkeypatch, tmp_path, wanted):
    """`attn pull`'s last stage builds the two prompt packages (4 and 8 bits, any model) where a compiled quantized step
    would read lanes codes, so that a first `--quantize … --compile` need not; a failure is one warning line."""
    import model.compile
    from cli import speed

    monkeypatch.setenv("ATTN_LANES", wanted)
    monkeypatch.setenv("ATTN_HOME", str(tmp_path))
    asked = []
    monkeypatch.setattr(model.compile, "prompt_package", lambda folder, bits: asked.append((folder, bits)) or (folder / f"p{bits}", True))
    speed.prepare_prompts(quiet=True)
    assert asked == ([(tmp_path / "aoti", 4), (tmp_path / "aoti", 8)] if wanted == "1" else [])

    def fails(folder, bits):
        raise RuntimeError("no C++ compiler\nmore")

    monkeypatch.setattr(model.compile, "prompt_package", fails)
    notes = []
    monkeypatch.setattr(speed, "note", lambda text, quiet=False: notes.append(text))
    speed.prepare_prompts()
    assert notes == (["warning: the prompt's 4-bit package was not built (no C++ compiler)"] if wanted == "1" else [])


# --- CUDA: int4 through ATen's tinygemm; int8 refused there ------------------------------------------

on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="tinygemm needs a GPU (run on the device machine)")


def test_int4_on_cuda_chooses_tinygemm_and_the_generic_kernel_when_forced(monkeypatch):
    from model.quant.kernels import int4_kernel

    assert int4_kernel(torch.device("cuda")) == ("tinygemm" if hasattr(torch.ops.aten, "_weight_int4pack_mm") else "generic")
    use_kernels(monkeypatch, "generic")
    assert int4_kernel(torch.device("cuda")) == "generic"


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_on_cuda_is_refused_in_one_line_until_it_beats_bfloat16_there(attn, tiny_llama, monkeypatch, mode):
    """int8: ATen's 8-bit products measured 8× slower than bfloat16's on an H200; int4's compiled step measured slower
    there too (model/quant/kernels.CUDA_MODES)."""
    import cli.models

    monkeypatch.setattr(cli.models, "pick_device", lambda spec: torch.device("cuda"))
    r = attn(["generate", "-m", str(tiny_llama), "--device", "cuda", "--quantize", mode, "-n", "2", "hi"])
    assert r.code == 1 and r.out == ""
    assert r.err == f"attn: error: --quantize {mode} runs on the CPU only; on cuda use --dtype bfloat16\n"


@on_gpu
@pytest.mark.parametrize("cls", [Int4Linear, Q8Linear])
def test_cuda_layers_multiply_by_their_own_codes(cls):
    lin = float_linear(200, 130, True, 5).to("cuda")
    q = cls.from_linear(lin)
    assert q.kernel == "tinygemm" and q.q.tiles is not None
    x = torch.randn(3, 200, device="cuda")
    for rows in (x[:1], x):
        ref = rows @ kernel_weight(q) + lin.bias.detach()
        bound = sum(bf16_bound(rows, w) for w in kernel_products(q))
        assert ((q(rows) - ref).abs() <= bound + 1e-4).all()
    dense = q.dense_weight().float()
    assert torch.equal(q.columns(torch.tensor([[0]], device="cuda"))[0, 0], dense.t()[0])


@on_gpu
def test_cuda_int4_model_follows_the_cpu_one_and_its_graph_step_the_eager_tokens(tiny_llama):
    from model.compile import compile_decode_step
    from model.generate import generate
    from model.sampling import SamplingSettings

    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    cpu = load_model(tiny_llama)
    quantize(cpu, "int4")
    cpu.setup_cache(32)
    want = cpu(ids, 0)

    def gpu_model():
        m = load_model(tiny_llama, torch.bfloat16, torch.device("cuda"))
        quantize(m, "int4")
        return m

    model = gpu_model()
    model.setup_cache(32)
    got = model(ids.cuda(), 0).float().cpu()
    # Beside the products (bfloat16 activations on both), CUDA runs the rest in bfloat16: bound the difference by
    # what bfloat16 alone changes in the unquantized model, twice over.
    ref, plain = load_model(tiny_llama), load_model(tiny_llama, torch.bfloat16, torch.device("cuda"))
    for m in (ref, plain):
        m.setup_cache(32)
    drift = (plain(ids.cuda(), 0).float().cpu() - ref(ids, 0)).abs().max().item()
    diff = (got - want).abs().max().item()
    assert diff <= 2 * drift + 0.01 * want.abs().max().item(), (diff, drift, want.abs().max().item())
    greedy = SamplingSettings(temperature=0)
    prompt = list(range(5, 13))
    eager = [s.id for s in generate(gpu_model(), prompt, 16, greedy)]
    graphed = gpu_model()
    compile_decode_step(graphed, len(prompt) + 16)
    assert type(graphed.decode_step).__name__ == "GraphStep" and graphed.decode_step.inductor
    assert [s.id for s in generate(graphed, prompt, 16, greedy)] == eager


int4_on_cuda = pytest.mark.skipif("int4" not in CUDA_MODES, reason="--quantize int4 is refused on CUDA until it beats bfloat16 there")


@on_gpu
@int4_on_cuda
def test_cuda_int4_from_a_gguf_keeps_its_codes_and_follows_the_cpu(tmp_path):
    """The command line's path (open_model): the file's own Q4_1 codes, in tinygemm's tiles, logits close to the CPU's."""
    from cli.common import Dtype
    from cli.models import open_model

    path, _ = tiny_quantized_gguf(tmp_path, Q.Q4_1)
    out = convert_gguf(path, tmp_path / "model")
    cpu = open_model(str(out), "cpu", Dtype.auto, quiet=True, quantize="int4")
    gpu = open_model(str(out), "cuda", Dtype.auto, quiet=True, quantize="int4")
    assert gpu.dtype == torch.bfloat16 and any(k.endswith(":tinygemm") for k in gpu.kernels), gpu.kernels
    mine = dict(gpu.model.named_modules())
    for name, layer in cpu.model.named_modules():
        if isinstance(layer, Int4Linear):
            assert torch.equal(mine[name].q.codes().cpu(), layer.q.codes()), name
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    for m in (cpu, gpu):
        m.model.setup_cache(32)
    want = cpu.model(ids, 0)
    got = gpu.model(ids.cuda(), 0).float().cpu()
    assert (got - want).abs().max().item() <= 0.05 * want.abs().max().item()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


@on_gpu
@int4_on_cuda
def test_cuda_int4_generates_from_the_command_line_and_its_graph_step_the_same_tokens(attn, tiny_llama):
    import json

    args = ["generate", "-m", str(tiny_llama), "--device", "cuda", "--quantize", "int4", "--raw", "--temp", "0", "--ignore-eos", "-n", "24", "--json", "hello world"]
    eager, graphed = attn(args + ["--no-compile"]), attn(args + ["--compile"])
    assert eager.code == 0 and graphed.code == 0, (eager.err, graphed.err)
    assert "Traceback" not in eager.err + graphed.err and "warning" not in graphed.err, graphed.err
    assert json.loads(eager.out)["text"] == json.loads(graphed.out)["text"]


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_quantized_step_traces_as_one_graph(tiny_llama, mode):
    """CUDA's GraphStep compiles the step with fullgraph=True and, when that fails, quietly captures the eager step
    instead (measured on an H200: 430 tok/s against 772 for bfloat16's compiled step). Nothing in a quantized layer may
    break the graph: the tied head's columns read int4.layout(), whose probe dynamo traced through its cache. Traced
    here on the CPU with dynamo's eager backend (no inductor, no GPU)."""
    from tests.test_fastpaths import assert_step_traces_whole

    model = load_model(tiny_llama)
    quantize(model, mode)
    assert_step_traces_whole(model)
