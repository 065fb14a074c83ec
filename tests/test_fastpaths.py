"""Every fast path gives the reference's greedy tokens on tiny random models.

The reference is the float32 eager path (itself pinned to transformers by test_parity.py).
Tolerances, documented in README (Performance) and model/quant/q8.py:
- fused q|k|v and gate|up weights, compiled step: the same greedy tokens, logits within 1e-4;
- bfloat16 and int8 weights change the numbers: teacher-forced top-1 agreement with float32 of
  at least 90% on these tiny models (SmolLM2-135M measures 97% for bfloat16, 96% for int8 over
  a 512-token text: `attn bench --quantize int8 --json`), and their own greedy decoding equals
  their own full recompute (the cache and the one-token step add no error of their own).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.decoder import Decoder
from model.generate import generate
from model.loading import load_model
from model.quant import Q8Linear, quantize_int8
from model.sampling import SamplingSettings
from tests.conftest import FAMILY_KINDS, KINDS

GREEDY = SamplingSettings(temperature=0)


def prompt_for(model, T: int = 8, seed: int = 2) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.cfg.vocab_size, (T,), generator=g).tolist()


def greedy(model, prompt: list[int], n: int = 24) -> list[int]:
    return [s.id for s in generate(model, prompt, n, GREEDY)]


def recompute_greedy(model, prompt: list[int], n: int = 24) -> list[int]:
    """Greedy decoding by full recompute of the whole sequence each step: no cache, no one-token step."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            model.setup_cache(len(ids))
            ids.append(int(model(torch.tensor([ids]), 0)[0, -1].float().argmax()))
    return ids[len(prompt) :]


def assert_same_greedy_but_for_ties(model, prompt: list[int], rel: float) -> None:
    """Cached decoding gives full recompute's greedy tokens, except where the two picks' logits (full recompute's)
    lie within `rel` of each other — a tie in the dtype's rounding — after which the two sequences may go apart."""
    cached, full = greedy(model, prompt), recompute_greedy(model, prompt)
    first = next((i for i, (a, b) in enumerate(zip(cached, full)) if a != b), None)
    if first is None:
        return
    ids = prompt + full[:first]
    with torch.inference_mode():
        model.setup_cache(len(ids))
        logits = model(torch.tensor([ids]), 0)[0, -1].float()
    a, b = logits[cached[first]].item(), logits[full[first]].item()
    assert abs(a - b) <= rel * max(abs(a), abs(b)), (first, cached[first], full[first], a, b)


