"""Fixtures: tiny random models of every family, saved by transformers as safetensors, with a tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import os

import pytest
import torch

# The suite runs eagerly unless a test says otherwise (--compile, or ATTN_COMPILE in its env): by default the CLI
# loads a compiled step an earlier run built into $ATTN_HOME/aoti, and `attn pull` builds one.
os.environ["ATTN_COMPILE"] = "0"
# Steps compiled for int4/int8 on AMX CPUs also build a package for the MLP's prefill rows, in a child process
# (model/prefill.py, ≈ 10 s): tests/test_prefill.py covers it; elsewhere the prefill stays eager.
os.environ["ATTN_PREFILL"] = "eager"

try:  # the real default model, pulled once per machine (tests/realmodel.py)
    from tests.realmodel import real_model_dir  # noqa: F401
except ImportError:  # pragma: no cover
    pass

CORPUS = [
    "a fluffy blue creature roamed the verdant forest",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!",
    "def main():\n    print('hello, world')\n    return 0\n",
    "Café naïve résumé — façade, jalapeño, über.",
    "我们今天去公园散步，天气很好。你好世界！",
    "Emoji: 😀🎉🚀👍🏽 and ✨ sparkles ✨",
    "Spaces:    four, tabs:\t\t, newlines:\n\n\nend.",
    "Summarize: attention lets each token look at earlier tokens.",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on the corpus (every byte is reachable, so any text encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(CORPUS * 4, trainer)
    return tk


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    tk = train_tokenizer()
    tk.save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


def hf_config(kind: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, initializer_range=0.1)
    if kind == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0, **common)
    llama = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=0, **common)
    if kind == "llama":  # GQA, tied embeddings
        return tf.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **llama)
    if kind == "llama_mha":  # MHA, untied head, q/k/v/o bias
        return tf.LlamaConfig(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, attention_bias=True, **llama)
    if kind == "llama3":  # rope_scaling llama3 with a short original context, so scaling matters
        scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)
        return tf.LlamaConfig(
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=scaling, **llama
        )
    if kind == "qwen2":
        return tf.Qwen2Config(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, **llama)
    if kind == "mistral":
        return tf.MistralConfig(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None, **llama)
    if kind == "mistral_window":  # a sliding window shorter than the test prompts
        return tf.MistralConfig(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, sliding_window=6, **llama)
    if kind == "qwen2_window":  # the window on layers from max_window_layers on (layer 1 of 2)
        return tf.Qwen2Config(
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, use_sliding_window=True, sliding_window=5, max_window_layers=1, **llama
        )
    gqa = dict(num_attention_heads=4, num_key_value_heads=2, **llama)
    if kind == "qwen3":  # head_dim 24 ≠ C/H = 16; q/k norms per head; biases on q, k, v and W_O
        return tf.Qwen3Config(head_dim=24, attention_bias=True, tie_word_embeddings=False, **gqa)
    if kind == "gemma2":  # caps small enough to bite on a tiny random model; a window on layer 0 (of 2)
        return tf.Gemma2Config(
            head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=1.5, final_logit_softcapping=4.0, sliding_window=6, **gqa
        )
    if kind == "gemma3":  # layer 0 local (window 5, base 10⁴), layer 1 global (base 10⁶, linear scaling ×4)
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}}
        return tf.Gemma3TextConfig(
            head_dim=16, query_pre_attn_scalar=20, sliding_window=5, layer_types=["sliding_attention", "full_attention"],
            rope_parameters=rope, **gqa
        )
    if kind == "phi3":  # LongRoPE (short factors below 64 positions), 3/4 of each head rotates, a window wider than any prompt
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5], "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]}
        return tf.Phi3Config(rope_parameters=rope, original_max_position_embeddings=64, sliding_window=200, pad_token_id=0, **gqa)
    if kind == "olmo2":
        return tf.Olmo2Config(**gqa)
    if kind == "pythia":  # GPT-NeoX: parallel residual, a quarter of each head rotates
        return tf.GPTNeoXConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
            rotary_pct=0.25, use_parallel_residual=True, bos_token_id=0, eos_token_id=0, **common
        )
    raise ValueError(kind)


FAMILY_KINDS = ["qwen3", "gemma2", "gemma3", "phi3", "olmo2", "pythia"]
KINDS = ["gpt2", "llama", "llama_mha", "llama3", "qwen2", "mistral", "mistral_window", "qwen2_window", *FAMILY_KINDS]


def save_model(kind: str, out: Path, tokenizer_json: Path, chat: bool = True, seed: int = 0, shards: str | None = None):
    """Write a random transformers model of `kind` to `out` (safetensors + tokenizer); return the HF model."""
    import transformers as tf

    vocab = json.loads(tokenizer_json.read_text())["model"]["vocab"]
    cfg = hf_config(kind, len(vocab) + len(SPECIALS))
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    if kind in FAMILY_KINDS:  # norms away from their initial 1 (Gemma's 0, applied as 1 + w), so the mapping matters
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn_like(p) * 0.2)
    kwargs = {"max_shard_size": shards} if shards else {}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    (out / "tokenizer.json").write_text(tokenizer_json.read_text())
    tok_cfg = {"bos_token": None, "eos_token": "<|endoftext|>"}
    if chat:
        tok_cfg["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_json) -> dict[str, tuple[Path, object]]:
    """Every family once: kind → (directory, transformers model on the same files)."""
    out = {}
    for kind in KINDS:
        d = tmp_path_factory.mktemp(kind)
        out[kind] = (d, save_model(kind, d, tokenizer_json))
    return out


@pytest.fixture(scope="session")
def aot_dir(tmp_path_factory) -> Path:
    """One folder of ahead-of-time packages (--compile on the CPU) for the session: a package one test
    builds, the next with the same model and mode loads (compiling one costs ≈ 10 s)."""
    return tmp_path_factory.mktemp("aoti")


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"][0]


# --- running the CLI ------------------------------------------------------------------


class Result:
    def __init__(self, code: int, out: bytes, err: bytes) -> None:
        self.code, self.out_bytes, self.err_bytes = code, out, err
        self.out, self.err = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"Result(code={self.code}, out={self.out[:200]!r}, err={self.err[:400]!r})"


class FakeStdin:
    """stdin for in-process runs: piped bytes, or a terminal (tty=True) that must never be read."""

    def __init__(self, data: bytes | None, tty: bool) -> None:
        import io

        self._tty = tty
        self.buffer = io.BytesIO(data or b"")
        if tty:
            self.buffer.read = lambda *a: (_ for _ in ()).throw(AssertionError("read from a TTY stdin"))

    def isatty(self) -> bool:
        return self._tty

    def fileno(self) -> int:
        import io

        raise io.UnsupportedOperation("fileno")


def run_cli(args: list[str], stdin: bytes | None = None, tty: bool = False, env: dict | None = None, monkeypatch=None) -> Result:
    """Run `attn ARGS` in this process, as the console script does; return exit code, stdout, stderr."""
    import io
    import os
    import sys

    from cli.main import main

    out, err = io.BytesIO(), io.BytesIO()
    saved = sys.argv, sys.stdin, sys.stdout, sys.stderr
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    sys.argv = ["attn", *args]
    sys.stdin = FakeStdin(stdin, tty)
    wrappers = io.TextIOWrapper(out, encoding="utf-8", write_through=True), io.TextIOWrapper(err, encoding="utf-8", write_through=True)
    sys.stdout, sys.stderr = wrappers  # (a tensor-parallel rank other than 0 swaps them for /dev/null: cli/parallel.py)
    os.environ.update(env or {})
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    finally:
        for wrapper in wrappers:
            wrapper.flush()
            wrapper.detach()  # keep the BytesIO open when the wrapper goes away
        sys.argv, sys.stdin, sys.stdout, sys.stderr = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture
def attn():
    return run_cli
