"""Tensor parallelism on CPU with gloo (model/parallel.py, cli/parallel.py), against single-process runs.

Starting processes is what costs here (each imports torch), so most checks run in a pool of worker
processes that keeps one process group for many tasks: the model side directly, and the commands
through the same in-process `run_cli` as the other CLI tests, on every rank at once, as torchrun
would run them. `attn --tp` itself, torchrun, Ctrl-C and a killed rank are tested on real processes.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, save_model

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The quick brown fox jumps over the lazy dog"


# --- a pool of ranks -----------------------------------------------------------------------------


def _serve(rank: int, world: int, port: int, tasks, results) -> None:
    """A worker: join the group once, then run `fn(*args)` for every task until told to stop."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    while (task := tasks.get()) is not None:
        fn, args = task
        try:
            results.put((rank, True, fn(*args)))
        except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
            results.put((rank, False, traceback.format_exc()))


class Pool:
    """`world` spawned processes in one gloo group; `run(fn, *args)` runs a function of this module on every rank."""

    def __init__(self, world: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.world = world
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            self.procs = [ctx.Process(target=_serve, args=(r, world, port, self.tasks[r], self.results), daemon=True) for r in range(world)]
            for p in self.procs:
                p.start()
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)

    def run(self, fn, *args) -> list:
        """fn(*args) on every rank; the results in rank order."""
        for q in self.tasks:
            q.put((fn, args))
        got = {}
        for _ in range(self.world):
            rank, ok, value = self.results.get(timeout=300)
            got[rank] = (ok, value)
        failed = [f"rank {r}:\n{v}" for r, (ok, v) in sorted(got.items()) if not ok]
        assert not failed, "\n".join(failed)
        return [got[r][1] for r in range(self.world)]

    def close(self) -> None:
        for p in self.procs:  # nothing to finish: killing skips torch's seconds-long interpreter teardown
            p.kill()
            p.join()


# --- models ------------------------------------------------------------------------------------


def save_3kv(out: Path, tokenizer_json: Path) -> None:
    """A tiny Llama with 6 query heads over 3 KV heads (as the default model's 9 over 3): splits over 3 ranks."""
    import transformers as tf

    from tests.conftest import SPECIALS

    vocab = len(json.loads(tokenizer_json.read_text())["model"]["vocab"]) + len(SPECIALS)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=3, max_position_embeddings=256, tie_word_embeddings=True, eos_token_id=0, initializer_range=0.1)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").save_pretrained(out)
    (out / "tokenizer.json").write_text(tokenizer_json.read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|endoftext|>"}))


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory, tokenizer_json) -> dict[str, Path]:
    """GQA (4 query / 2 KV heads, tied), MHA (untied, q/k/v/o bias), the other families, and 6 query / 3 KV heads."""
    out = {kind: path for kind, (path, _) in tiny_models.items()}
    out["llama_3kv"] = tmp_path_factory.mktemp("llama_3kv")
    save_3kv(out["llama_3kv"], tokenizer_json)
    return out


# --- tasks, run on every rank --------------------------------------------------------------------


def task_logits(path: str, ids: list[int], packed: bool = False) -> dict:
    """Full logits of a prefill and of one cached step after it, with what this rank holds (its layers
    in oneDNN's packed layout with `packed`, as the CLI runs them on the CPU)."""
    import torch.distributed as dist

    from model.config import ModelConfig
    from model.parallel import Shard, load_shard

    from model import parallel

    cfg = ModelConfig.from_dir(Path(path))
    read, plain = [0], parallel._Ranges._read

    def counted(self, n, at, into=None):
        read[0] += n
        return plain(self, n, at, into)

    parallel._Ranges._read = counted
    try:
        model = load_shard(Path(path), Shard.plan(cfg, dist.get_rank(), dist.get_world_size()))
    finally:
        parallel._Ranges._read = plain
    if packed:
        from model.quant import pack

        assert pack(model) > 0
    model.setup_cache(len(ids) + 1)
    with torch.inference_mode():
        prefill = model(torch.tensor([ids[:-1]]), 0)[0]
        step = model.step(torch.tensor([ids[-1:]]), len(ids) - 1)[0, -1]
    return {
        "prefill": prefill, "step": step,
        "cache": tuple(model.layers[0].attn.cache.k.shape),
        "params": {k: p.numel() for k, p in model.named_parameters()},
        "read": read[0],
    }