def top1_agreement(a, b, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        a.setup_cache(ids.shape[1])
        b.setup_cache(ids.shape[1])
        return (a(ids, 0).argmax(-1) == b(ids, 0).argmax(-1)).float().mean().item()


@pytest.mark.parametrize("kind", KINDS)
def test_fused_weights_decode_equals_full_recompute(tiny_models, kind):
    model = load_model(tiny_models[kind][0])
    prompt = prompt_for(model)
    assert greedy(model, prompt) == recompute_greedy(model, prompt)


@pytest.mark.parametrize("kind", ["llama", "llama_mha", "gpt2", *FAMILY_KINDS])
def test_int8_top1_agreement_and_own_decoding(tiny_models, kind):
    path = tiny_models[kind][0]
    ref = load_model(path)
    q = quantize_int8(load_model(path))
    assert not any(type(m).__name__ == "Linear" for m in q.modules())
    ids = torch.tensor([prompt_for(ref, T=48, seed=5)])
    assert top1_agreement(q, ref, ids) >= 0.9
    prompt = prompt_for(ref)
    assert greedy(q, prompt) == recompute_greedy(q, prompt)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma2", "olmo2"])  # gemma2, olmo2: their norms' float32 weighting, caps
def test_bfloat16_top1_agreement_and_own_decoding(tiny_models, kind):
    path = tiny_models[kind][0]
    ref = load_model(path)
    bf = load_model(path, torch.bfloat16)
    ids = torch.tensor([prompt_for(ref, T=48, seed=5)])
    assert top1_agreement(bf, ref, ids) >= 0.9
    # The one-row products and the many-row ones round differently in bfloat16 (without AVX-512's bfloat16 they take
    # other kernels: on an AVX2 Zen3, gpt2's step 10 picks 164 at 2.359 where full recompute picks 271 at 2.375, one
    # bfloat16 step apart; float32 has them 0.002 apart): a pick two bfloat16 steps (2⁻⁷ relative) apart or closer is a tie.
    assert_same_greedy_but_for_ties(bf, prompt_for(ref), rel=2**-6)


def test_int8_linear_dense_weight_and_tied_embedding(tiny_models):
    ref = load_model(tiny_models["llama"][0])  # tied: the head's matrix is also the embedding
    w_o = ref.layers[0].attn.o.dense_weight().clone()
    head = ref.lm_head.weight.clone()
    q = quantize_int8(ref)
    o = q.layers[0].attn.o
    assert isinstance(o, Q8Linear)
    # Per group of 32 inputs of an output, the error is at most half a step of (max − min)/255 (+ float16 rounding).
    g = w_o.t().reshape(w_o.shape[1], -1, 32)  # (out, groups, 32)
    step = ((g.amax(-1) - g.amin(-1)) / 255).repeat_interleave(32, dim=1).t()  # (in, out)
    assert ((o.dense_weight() - w_o).abs() <= step * 0.51 + 2e-3 * w_o.abs() + 1e-6).all()
    assert o.weight.shape == w_o.shape and o.dense_weight().dtype == torch.float32
    ids = torch.tensor([[3, 7, 11]])
    assert torch.allclose(q.embed(ids), q.lm_head.dense_weight().t()[ids])
    assert (q.embed(ids) - head.t()[ids]).abs().max() <= (head.max() - head.min()) / 255


def test_compiled_step_gives_the_same_tokens(tiny_models):
    from model.compile import CompileFailed, compile_decode_step

    path = tiny_models["llama"][0]
    eager = load_model(path)
    prompt = prompt_for(eager)
    want = greedy(eager, prompt, 16)
    model = load_model(path)
    try:
        seconds = compile_decode_step(model, len(prompt) + 16)
    except CompileFailed as e:  # e.g. no C++ compiler: the fallback is eager, which is tested above
        pytest.skip(f"torch.compile unavailable here: {e}")
    assert seconds > 0 and model.decode_step is not None
    assert greedy(model, prompt, 16) == want
    # A longer generation replaces the cache: the step is built again for it, and the tokens stay the same.
    assert greedy(model, prompt, 40) == greedy(eager, prompt, 40)
    # A one-token prompt: the first step is at position 1, which the graph built at 2 also serves.
    assert greedy(model, prompt[:1], 16) == greedy(eager, prompt[:1], 16)


@pytest.mark.parametrize("kind", KINDS)
def test_one_token_step_equals_forward(tiny_models, kind):
    """Decoder.step (generation's hot loop) gives Decoder.forward's one-token logits at every position."""
    model = load_model(tiny_models[kind][0])
    prompt = prompt_for(model)
    n = 12
    ids = list(prompt)
    with torch.inference_mode():
        model.setup_cache(len(prompt) + n)
        model(torch.tensor([prompt[:-1]]), 0)
        for pos in range(len(prompt) - 1, len(prompt) - 1 + n):
            x = torch.tensor([[ids[-1]]])
            want = model(x, pos, last_only=True)  # (1, 1, V); writes this position's K, V
            got = model.step(x, pos)  # writes the same K, V again
            assert got.shape == want.shape
            assert (got - want).abs().max().item() <= 1e-5
            ids.append(int(got[0, -1].argmax()))
    assert ids[len(prompt) :] == recompute_greedy(model, prompt, n)


@pytest.mark.parametrize("kind", KINDS)
def test_static_shape_step_equals_forward(tiny_models, kind):
    """The step at a device-held position (whole cache read, later keys masked: what a CUDA graph
    replays) gives the same logits as forward, and leaves the same cache, on a stale cache too."""
    model = load_model(tiny_models[kind][0])
    prompt = prompt_for(model)
    n = 10
    ids = list(prompt)
    with torch.inference_mode():
        model.setup_cache(len(prompt) + n + 4)
        for layer in model.layers:  # garbage past the filled prefix must be masked, not read
            layer.attn.cache.k.normal_()
            layer.attn.cache.v.normal_()
        model(torch.tensor([prompt[:-1]]), 0)
        for pos in range(len(prompt) - 1, len(prompt) - 1 + n):
            x = torch.tensor([[ids[-1]]])
            want = model(x, pos, last_only=True)
            k_want = model.layers[-1].attn.cache.k[:, :, : pos + 1].clone()
            got = model.step(x, torch.tensor([pos]))
            assert (got - want).abs().max().item() <= 1e-5
            assert torch.allclose(model.layers[-1].attn.cache.k[:, :, : pos + 1], k_want, atol=1e-5)
            ids.append(int(got[0, -1].argmax()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device machine)")
@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2", "every_variant"])
def test_cuda_graph_step_gives_the_same_tokens(tiny_models, kind):
    from model.compile import compile_decode_step

    def load():
        if kind == "every_variant":
            return every_block_variant().to("cuda")
        return load_model(tiny_models[kind][0], torch.float32, torch.device("cuda"))

    eager = load()
    prompt = prompt_for(eager)
    want = greedy(eager, prompt, 16)
    model = load()
    compile_decode_step(model, len(prompt) + 16)
    assert greedy(model, prompt, 16) == want
    assert greedy(model, prompt, 40) == greedy(eager, prompt, 40)  # a longer cache: captured again


def every_block_variant() -> Decoder:
    """A random model with every block variant the families add at once (each is pinned to transformers
    by its family's parity tests): window and local-RoPE layers, partial rotary, q/k norm over the
    projection, scores scaled and soft-capped, post norms of (1 + w), parallel residual, GeGLU, scaled
    embeddings, capped logits. One layer, one compile covers them all (compiling is the slow part)."""
    cfg = ModelConfig(
        model_type="every_variant", vocab_size=97, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96,
        max_len=128, norm_eps=1e-6, norm="rms", mlp="gated", act="gelu_tanh", positions="rope", tie_embeddings=True,
        rotary_dim=8, local_rope_theta=10000.0, layer_windows=[5], post_norm=True, parallel_residual=True,
        norm_offset=1.0, norm_weight_in_float32=True, qk_norm="flat", query_pre_attn_scalar=20.0, attn_softcap=1.5,
        logit_softcap=4.0, embed_scale=8.0,
    )
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    return model


@pytest.mark.parametrize("ahead", [False, True], ids=["torch.compile", "aoti"])
def test_compiled_step_covers_every_block_variant(ahead, tmp_path):
    from model.compile import CompileFailed, compile_decode_step

    model = every_block_variant()
    # The head in (out, in) storage, as the CLI loads it: the ahead-of-time packages take it in (its logits capped after).
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().t().contiguous().t(), requires_grad=False)
    prompt = prompt_for(model)
    want = greedy(model, prompt, 12)  # past the window of 5: one exported step serves both sides of it
    assert want == recompute_greedy(model, prompt, 12)
    try:
        compile_decode_step(model, len(prompt) + 12, cache_dir=tmp_path if ahead else None)
    except CompileFailed as e:
        pytest.skip(f"torch.compile unavailable here: {e}")
    assert type(model.decode_step).__name__ == ("AotStep" if ahead else "InductorStep")
    assert (model.tail_step is not None) == ahead
    assert greedy(model, prompt, 12) == want


@pytest.mark.parametrize("one_row", ["reduce", "blas"])
def test_the_head_runs_in_the_packages_where_it_is_a_float_matrix(tiny_models, monkeypatch, one_row):
    """The final norm and head go into the ahead-of-time packages when the head is a float matrix without a bias,
    stored as the compiled one-row products read it (kernels.one_row_kernel): (out, in) for inductor's reduction
    (a packed tied head once unpacked is its own rows again, shared with the embedding: no copy), (in, out) for
    BLAS. Quantized heads keep the eager head."""
    from model.compile import _foldable_head
    from model.quant import unpack

    monkeypatch.setenv("ATTN_ONE_ROW", one_row)
    path = tiny_models["llama"][0]  # tied
    packed = packed_model(path)
    rows = packed.lm_head.rows
    unpack(packed)
    head = _foldable_head(packed)
    if one_row == "reduce":
        assert head.data_ptr() == rows.data_ptr()
    else:
        assert head.is_contiguous() and torch.equal(head, rows.t())
    assert torch.equal(packed.embed(torch.tensor([[5, 9]])), rows[[5, 9]][None])
    rows = load_model(path, out_in=True)
    assert _foldable_head(rows) is rows.lm_head.weight
    assert _foldable_head(load_model(path)) is not None  # (in, out) contiguous
    assert _foldable_head(quantize_int8(load_model(path))) is None


@pytest.mark.parametrize("ahead", [False, True], ids=["torch.compile", "aoti"])
def test_compiled_blocks_keep_each_layers_own_constants(tiny_models, monkeypatch, ahead, aot_dir):
    """Blocks share compiled code: torch.compile runs of blocks (here one block a run) through one graph, the
    ahead-of-time step one package per kind of block. Blocks whose constants differ (Gemma 3: sliding-window
    layers with their own RoPE table between global ones) must not run another's code. Logits at every
    position, past the window too, equal eager's."""
    from model import compile as compile_mod
    from model.compile import CompileFailed, compile_decode_step

    monkeypatch.setattr(compile_mod, "RUN", 1)

    path = tiny_models["gemma3"][0]
    eager, model = load_model(path), load_model(path)
    kinds = {(b.attn.window, b.attn.rope_index) for b in eager.layers}
    assert len(kinds) == 2
    prompt = prompt_for(eager)
    n = 16
    try:
        compile_decode_step(model, len(prompt) + n, cache_dir=aot_dir if ahead else None)
    except CompileFailed as e:
        pytest.skip(f"torch.compile unavailable here: {e}")
    if ahead:
        assert len(model.decode_step.built) == len(kinds)  # a package for each kind of block
    assert model.block_steps is not None
    eager.setup_cache(len(prompt) + n)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        token = int(eager(torch.tensor([prompt]), 0)[0, -1].argmax())
        model(torch.tensor([prompt]), 0)
        for pos in range(len(prompt), len(prompt) + n):
            x = torch.tensor([[token]])
            want, got = eager.step(x, pos), model.decode_step(x, pos)
            assert (got - want).abs().max().item() <= 1e-4, pos
            token = int(want[0, -1].argmax())
    # Not a graph per position: past its window a windowed layer takes another branch (one graph more), and a
    # position where a size meets a static one (16·(p + 1) = 384 here) can cost one recompile.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs <= 3


def test_compiled_blocks_serve_a_batch(tiny_models):
    """A batch steps its rows at their own positions (a position tensor) through the same compiled blocks:
    every row's greedy tokens equal the eager batch's, with refills."""
    from model.compile import CompileFailed, compile_decode_step

    path = tiny_models["qwen2_window"][0]
    eager, model = load_model(path), load_model(path)
    g = torch.Generator().manual_seed(4)
    ps = [torch.randint(3, eager.cfg.vocab_size, (n,), generator=g).tolist() for n in [3, 11, 1, 9, 6]]
    try:
        compile_decode_step(model, 32)
    except CompileFailed as e:
        pytest.skip(f"torch.compile unavailable here: {e}")

    assert batch_tokens(model, ps, [7, 4, 9, 2, 6]) == batch_tokens(eager, ps, [7, 4, 9, 2, 6])


def batch_tokens(model, prompts: list[list[int]], lengths: list[int]) -> list[list[int]]:
    """Each prompt's greedy tokens, decoded as one batch of 3 slots (refilled as rows finish)."""
    from model.generate import Sequence, decode
    from model.sampling import SamplingSettings

    seqs = [Sequence(p, n, SamplingSettings(temperature=0)) for p, n in zip(prompts, lengths)]
    out: dict[int, list[int]] = {id(s): [] for s in seqs}
    for seq, step in decode(model, seqs, slots=3, max_len=32):
        out[id(seq)].append(step.id)
    return [out[id(s)] for s in seqs]


def test_compiled_step_that_cannot_be_rebuilt_goes_on_eager(tiny_models, monkeypatch):
    """A longer generation needs the step built again; if that fails, generation finishes eager."""
    from model import compile as compile_mod

    path = tiny_models["llama"][0]
    eager = load_model(path)
    prompt = prompt_for(eager)
    model = load_model(path)
    try:
        compile_mod.compile_decode_step(model, len(prompt) + 4)
    except compile_mod.CompileFailed as e:
        pytest.skip(f"torch.compile unavailable here: {e}")

    def broken(self):  # runs the step (writing positions 1, 2 of the cache), then fails
        self.model.step(self.ids, 1)
        self.model.step(self.ids, 2)
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(compile_mod.InductorStep, "build", broken)
    assert greedy(model, prompt, 20) == greedy(eager, prompt, 20)
    assert model.decode_step is None


def test_quantization_finds_every_linear_layer_by_walking_the_model(tiny_models):
    """No fixed list of parents: a projection a family adds anywhere is quantized too."""
    from model.decoder import Linear
    from model.quant import Q8Linear, quantize_int8

    model = load_model(tiny_models["llama"][0])
    model.layers[0].extra = Linear(8, 8, bias=True)  # e.g. a new family's projection
    torch.nn.init.normal_(model.layers[0].extra.weight)
    torch.nn.init.normal_(model.layers[0].extra.bias)
    quantize_int8(model)
    assert not any(isinstance(m, Linear) for m in model.modules())
    assert sum(isinstance(m, Q8Linear) for m in model.modules()) == 4 * model.cfg.n_layers + 2  # qkv, o, gate_up, down; head; extra


def packed_model(path):
    """A model as the CLI opens it on the CPU in float32: oneDNN-packed layers, which --compile unpacks."""
    from model.quant import pack

    model = load_model(path, out_in=True)
    pack(model)
    return model


def test_ahead_of_time_step_is_built_once_and_gives_the_same_tokens(tiny_models, tmp_path):
    """--compile on the CPU: one package serves every block alike, is kept in the folder, and a later model
    loads it instead of compiling; the tokens are eager's, also after a longer generation (new cache) and
    for a batch (rows at their own positions run the blocks eagerly)."""
    from model.compile import AotStep, CompileFailed, compile_decode_step

    aot_dir = tmp_path / "aoti"  # its own folder: the session's may hold this package already (test order)

    path = tiny_models["llama"][0]
    eager = packed_model(path)
    prompt = prompt_for(eager)
    model = packed_model(path)
    try:
        compile_decode_step(model, len(prompt) + 16, cache_dir=aot_dir)
    except CompileFailed as e:
        pytest.skip(f"torch.compile unavailable here: {e}")
    step = model.decode_step
    assert isinstance(step, AotStep) and len(step.built) == 1 and len(model.block_steps) == 1  # one call runs every package
    assert model.tail_step is not None  # the tied head, in the last block's package
    assert step.built[0].parent == aot_dir and step.built[0].is_file()
    assert greedy(model, prompt, 16) == greedy(eager, prompt, 16)
    assert greedy(model, prompt, 40) == greedy(eager, prompt, 40)  # a new cache: the step is loaded again
    assert model.decode_step is step and step.built == []  # ... from the folder, not compiled

    again = packed_model(path)
    seconds = compile_decode_step(again, len(prompt) + 16, cache_dir=aot_dir)
    assert again.decode_step.built == [] and seconds < 5
    assert greedy(again, prompt, 16) == greedy(eager, prompt, 16)

    g = torch.Generator().manual_seed(4)
    ps = [torch.randint(3, eager.cfg.vocab_size, (n,), generator=g).tolist() for n in [3, 11, 1, 9]]

    assert batch_tokens(again, ps, [7, 4, 9, 2]) == batch_tokens(eager, ps, [7, 4, 9, 2])


def test_loading_only_touches_nothing_where_nothing_is_built(tiny_models, aot_dir, tmp_path):
    """build=False (the CLI's default): with no build recorded for this model and mode it fails at once and
    leaves the model as it was (packed, eager); after a build it loads the packages, compiling nothing, and
    gives eager's tokens. The record is keyed by the model as opened: int8 is not float32's."""
    from model.compile import BuiltByAnother, CompileFailed, compile_decode_step, ready_file
    from model.quant import PackedLinear

    path = tiny_models["llama"][0]
    eager = packed_model(path)
    prompt = prompt_for(eager)
    model = packed_model(path)
    with pytest.raises(CompileFailed, match="not built"):
        compile_decode_step(model, len(prompt) + 8, cache_dir=tmp_path, build=False)
    assert getattr(model, "decode_step", None) is None and isinstance(model.lm_head, PackedLinear) and list(tmp_path.iterdir()) == []
    try:
        compile_decode_step(model, len(prompt) + 8, cache_dir=aot_dir)  # built, or loaded from the tests above
    except CompileFailed as e:
        pytest.skip(f"torch.compile unavailable here: {e}")
    opened = packed_model(path)
    opened.setup_cache(len(prompt) + 40)  # the record does not depend on the cache's length
    ready = ready_file(opened, aot_dir)  # (keyed by the model as opened: before the step unpacks it)
    assert ready.is_file()
    compile_decode_step(opened, len(prompt) + 40, cache_dir=aot_dir, build=False)
    assert opened.decode_step.built == [] and greedy(opened, prompt, 16) == greedy(eager, prompt, 16)

    int8 = quantize_int8(load_model(path))
    int8.setup_cache(8)
    assert not ready_file(int8, aot_dir).exists()
    with pytest.raises(CompileFailed):
        compile_decode_step(int8, 8, cache_dir=aot_dir, build=False)

    # A package that cannot be loaded (cut short): eager again, packed as before, and the record dropped.
    [package] = opened.decode_step.packages
    for f in (package, ready):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / package.name).write_bytes(package.read_bytes()[:1000])
    broken = packed_model(path)
    with pytest.raises(CompileFailed):
        compile_decode_step(broken, 8, cache_dir=tmp_path, build=False)
    assert getattr(broken, "decode_step", None) is None and isinstance(broken.lm_head, PackedLinear)
    assert not (tmp_path / ready.name).exists() and greedy(broken, prompt, 8) == greedy(eager, prompt, 8)

    # A record naming packages of another version of attn's code (whose keys differ): eager too, and said so
    # (BuiltByAnother: the CLI's note); the record stays, so that the next such run says so again.
    (tmp_path / package.name).unlink()
    (tmp_path / "0ld.pt2").write_bytes(package.read_bytes())
    (tmp_path / ready.name).write_text('{"packages": ["0ld.pt2"]}')
    stale = packed_model(path)
    with pytest.raises(BuiltByAnother):
        compile_decode_step(stale, 8, cache_dir=tmp_path, build=False)
    assert isinstance(stale.lm_head, PackedLinear) and (tmp_path / ready.name).exists()
    assert greedy(stale, prompt, 8) == greedy(eager, prompt, 8)


