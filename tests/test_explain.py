"""attn explain: every stage equals an independent computation from the raw weights and transformers' eager attention."""

from __future__ import annotations

import json
import math

import pytest
import torch

from model import probe
from model.explain import explain, head_updates
from model.loading import load_model
from tests.conftest import FAMILY_KINDS, run_cli

PROMPT = "a fluffy blue creature roamed the verdant forest"


def ids_for(model, T: int = 12, seed: int = 5) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.cfg.vocab_size, (T,), generator=g).tolist()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def reference(hf, kind: str, ids: list[int], layer: int):
    """Residual, normed x, q (H, T, D), k, v (G, T, D), unrotated q/k, W_O (H, D, C) straight from the HF modules."""
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
        resid = out.hidden_states[layer][0]  # (T, C): hidden_states[l] is the input of layer l
        T, C = resid.shape
        if kind == "gpt2":
            blk = hf.transformer.h[layer]
            H = hf.config.n_head
            G, D = H, C // H
            x = blk.ln_1(resid)
            qkv = x @ blk.attn.c_attn.weight + blk.attn.c_attn.bias  # Conv1D: (in, out)
            q, k, v = (t.view(T, -1, D).transpose(0, 1) for t in qkv.split(C, dim=-1))
            w_o = blk.attn.c_proj.weight.view(H, D, C)
            q_raw, k_raw = q, k
        else:
            blk = hf.model.layers[layer]
            a = blk.self_attn
            H, G = hf.config.num_attention_heads, hf.config.num_key_value_heads
            D = C // H
            x = blk.input_layernorm(resid)
            q_raw = a.q_proj(x).view(T, H, D).transpose(0, 1)  # (H, T, D)
            k_raw = a.k_proj(x).view(T, G, D).transpose(0, 1)  # (G, T, D)
            v = a.v_proj(x).view(T, G, D).transpose(0, 1)
            # RoPE by hand: HF layout, frequency i paired with i + D/2.
            theta = (getattr(hf.config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
            inv = 1.0 / (theta ** (torch.arange(0, D, 2).float() / D))
            ang = torch.arange(T).float()[:, None] * inv[None, :]
            cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
            q = q_raw * cos + rotate_half(q_raw) * sin
            k = k_raw * cos + rotate_half(k_raw) * sin
            w_o = a.o_proj.weight.t().reshape(H, D, C)  # nn.Linear stores (out, in)
    return dict(resid=resid, x=x, q=q, k=k, v=v, q_raw=q_raw, k_raw=k_raw, w_o=w_o, attn=out.attentions[layer][0], H=H, G=G, D=D)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_explain_equals_independent_computation(tiny_models, kind):
    path, hf = tiny_models[kind]
    model = load_model(path)
    ids = ids_for(model)
    for layer, head, query in [(0, 0, 7), (1, 3, 11), (1, 2, 0)]:
        ref = reference(hf, kind, ids, layer)
        R = ref["H"] // ref["G"]
        g = head // R
        S = query + 1
        ex = explain(model, ids, query, layer, head)
        qv, ks, vs = ref["q"][head, query], ref["k"][g, :S], ref["v"][g, :S]
        dots = ks @ qv
        scores = dots / ref["D"] ** 0.5
        weights = scores.softmax(-1)
        mixed = weights @ vs
        update = mixed @ ref["w_o"][head]
        close = lambda a, b, tol=1e-4: torch.testing.assert_close(a, b, rtol=tol, atol=tol)  # noqa: E731
        close(ex.resid, ref["resid"][query])
        close(ex.x, ref["x"][query])
        close(ex.q, ref["q_raw"][head, query])
        close(ex.keys, ref["k_raw"][g, :S])
        close(ex.q_rot, qv)
        close(ex.keys_rot, ks)
        close(ex.dots, dots)
        close(ex.scores, scores)
        close(ex.weights, weights, 1e-5)
        close(ex.weights, ref["attn"][head, query, :S], 1e-5)  # transformers' eager weights
        if S < len(ids):  # transformers gives the future exactly 0; explain leaves it out
            assert ref["attn"][head, query, S:].abs().max().item() == 0.0
        assert ex.n_tokens == len(ids) and ex.weights.shape == (S,)
        close(ex.values, vs)
        close(ex.mixed, mixed)
        close(ex.update, update)
        close(ex.value_norms, ((weights[:, None] * vs) @ ref["w_o"][head]).norm(dim=-1))
        assert abs(ex.entropy - float(-(weights * weights.log2()).sum())) < 1e-4
        assert ex.kv_head == g and ex.shared_with == [h for h in range(g * R, (g + 1) * R) if h != head]
        if kind == "gpt2":
            assert ex.scores_unrotated is None and not ex.rope
        else:
            close(ex.scores_unrotated, (ref["k_raw"][g, :S] @ ref["q_raw"][head, query]) / ref["D"] ** 0.5)


def rotate(x: torch.Tensor, positions: torch.Tensor, inv: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """RoPE by hand on the first R = 2·len(inv) dims of (…, T, D), HF's rotate_half pairing; the rest passes."""
    R = 2 * inv.numel()
    ang = positions.float()[:, None] * inv[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos() * factor, torch.cat([ang, ang], -1).sin() * factor
    head, rest = x[..., :R], x[..., R:]
    return torch.cat([head * cos + rotate_half(head) * sin, rest], dim=-1)


def family_reference(hf, kind: str, ids: list[int], layer: int) -> dict:
    """Every stage for one layer from the transformers modules' raw weights, RoPE and caps by hand."""
    cfg = hf.config
    with torch.no_grad():
        seen = {}
        attn_module = hf.gpt_neox.layers[layer].attention if kind == "pythia" else hf.model.layers[layer].self_attn

        def keep(mod, args, out) -> None:  # returns None: the module's output is left as it is
            seen["y"] = out[0][0].detach()

        hook = attn_module.register_forward_hook(keep)
        try:
            out = hf(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
        finally:
            hook.remove()
        resid = out.hidden_states[layer][0]  # (T, C)
        T, C = resid.shape
        H, G = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
        D = getattr(cfg, "head_dim", None) or C // H
        pos = torch.arange(T)
        if kind == "pythia":
            blk = hf.gpt_neox.layers[layer]
            x = blk.input_layernorm(resid)
            qkv = blk.attention.query_key_value(x).view(T, H, 3 * D)  # per head: [q | k | v]
            q_proj, k_proj, v = (t.transpose(0, 1) for t in qkv.chunk(3, dim=-1))  # (H, T, D) each
            w_o = blk.attention.dense.weight.t().reshape(H, D, C)
            post = None
        else:
            blk = hf.model.layers[layer]
            a = blk.self_attn
            x = resid if kind == "olmo2" else blk.input_layernorm(resid)  # OLMo 2 norms after, not before
            if kind == "phi3":
                qkv = a.qkv_proj(x)
                qp, kp, vp = qkv.split([H * D, G * D, G * D], dim=-1)
            else:
                qp, kp, vp = a.q_proj(x), a.k_proj(x), a.v_proj(x)
            q_proj, k_proj = qp.view(T, H, D).transpose(0, 1), kp.view(T, G, D).transpose(0, 1)
            v = vp.view(T, G, D).transpose(0, 1)
            w_o = a.o_proj.weight.t().reshape(H, D, C)
            post = blk.post_attention_layernorm if kind in ("gemma2", "gemma3", "olmo2") else None
        q, k = q_proj, k_proj
        if kind in ("qwen3", "gemma3"):  # per head, over D
            q, k = a.q_norm(q_proj), a.k_norm(k_proj)
        elif kind == "olmo2":  # over the whole projection
            q = a.q_norm(qp).view(T, H, D).transpose(0, 1)
            k = a.k_norm(kp).view(T, G, D).transpose(0, 1)
        # RoPE: base, scaling and rotary width as each config states them.
        rp = cfg.rope_parameters
        if kind == "gemma3":
            rp = rp[cfg.layer_types[layer]]
        R = int(D * rp.get("partial_rotary_factor", 1.0))
        inv = 1.0 / (rp["rope_theta"] ** (torch.arange(0, R, 2).float() / R))
        factor = 1.0
        if rp["rope_type"] == "linear":
            inv = inv / rp["factor"]
        elif rp["rope_type"] == "longrope":  # short factors (the prompt is within the original context)
            inv = inv / torch.tensor(rp["short_factor"])
            scale = cfg.max_position_embeddings / cfg.original_max_position_embeddings
            factor = math.sqrt(1 + math.log(scale) / math.log(cfg.original_max_position_embeddings))
        q_rot, k_rot = rotate(q, pos, inv, factor), rotate(k, pos, inv, factor)
        scale = cfg.query_pre_attn_scalar**-0.5 if kind.startswith("gemma") else D**-0.5
        cap = cfg.attn_logit_softcapping if kind == "gemma2" else None
        window = cfg.sliding_window if getattr(cfg, "layer_types", None) and cfg.layer_types[layer] == "sliding_attention" else None
        if kind == "phi3":
            window = cfg.sliding_window
    return dict(resid=resid, x=x, q_proj=q_proj, k_proj=k_proj, q=q, k=k, q_rot=q_rot, k_rot=k_rot, v=v, w_o=w_o, post=post,
                y=seen["y"], attn=out.attentions[layer][0], H=H, G=G, D=D, R=R, scale=scale, cap=cap, window=window,
                o_bias=None if kind == "pythia" else a.o_proj.bias)


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_explain_stages_of_each_family_equal_independent_computation(tiny_models, kind):
    """q/k norms, partial rotary, scale, soft-cap, window mask and the post-attention norm, stage by stage."""
    path, hf = tiny_models[kind]
    model = load_model(path)
    ids = ids_for(model, T=12)
    close = lambda a, b, tol=1e-4: torch.testing.assert_close(a, b, rtol=tol, atol=tol)  # noqa: E731
    for layer, head, query in [(0, 1, 11), (1, 3, 9), (0, 2, 3)]:
        ref = family_reference(hf, kind, ids, layer)
        g = head // (ref["H"] // ref["G"])
        S = query + 1
        ex = explain(model, ids, query, layer, head)
        close(ex.resid, ref["resid"][query])
        close(ex.x, ref["x"][query])
        if kind in ("qwen3", "gemma3", "olmo2"):
            close(ex.q_proj, ref["q_proj"][head, query])
            close(ex.keys_proj, ref["k_proj"][g, :S])
        else:
            assert ex.q_proj is None and ex.keys_proj is None and ex.qk_norm is None
        close(ex.q, ref["q"][head, query])
        close(ex.keys, ref["k"][g, :S])
        close(ex.q_rot, ref["q_rot"][head, query])
        close(ex.keys_rot, ref["k_rot"][g, :S])
        if ref["R"] < ref["D"]:  # partial rotary: the unrotated dims pass through
            assert ex.rotary_dim == ref["R"]
            close(ex.q_rot[ref["R"] :], ref["q"][head, query, ref["R"] :])
        dots = ref["k_rot"][g, :S] @ ref["q_rot"][head, query]
        raw = dots * ref["scale"]
        close(ex.dots, dots)
        close(ex.raw_scores, raw)
        capped = ref["cap"] * torch.tanh(raw / ref["cap"]) if ref["cap"] else raw
        if ref["cap"]:
            close(ex.capped, capped)
            assert (raw - capped).abs().max() > 1e-3  # the cap changes these scores (a control)
        else:
            assert ex.capped is None
        outside = [j for j in range(S) if ref["window"] is not None and j <= query - ref["window"]]
        assert ex.masked.nonzero().flatten().tolist() == outside
        want = capped.masked_fill(torch.tensor([j in outside for j in range(S)]), float("-inf"))
        close(ex.scores, want)
        weights = want.softmax(-1)
        close(ex.weights, weights, 1e-5)
        close(ex.weights, ref["attn"][head, query, :S], 1e-5)  # transformers' eager weights
        update = (weights @ ref["v"][g, :S]) @ ref["w_o"][head]
        close(ex.update, update)
        close(ex.value_norms, ((weights[:, None] * ref["v"][g, :S]) @ ref["w_o"][head]).norm(dim=-1))
        if ref["post"] is not None:  # the heads' shares after the norm add up to transformers' normed output
            shares = torch.stack([explain(model, ids, query, layer, h).update_normed for h in range(ref["H"])])
            with torch.no_grad():
                normed = ref["post"](ref["y"])[query]
            assert ref["o_bias"] is None  # else W_O's bias would have its own share
            close(shares.sum(0), normed)
            close(ex.added, ex.update_normed)
        else:
            assert ex.update_normed is None


@pytest.mark.parametrize("kind", ["llama", "gpt2", "llama_mha"])
def test_head_updates_sum_to_the_attention_output(tiny_models, kind):
    path, hf = tiny_models[kind]
    model = load_model(path)
    ids = ids_for(model, T=16)
    for layer in range(model.cfg.n_layers):
        attn = hf.transformer.h[layer].attn if kind == "gpt2" else hf.model.layers[layer].self_attn
        seen = {}

        def keep(mod, args, out) -> None:  # returns None: the module's output is left as it is
            seen["y"] = out[0][0].detach()

        hook = attn.register_forward_hook(keep)
        try:
            with torch.no_grad():
                hf(torch.tensor([ids]))
        finally:
            hook.remove()
        updates, bias = head_updates(model, ids, layer)
        assert (bias is not None) == (kind != "llama")
        total = updates.sum(0) + (bias if bias is not None else 0)
        assert (total - seen["y"]).abs().max().item() <= 1e-4
        ex = explain(model, ids, 9, layer, 1)
        torch.testing.assert_close(ex.update, updates[1, 9], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma2", "olmo2"])  # gemma2: capped and windowed scores
def test_explain_agrees_with_inspect_probe(tiny_models, kind):
    model = load_model(tiny_models[kind][0])
    ids = ids_for(model)
    layer, query = 1, 8
    heads = list(range(model.cfg.n_heads))
    got = {view: probe.capture(model, ids, query, [layer], heads, "from", view).layers[layer].values for view in probe.VIEWS}
    # explain runs all 12 tokens, the probe the first 9: OLMo 2's norm over the whole q projection carries the
    # products' different rounding at another length (≈ 2e-6) into the scores.
    tol = 1e-5 if kind == "olmo2" else 1e-6
    for h in heads:
        ex = explain(model, ids, query, layer, h)
        torch.testing.assert_close(ex.weights, got["weights"][h].float(), rtol=tol, atol=tol)
        torch.testing.assert_close(ex.scores, got["scores"][h].float(), rtol=tol, atol=tol)
        torch.testing.assert_close(ex.value_norms, got["value-norms"][h].float(), rtol=1e-5, atol=1e-5)


# --- the command ---------------------------------------------------------------------------------


def test_explain_json(tiny_models):
    path, hf = tiny_models["llama"]
    r = run_cli(["explain", "-m", str(path), PROMPT, "--token", "the", "--layer", "1", "--head", "3", "--format", "json"])
    assert r.code == 0, r
    d = json.loads(r.out)
    q = d["query"]["index"]
    assert d["query"]["text"] == " the" and d["tokens"][q]["text"] == " the"
    assert (d["layer"], d["head"], d["kv_head"], d["shared_kv_with"]) == (1, 3, 1, [2])
    assert d["positions"] == list(range(q + 1)) and d["masked"] == list(range(q + 1, len(d["tokens"])))
    for key in ("key_norms", "dots", "scores", "scores_unrotated", "weights", "value_vector_norms", "value_norms"):
        assert len(d[key]) == q + 1 and all(isinstance(x, float) for x in d[key]), key
    assert abs(sum(d["weights"]) - 1) < 1e-5
    with torch.no_grad():
        ref = hf(torch.tensor([[t["id"] for t in d["tokens"]]]), output_attentions=True).attentions[1][0, 3, q, : q + 1]
    assert max(abs(a - b) for a, b in zip(d["weights"], ref.tolist())) < 1e-5
    assert set(d["output"]) == {"mixed_norm", "update_norm", "residual_norm", "ratio", "cosine", "update", "post_norm", "update_normed"}
    assert d["output"]["post_norm"] is False and d["output"]["update_normed"] is None  # no norm after W_O in Llama
    assert (d["qk_norm"], d["softcap"], d["scores_capped"], d["query_pre_attn_scalar"]) == (None, None, None, None)
    assert d["rotary_dim"] == d["d_k"]  # no cap and nothing masked before the query: the raw scores are the scores
    assert max(abs(a - b) for a, b in zip(d["scores_raw"], d["scores"])) < 1e-6
    assert r.err == ""


@pytest.mark.parametrize("kind,says", [
    ("gemma2", ["3 · scores, soft-cap and the mask", "soft-cap: score = 1.5·tanh(raw / 1.5)", "1/√query_pre_attn_scalar", "share of it"]),
    ("qwen3", ["RMSNorm on Q and on K (over each head's 24 numbers)"]),
    ("olmo2", ["no norm before attention", "over all 4 heads' 64 numbers at once", "measured before the post-attention norm"]),
    ("pythia", ["RoPE rotates the first 4 of 16 dims", "after the layer's LayerNorm"]),
])
def test_explain_panels_name_each_family_stage(tiny_models, kind, says):
    path, _ = tiny_models[kind]
    r = run_cli(["explain", "-m", str(path), PROMPT, "--token", "-1", "--layer", "0", "--head", "1", "--format", "table"],
                env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert r.code == 0, r
    for text in says:
        assert text in r.out, text


def test_explain_json_of_a_capped_windowed_post_norm_layer(tiny_models):
    path, _ = tiny_models["gemma2"]
    r = run_cli(["explain", "-m", str(path), PROMPT, "--token", "-1", "--layer", "0", "--head", "1", "--format", "json"])
    assert r.code == 0, r
    d = json.loads(r.out)
    q = d["query"]["index"]
    assert (d["softcap"], d["query_pre_attn_scalar"], d["window"], d["qk_norm"]) == (1.5, 24, 6, None)
    assert abs(d["scale"] - 24**-0.5) < 1e-9
    assert d["window_masked"] == list(range(q - 5))
    for j in range(q + 1):
        assert abs(d["scores_capped"][j] - 1.5 * math.tanh(d["scores_raw"][j] / 1.5)) < 1e-5
        assert d["scores"][j] is None if j in d["window_masked"] else abs(d["scores"][j] - d["scores_capped"][j]) < 1e-6
    assert d["output"]["post_norm"] is True and len(d["output"]["update_normed"]) == len(d["output"]["update"])


def test_explain_panels_without_color(tiny_models):
    path, _ = tiny_models["gpt2"]
    r = run_cli(["explain", "-m", str(path), PROMPT, "--token", "-2", "--layer", "-1", "--head", "0", "--format", "table"], env={"NO_COLOR": "1"})
    assert r.code == 0, r
    assert "\x1b[" not in r.out
    for stage in ("1 · input to the layer", "2 · query and keys", "3 · scores and the mask", "4 · softmax", "5 · values and output", "6 · KV heads"):
        assert stage in r.out
    assert "★" in r.out and "masked" in r.out and "entropy" in r.out
    assert "multi-head attention" in r.out and "RoPE" not in r.out


def test_explain_fits_a_40_column_terminal(tiny_models):
    path, _ = tiny_models["llama"]
    r = run_cli(["explain", "-m", str(path), PROMPT, "--layer", "0", "--head", "1", "--format", "table", "--rows", "6"], env={"NO_COLOR": "1", "COLUMNS": "40"})
    assert r.code == 0, r
    lines = r.out.splitlines()
    assert max(len(ln) for ln in lines) <= 40
    assert "6 · KV heads" in r.out and "…" in r.out  # a long row summarised, every stage still there


def test_explain_picks_a_head_when_none_given(tiny_models):
    path, _ = tiny_models["llama"]
    r = run_cli(["explain", "-m", str(path), "--format", "json", "--token", "the"], tty=True)
    assert r.code == 0, r
    d = json.loads(r.out)
    assert d["query"]["text"] == " the"
    assert "demo sentence" in r.err and f"layer {d['layer']} head {d['head']}" in r.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layer", "2", "--head", "0"], "--layer 2 is out of range"),
        (["--layer", "-3", "--head", "0"], "--layer -3 is out of range"),
        (["--layer", "0", "--head", "4"], "--head 4 is out of range"),
        (["--layer", "0", "--head", "0", "--token", "99"], "--token 99 is out of range"),
        (["--layer", "0", "--head", "0", "--token", "unicorn"], "no token matches 'unicorn'; the tokens are 0:"),
        (["--layer", "0", "--head", "0", "--token", "the", "--occurrence", "2"], "occurs 1 time"),
        (["--layer", "0", "--head", "0", "--format", "yaml"], "yaml"),
    ],
)
def test_explain_usage_errors(tiny_models, args, message):
    path, _ = tiny_models["llama"]
    r = run_cli(["explain", "-m", str(path), PROMPT, *args])
    assert r.code == 2, r
    assert r.out == ""
    assert message in r.err and r.err.startswith("attn: error: ") and r.err.count("\n") == 1


@pytest.mark.slow
def test_real_model_explain_blue_head(real_model_dir):
    """On the demo sentence, the head that puts most of ' creature''s weight on ' blue' (as --find blue ranks) explains it."""
    from model.explain import query_rows
    from model.tokenizer import Tokenizer

    ids, pieces = Tokenizer(real_model_dir).encode_with_offsets("a fluffy blue creature roamed the verdant forest")
    q, blue = pieces.index(" creature"), pieces.index(" blue")
    rows = query_rows(load_model(real_model_dir), ids, q)  # (L, H, q + 1)
    flat = int(rows[:, :, blue].flatten().argmax())
    layer, head = divmod(flat, rows.shape[1])
    r = run_cli(["explain", "-m", str(real_model_dir), "--token", "creature", "--layer", str(layer), "--head", str(head), "--format", "json"], tty=True)
    assert r.code == 0, r
    d = json.loads(r.out)
    assert d["weights"][blue] > 0.5
    assert abs(d["weights"][blue] - float(rows[layer, head, blue])) < 1e-5


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_explain_json_equals_inspect_json(tiny_models, kind):
    path, _ = tiny_models[kind]
    sel = [PROMPT, "--token", "the", "--layer", "1", "--head", "2", "--format", "json"]
    r = run_cli(["explain", "-m", str(path), *sel])
    assert r.code == 0, r
    ex = json.loads(r.out)
    for view, key in (("weights", "weights"), ("scores", "scores"), ("value-norms", "value_norms")):
        r = run_cli(["inspect", "-m", str(path), *sel, "--values", view])
        assert r.code == 0, r
        ins = json.loads(r.out)
        assert ins["query"] == ex["query"] and ins["positions"] == ex["positions"]
        assert ins["heads"][0]["kv_head"] == ex["kv_head"]
        assert max(abs(a - b) for a, b in zip(ins["heads"][0]["values"], ex[key])) < 1e-6, view


def test_explain_fewest_rows_lists_first_strongest_and_last(tiny_models, attn):
    """--rows at its minimum (4) on a longer prompt: the first, the strongest and the last sources, and a gap."""
    path = str(tiny_models["llama"][0])
    r = attn(["explain", "-m", path, "--raw", "--rows", "4", "-l", "1", "--head", "0", "--format", "table",
              "a fluffy blue creature roamed the verdant forest"], env={"NO_COLOR": "1"})
    assert r.code == 0, r
    assert "…" in r.out