def task_generate(path: str, ids: list[int], n: int, temperature: float, seed: int) -> list[int]:
    from model.config import ModelConfig
    from model.generate import generate
    from model.parallel import Shard, load_shard
    from model.sampling import SamplingSettings
    import torch.distributed as dist

    cfg = ModelConfig.from_dir(Path(path))
    model = load_shard(Path(path), Shard.plan(cfg, dist.get_rank(), dist.get_world_size()))
    gen = torch.Generator().manual_seed(seed)
    return [s.id for s in generate(model, ids, n, SamplingSettings(temperature=temperature, top_p=0.9), gen)]


def task_diverge(path: str) -> str:
    """Each rank feeds a different token: every rank must stop with the same error, none hang."""
    import torch.distributed as dist

    from model.config import ModelConfig
    from model.errors import AttnError
    from model.parallel import Shard, load_shard

    cfg = ModelConfig.from_dir(Path(path))
    model = load_shard(Path(path), Shard.plan(cfg, dist.get_rank(), dist.get_world_size()))
    model.setup_cache(4)
    try:
        with torch.inference_mode():
            model(torch.tensor([[3 + dist.get_rank()]]), 0)
    except AttnError as e:
        return str(e)
    return "no error"


def task_cli(args: list[str], stdin: bytes | None) -> tuple[int, str, str]:
    """The command on every rank, as torchrun runs it; only rank 0 has stdin (another rank's would fail if read)."""
    import torch.distributed as dist

    rank0 = dist.get_rank() == 0
    r = run_cli(args, stdin=stdin if rank0 else None, tty=not rank0)
    return r.code, r.out, r.err


# --- comparing ------------------------------------------------------------------------------------


def assert_close_json(a, b, tol: float, where: str = "") -> None:
    """The same JSON document, floats within `tol` (absolute, or relative for large values)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_close_json(a[k], b[k], tol, f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_json(x, y, tol, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=tol, abs_tol=tol), (where, a, b)
    else:
        assert a == b, (where, a, b)


def single(args: list[str], stdin: bytes | None = None):
    return run_cli(args, stdin=stdin)


def check_cli(pool: Pool, args: list[str], stdin: bytes | None = None) -> tuple[object, tuple[int, str, str]]:
    """The command under tensor parallelism and in one process: same exit code and stderr; the other ranks silent."""
    ref = single(args, stdin)
    ranks = pool.run(task_cli, args, stdin)
    code, out, err = ranks[0]
    assert code == ref.code == 0, (ranks[0], ref)
    assert err == ref.err
    for r, (c, o, e) in enumerate(ranks[1:], 1):
        assert (c, o, e) == (0, "", ""), f"rank {r} wrote {o!r} / {e!r}"
    return ref, ranks[0]


def test_ranged_reads_equal_safetensors(tmp_path):
    """model/parallel.py reads a rank's rows and columns by byte ranges: the same tensors as safetensors reads."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from model.parallel import _Ranges

    torch.manual_seed(0)
    tensors = {
        "f32": torch.randn(7, 5), "bf16": torch.randn(6, 9).to(torch.bfloat16), "f16": torch.randn(4, 3).half(),
        "bias": torch.randn(11), "i64": torch.arange(12).reshape(3, 4), "scalar": torch.tensor(2.5), "flag": torch.tensor([True, False]),
    }
    save_file(tensors, tmp_path / "m.safetensors")
    with _Ranges(tmp_path / "m.safetensors") as ours, safe_open(tmp_path / "m.safetensors", "pt") as theirs:
        for k, t in tensors.items():
            assert torch.equal(ours.get_slice(k)[:], theirs.get_tensor(k)), k
            assert ours.get_slice(k).get_shape() == tuple(t.shape)
            if t.dim() >= 1:
                assert torch.equal(ours.get_slice(k)[1:3], t[1:3]), k
            if t.dim() == 2:
                assert torch.equal(ours.get_slice(k)[:, 1:3], t[:, 1:3]), k
                assert torch.equal(ours.get_slice(k)[1:, 2:3], t[1:, 2:3]), k


# --- two ranks -------------------------------------------------------------------------------------


@pytest.fixture(scope="class")
def pool2():
    pool = Pool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="class")
def pool3():
    pool = Pool(3)
    yield pool
    pool.close()