def test_a_broken_package_is_built_again(tiny_models, aot_dir, monkeypatch):
    """A package cut short (a full disk, a killed run) is built again, not trusted, and not fatal. (The build
    here hands back the good package's bytes: compiling itself is tested above.)"""
    from model.compile import CompileFailed, compile_decode_step

    path = tiny_models["llama"][0]
    eager, model = packed_model(path), packed_model(path)
    prompt = prompt_for(eager)
    try:
        compile_decode_step(eager, len(prompt) + 8, cache_dir=aot_dir)  # built, or loaded from the tests above
    except CompileFailed as e:
        pytest.skip(f"torch.compile unavailable here: {e}")
    [package] = eager.decode_step.packages
    good = package.read_bytes()
    package.write_bytes(good[:1000])
    builds = []

    def build(program, package_path):
        builds.append(package_path)
        Path(package_path).write_bytes(good)
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", build)
    compile_decode_step(model, len(prompt) + 8, cache_dir=aot_dir)
    assert len(builds) == 1 and model.decode_step.built == [package] and package.read_bytes() == good
    assert greedy(model, prompt, 8) == greedy(packed_model(path), prompt, 8)


def test_a_folder_that_cannot_take_the_record_is_not_an_error(tmp_path, monkeypatch):
    """The record is written whole or not at all; where it cannot be written (a read-only folder the packages
    were loaded from), compiling still succeeds and later runs only do not load by default."""
    import tempfile as tf

    from model.compile import _is_ready, _mark_ready

    package = tmp_path / "p.pt2"
    package.write_bytes(b"x")
    _mark_ready(tmp_path / "ready-a.json", [package])
    assert _is_ready(tmp_path / "ready-a.json")

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tf, "mkstemp", read_only)
    _mark_ready(tmp_path / "ready-b.json", [package])
    monkeypatch.undo()
    monkeypatch.setattr("model.compile.os.replace", read_only)
    _mark_ready(tmp_path / "ready-c.json", [package])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.pt2", "ready-a.json"]


def test_the_wrapper_compiles_lean_or_else_as_inductor_writes_it(tmp_path, monkeypatch):
    """A package's C++ wrapper is compiled without the vector ISA flags, C++20 and the warnings (the kernels keep
    them: they hold the vector code); where that command fails (another compiler, another torch's headers), with
    inductor's own."""
    import torch._inductor.cpp_builder as cb

    from model.cxx import compiles_beside_each_other, lean_wrapper

    full = "g++ w.cpp -D CPU_CAPABILITY_AVX512 -Og -march=native -fPIC -Wall -std=c++20 -pedantic -fopenmp -mavx512f -mavx512vl -mfma -mamx-tile -c -o w.o"
    assert lean_wrapper(full) == "g++ w.cpp -D CPU_CAPABILITY_AVX512 -Og -fPIC -w -std=c++17 -fopenmp -c -o w.o"

    ran = []
    real_run = cb.run_compile_cmd

    def run(cmd, cwd):
        ran.append(cmd)
        return real_run(cmd, cwd)

    monkeypatch.setattr(cb, "run_compile_cmd", run)
    (tmp_path / "x.cpp").write_text("int f() { return 1; }\n")

    def build(name: str) -> Path:
        builder = cb.CppBuilder(name=name, sources=[str(tmp_path / "x.cpp")], output_dir=str(tmp_path), BuildOption=cb.CppOptions(compile_only=True))
        with compiles_beside_each_other():
            builder.build()
        return Path(builder.get_target_file_path())

    assert build("a.wrapper").is_file() and len(ran) == 1 and " -w " in ran[0]
    ran.clear()
    monkeypatch.setattr("model.cxx.lean_wrapper", lambda command: command + " -fno-such-flag-in-any-compiler")
    assert build("b.wrapper").is_file() and len(ran) == 2 and "-fno-such-flag" in ran[0] and "-fno-such-flag" not in ran[1]