def check_logits(pool: Pool, path: Path, hf_model) -> None:
    from model.loading import load_model

    ids = [5, 17, 99, 3, 250, 42, 7, 11, 64]
    ref = load_model(path)
    ref.setup_cache(len(ids))
    with torch.inference_mode():
        want = ref(torch.tensor([ids]), 0)[0]
    ranks = pool.run(task_logits, str(path), ids)
    for got in ranks:  # every rank holds the whole logits (all-gathered), the same bytes on each
        assert torch.equal(got["prefill"], ranks[0]["prefill"])
        assert (got["prefill"] - want[:-1]).abs().max() <= 1e-5
        assert (got["step"] - want[-1]).abs().max() <= 1e-5
    for got in pool.run(task_logits, str(path), ids, True):  # every rank's layers packed (a tied head keeps its rows)
        assert (got["prefill"] - want[:-1]).abs().max() <= 1e-5
        assert (got["step"] - want[-1]).abs().max() <= 1e-5
    if hf_model is not None:
        with torch.inference_mode():
            hf = hf_model(torch.tensor([ids])).logits[0]
        assert (ranks[0]["prefill"] - hf[:-1]).abs().max() <= 1e-4
    # Each rank's KV cache holds its own KV heads; the split weights add up to the whole model's, once.
    assert all(r["cache"][1] == ref.cfg.n_kv_heads // pool.world for r in ranks)
    whole = {k: p.numel() for k, p in ref.named_parameters()}
    held = [sum(r["params"].values()) for r in ranks]
    replicated = sum(n for k, n in whole.items() if "norm" in k or "pos_emb" in k or k.endswith(("o.bias", "down.bias")))
    split = sum(whole.values()) - replicated
    V, C, N = ref.cfg.vocab_size, ref.cfg.dim, pool.world
    padding = (-V % N) * C * (1 if ref.tok_emb is None else 2)  # the vocabulary padded to N equal slices
    assert sum(h - replicated for h in held) == split + padding  # each split weight held once
    assert all(h - replicated <= 1.05 * split / N + padding for h in held)  # ≈ 1/N of them on each rank, and all of the rest
    # Each rank reads its slices and nothing more (float32 files; the headers are a few KiB). GPT-NeoX's q|k|v is
    # the exception: it is read whole (its per-head order is undone first), then sliced.
    qkv = sum(n for k, n in whole.items() if k.endswith("attn.qkv.weight"))
    for r, h in zip(ranks, held):
        assert r["read"] <= 4 * (h + (qkv if ref.cfg.model_type == "gpt_neox" else 0)) + 2**16, (r["read"], h)


# The one-process reference multiplies whole matrices through oneDNN's packed weights (model/quant/packed.py),
# the ranks their slices, summed by all-reduces: float32 rounding in another order (scores measured 1.4e-6 apart).
ONE_PROCESS_TOL = 1e-5


class TestTwoRanks:
    # GPT-2: a fused c_attn stored (in, out); Phi-3: fused qkv_proj and gate_up_proj; Pythia: per-head q|k|v
    # reordered at load, parallel residual; Gemma 2: soft-capped scores and logits; Qwen3: q/k norms per head.
    @pytest.mark.parametrize("kind", ["llama", "llama_mha", "gpt2", "qwen3", "gemma2", "gemma3", "phi3", "pythia"])
    def test_logits_match_single_process_and_transformers(self, pool2, models, tiny_models, kind):
        check_logits(pool2, models[kind], tiny_models[kind][1])

    def test_a_model_norming_q_and_k_over_all_heads_is_refused(self, pool2, models):
        """OLMo 2's q/k norm takes one RMS over every head: a split by heads cannot compute it."""
        code, out, err = pool2.run(task_cli, ["generate", "-m", str(models["olmo2"]), "hi"], None)[0]
        assert code == 2 and out == "" and "over all heads together" in err and err.count("\n") == 1, err

    @pytest.mark.parametrize("kind", ["llama", "llama_mha"])
    def test_32_greedy_tokens_identical_and_sampling_the_same_on_every_rank(self, pool2, models, kind):
        from model.generate import generate
        from model.loading import load_model
        from model.sampling import SamplingSettings

        path, ids = models[kind], [5, 17, 99, 3]
        ref = load_model(path)
        want = [s.id for s in generate(ref, ids, 32, SamplingSettings(temperature=0))]
        got = pool2.run(task_generate, str(path), ids, 32, 0.0, 0)
        assert got[0] == got[1] == want
        # Sampling: each rank draws from its copy of the same logits with the same seed.
        sampled = pool2.run(task_generate, str(path), ids, 16, 1.0, 7)
        want = [s.id for s in generate(ref, ids, 16, SamplingSettings(temperature=1.0, top_p=0.9), torch.Generator().manual_seed(7))]
        assert sampled[0] == sampled[1] == want

    def test_ranks_feeding_different_tokens_all_stop_with_one_error(self, pool2, models):
        errors = pool2.run(task_diverge, str(models["llama"]))
        assert errors[0] == errors[1] and "sampled different tokens" in errors[0]

    def test_generate_text_and_json_as_one_process(self, pool2, models):
        base = ["generate", "-m", str(models["llama"]), "--raw", "--temp", "0", "-n", "12", "--ignore-eos"]
        ref, (_, out, _) = check_cli(pool2, base + ["--seed", "1", "hello world"])
        assert out == ref.out
        # The prompt from stdin: rank 0 reads it (the other rank's stdin is a terminal that fails if read).
        ref, (_, out, _) = check_cli(pool2, base + ["--json", "Summarize:"], stdin=b"notes here\n")
        got, want = json.loads(out), json.loads(ref.out)
        assert set(got) == set(want) and set(got["timings"]) == set(want["timings"])
        for k in ("text", "finish_reason", "usage", "model", "device", "dtype", "params"):
            assert got[k] == want[k], k

    def test_random_seed_is_rank_0s(self, pool2, models):
        """No --seed: rank 0 picks one and every rank samples with it (else they would diverge and fail)."""
        args = ["generate", "-m", str(models["llama_mha"]), "--raw", "--temp", "1", "-n", "8", "--ignore-eos", "--json", "hi"]
        code, out, err = pool2.run(task_cli, args, None)[0]
        assert code == 0, err
        seeded = single(args + ["--seed", str(json.loads(out)["seed"])])
        assert json.loads(out)["text"] == json.loads(seeded.out)["text"]

    @pytest.mark.parametrize("kind", ["llama", "llama_mha"])
    def test_inspect_and_heads_json_as_one_process(self, pool2, models, kind):
        m = ["-m", str(models[kind])]
        for args in (
            ["inspect", *m, PROMPT, "--format", "json"],
            ["inspect", *m, PROMPT, "--format", "json", "--head", "3", "--head", "0", "--direction", "to", "-t", "fox", "--values", "value-norms"],
            ["inspect", *m, "hello", "--generate", "5", "--temp", "0", "--seed", "0", "--ignore-eos", "--format", "json", "--values", "scores"],
            ["heads", *m, PROMPT, "--format", "json", "--probe", "induction", "--probe-length", "8"],
        ):
            ref, (_, out, _) = check_cli(pool2, args)
            assert_close_json(json.loads(out), json.loads(ref.out), ONE_PROCESS_TOL, " ".join(args[:1] + args[3:]))
        # A dataset from stdin (rank 0 reads it), measured in right-padded batches, pooled per head.
        lines = f"{PROMPT}\nthe cat sat on the mat and the cat sat\nhello hello hello world\n".encode()
        ref, (_, out, _) = check_cli(pool2, ["heads", *m, "--lines", "--format", "json", "--parallel", "2"], stdin=lines)
        assert_close_json(json.loads(out), json.loads(ref.out), ONE_PROCESS_TOL, "heads --lines")

    def test_inspect_table_and_explain_as_one_process(self, pool2, models):
        m = ["-m", str(models["llama"])]
        ref, (_, out, _) = check_cli(pool2, ["inspect", *m, PROMPT, "--format", "table", "-l", "1"])
        assert out == ref.out
        for head in ("1", "2"):  # a head of rank 0, one of rank 1 (with its GQA partner)
            ref, (_, out, _) = check_cli(pool2, ["explain", *m, PROMPT, "-t", "fox", "-l", "1", "--head", head, "--format", "json"])
            assert_close_json(json.loads(out), json.loads(ref.out), 1e-5, f"explain head {head}")
        ref, (_, out, _) = check_cli(pool2, ["explain", *m, PROMPT, "-t", "dog", "--format", "json"])  # picks the sharpest head
        assert_close_json(json.loads(out), json.loads(ref.out), 1e-5, "explain, sharpest head")

    def test_errors_as_one_process(self, pool2, models):
        m = ["-m", str(models["llama"])]
        for args, code in ((["inspect", *m, "hi", "--head", "9"], 2), (["generate", *m, "--tp", "3", "hi"], 2), (["explore", *m, "hi"], 2)):
            ranks = pool2.run(task_cli, args, None)
            assert ranks[0][0] == code and ranks[0][2].count("\n") == 1 and ranks[0][2].startswith("attn: error: "), ranks[0]
            assert ranks[1][1:] == ("", "")
        assert "torchrun started 2 processes" in pool2.run(task_cli, ["generate", *m, "--tp", "3", "hi"], None)[0][2]
        assert "does not run tensor-parallel" in pool2.run(task_cli, ["explore", *m, "hi"], None)[0][2]


class TestThreeRanks:
    def test_logits_greedy_inspect_and_heads(self, pool3, models):
        from model.generate import generate
        from model.loading import load_model
        from model.sampling import SamplingSettings

        path = models["llama_3kv"]
        check_logits(pool3, path, None)
        ids = [5, 17, 99, 3]
        want = [s.id for s in generate(load_model(path), ids, 32, SamplingSettings(temperature=0))]
        assert pool3.run(task_generate, str(path), ids, 32, 0.0, 0) == [want] * 3
        for args in (["inspect", "-m", str(path), PROMPT, "--format", "json"], ["heads", "-m", str(path), PROMPT, "--format", "json"]):
            ref, (_, out, _) = check_cli(pool3, args)
            assert_close_json(json.loads(out), json.loads(ref.out), ONE_PROCESS_TOL, args[0])


# --- the launcher: real processes ----------------------------------------------------------------


def test_tp_that_does_not_divide_the_kv_heads_exits_2_naming_the_valid_values(attn, models):
    t = time.time()
    r = attn(["generate", "-m", str(models["llama"]), "--tp", "3", "hi"])
    assert r.code == 2 and r.out == "" and r.err.count("\n") == 1, r
    assert "2 KV heads" in r.err and "--tp must be 1 or 2" in r.err
    r = attn(["heads", "-m", str(models["llama_3kv"]), "--tp", "2"])
    assert r.code == 2 and "--tp must be 1 or 3" in r.err, r
    assert time.time() - t < 30  # refused before any process starts


def test_exit_codes_of_a_run_from_its_ranks():
    from cli.parallel import _exit_code

    assert _exit_code({0: 2, 1: 2}, 2) == 2  # a usage error every rank found: rank 0 said it
    assert _exit_code({0: 141}, 2) == 141  # stdout closed
    assert _exit_code({0: 130}, 2) == 130  # interrupted
    assert _exit_code({0: 1, 1: -9}, 2) == 1  # rank 0 lost rank 1 and said so


def test_exit_code_when_rank_0_could_not_say_it(capsys):
    from cli.parallel import _exit_code

    assert _exit_code({0: 143, 1: -9}, 2) == 1
    assert capsys.readouterr().err == "attn: error: tensor-parallel rank 1 of 2 was killed by SIGKILL; every rank was stopped\n"
    assert _exit_code({0: -9}, 3) == 1
    assert "rank 0 of 3 was killed by SIGKILL" in capsys.readouterr().err


def test_a_failing_rank_s_own_error_line_is_said(capsys, tmp_path, monkeypatch):
    """A rank other than 0 whose stderr is silenced leaves its error line (cli.parallel.report); when rank 0 was stopped
    before it could say anything, the launcher says that line, not only which rank exited."""
    from cli.parallel import ERRORS, _exit_code, report

    monkeypatch.setenv(ERRORS, str(tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    report("model.safetensors: tensor x has shape [3] where the config needs [4]")
    assert _exit_code({0: 143, 1: -15, 2: 1}, 3, tmp_path) == 1
    assert capsys.readouterr().err == "attn: error: model.safetensors: tensor x has shape [3] where the config needs [4] (tensor-parallel rank 2 of 3; every rank was stopped)\n"
    assert _exit_code({0: 1, 2: 1}, 3, tmp_path) == 1 and capsys.readouterr().err == ""  # rank 0 said its own


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_tp_2_and_torchrun_print_exactly_the_single_process_text(models):
    """`attn generate --tp 2`, `torchrun … --no-python attn generate` and `torchrun … -m cli.main generate`: stdout
    is the one-process text; stderr empty (torchrun's own, when it has any, is torchrun's)."""
    args = ["generate", "-m", str(models["llama_mha"]), "--raw", "--temp", "0", "-n", "16", "--ignore-eos", "hello world"]
    ref = single(args)
    assert ref.code == 0
    attn = [sys.executable, "-m", "cli.main"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    script = Path(sys.executable).with_name("attn")  # the console script of this environment
    cmds = [attn + args + ["--tp", "2"], torchrun + ["-m", "cli.main"] + args]
    if script.exists():
        cmds.append(torchrun + ["--no-python", str(script)] + args)
    for cmd in cmds:
        p = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, stdin=subprocess.DEVNULL, timeout=240)
        assert p.returncode == 0, p.stderr.decode()
        assert p.stdout.decode() == ref.out, cmd
        if cmd[:3] == attn:
            assert p.stderr == b""
    assert script.exists(), f"{script} is missing: torchrun --no-python attn was not tried (pip install -e .)"


def _children(pid: int) -> dict[int, int]:
    """Rank → pid of the processes `pid` started (from /proc: RANK in their environment)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[1]) == pid:
            rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
            if rank is not None:
                out[rank] = int(entry)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class LongRun:
    """`attn generate --tp 2` that would run for minutes, started and watched until generation is under way."""

    def __init__(self, model: Path, *extra: str, env: dict | None = None) -> None:
        self.jsonl = "--jsonl" in extra
        self.p = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "generate", "-m", str(model), "--raw", "--temp", "1", "--ignore-eos", "--ctx-size", "16000", "-n", "15000", "--tp", "2", *extra, "hello"],
            env={**_env(), **(env or {})}, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )

    def started(self) -> dict[int, int]:
        """Wait for the first generated text; then rank → pid."""
        self.first = self.p.stdout.readline() if self.jsonl else self.p.stdout.read1(1)
        assert self.first, self.p.stderr.read().decode()
        ranks = _children(self.p.pid)
        assert sorted(ranks) == [0, 1]
        return ranks

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.communicate()


@pytest.fixture
def long_run():
    """Start a `LongRun` (one at a time: a run left generating would slow the next one's start); ended after the test."""
    runs = []
    yield lambda *args, **kw: runs.append(LongRun(*args, **kw)) or runs[-1]
    for run in runs:
        run.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_rank_ends_every_process_with_one_line_and_exit_1(long_run, models):
    run = long_run(models["llama_mha"])
    ranks = run.started()
    t = time.time()
    os.kill(ranks[1], signal.SIGKILL)
    out, err = run.p.communicate(timeout=60)
    assert run.p.returncode == 1 and time.time() - t < 30
    err = err.decode()
    assert err.count("\n") == 1 and err.startswith("attn: error: tensor-parallel") and "Traceback" not in err, err
    assert not any(_alive(pid) for pid in ranks.values())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_hung_rank_ends_every_process_after_the_timeout_with_one_line_and_exit_1(long_run, models):
    """A rank that stops answering (SIGSTOP: alive, holding its sockets open): rank 0 gives up after ATTN_TP_TIMEOUT
    (10 s here) and ends the stopped rank too, not the launcher 30 s later."""
    run = long_run(models["llama_mha"], env={"ATTN_TP_TIMEOUT": "10"})
    ranks = run.started()
    t = time.time()
    os.kill(ranks[1], signal.SIGSTOP)
    out, err = run.p.communicate(timeout=60)
    took = time.time() - t
    assert run.p.returncode == 1 and took < 30, (run.p.returncode, took)
    err = err.decode()
    assert err.count("\n") == 1 and err.startswith("attn: error: tensor-parallel: another rank exited or stopped answering"), err
    assert not any(_alive(pid) for pid in ranks.values())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_on_the_launcher_exits_130_and_leaves_no_process(long_run, models):
    run = long_run(models["llama_mha"], "--jsonl")
    ranks = run.started()
    run.p.send_signal(signal.SIGINT)
    out, err = run.p.communicate(timeout=60)
    assert run.p.returncode == 130, err.decode()
    assert err == b""
    done = json.loads(out.decode().splitlines()[-1])  # rank 0 still ended the stream with its done event
    assert done["type"] == "done" and done["finish_reason"] == "interrupted"
    assert not any(_alive(pid) for pid in ranks.values())