def test_packages_share_the_interface_and_the_headers_compiled_once(tiny_models, tmp_path, monkeypatch):
    """A first build compiles its C++ wrapper and kernels whole and keeps what every package shares (the headers'
    names, AOTInductor's runtime interface, the commands); `prepare_headers` (attn pull) compiles those once; a
    later build compiles only the block's own code, from the precompiled headers, links the interface's object into
    the wrapper's, and gives eager's tokens. A kept object that does not link sends the wrapper back to whole."""
    import torch._inductor.cpp_builder as cb

    from model.compile import CompileFailed, compile_decode_step
    from model.cxx import prepare_headers

    ran: list[str] = []
    real_run = cb.run_compile_cmd

    def run(cmd, cwd):
        ran.append(cmd)
        return real_run(cmd, cwd)

    monkeypatch.setattr(cb, "run_compile_cmd", run)
    path = tiny_models["llama"][0]
    eager = packed_model(path)
    prompt = prompt_for(eager)
    shared = tmp_path / "cxx"
    shared.mkdir()

    def build(name: str) -> list[str]:
        """The commands a build in a fresh package folder runs (its C++ parts: the shared folder)."""
        folder = tmp_path / name
        folder.mkdir()
        (folder / "cxx").symlink_to(shared, target_is_directory=True)
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / f"inductor-{name}"))  # nothing from inductor's cache
        model = packed_model(path)
        ran.clear()
        try:
            compile_decode_step(model, len(prompt) + 8, cache_dir=folder)
        except CompileFailed as e:
            pytest.skip(f"torch.compile unavailable here: {e}")
        assert model.decode_step.built and greedy(model, prompt, 8) == greedy(eager, prompt, 8)
        return [c for c in ran if ".wrapper" in c or ".kernel" in c or " -r " in c]

    first = build("a")
    assert any(".wrapper.cpp" in c for c in first) and any(".kernel.cpp" in c for c in first) and not any(".own." in c for c in first)
    kept = {p.name: sorted(f.suffix for f in p.iterdir()) for p in shared.iterdir()}
    assert sorted(kept.values()) == [["", ".cpp", ".h"], ["", ".h"]]  # the wrapper's: command, interface, headers; the kernels'
    assert prepare_headers(shared) == 3 and prepare_headers(shared) == 0  # the interface's object and two headers, once
    assert len(list(shared.glob("*/aoti.h.gch"))) == 2 and len(list(shared.glob("*/interface-*.o"))) == 1

    second = build("b")
    assert not any(".wrapper.cpp" in c or ".kernel.cpp" in c for c in second)  # only the block's own code, then the link
    assert any(".wrapper.own.cpp" in c for c in second) and any(".kernel.own.cpp" in c for c in second)
    assert any(" -r " in c and "interface-" in c for c in second)

    next(shared.glob("*/interface-*.o")).write_bytes(b"not an object")
    third = build("c")  # the link fails: the wrapper compiles whole
    assert any(" -r " in c for c in third) and any(".wrapper.cpp" in c for c in third)


@pytest.mark.parametrize("kind", [*KINDS, "every_variant"])
def test_static_shape_step_traces_as_one_graph(tiny_models, kind):
    """CUDA's GraphStep compiles the static-shape step with fullgraph=True, and where that fails captures the eager step
    instead (slower, with a warning). CI has no GPU: trace it whole here, with dynamo's eager backend, for every family
    and block variant, so that a graph break shows up on the CPU."""
    assert_step_traces_whole(every_block_variant() if kind == "every_variant" else load_model(tiny_models[kind][0]))


def assert_step_traces_whole(model: Decoder) -> None:
    """The static-shape step traced with fullgraph=True (dynamo's eager backend) gives what it gives untraced."""
    torch._dynamo.reset()
    model.setup_cache(16)
    ids, pos = torch.tensor([[5]]), torch.tensor([3])
    with torch.inference_mode():
        want = model.step(ids, pos)
        got = torch.compile(model.step, backend="eager", dynamic=False, fullgraph=True)(ids, pos)
    assert torch.allclose(got, want, atol=1e-5)  # (traced, RMSNorm takes its compiled form: rsqrt, not hypot)
