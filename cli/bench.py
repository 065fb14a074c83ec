"""`attn bench`: prefill and decode speed, time to first token and peak memory — the llama-bench of attn.

Each repetition runs the same path as `attn generate` (greedy, no stop on EOS) on a fixed random
prompt; a warm-up run is excluded. `--compare transformers` runs Hugging Face transformers on the
same weights in the same process, `--compare llama.cpp` runs llama.cpp on the GGUF that matches the
mode in a child process (cli/llamacpp.py); repetitions alternate so that machine drift hits both.
Quality (top-1 agreement with float32 and perplexity over a fixed text) is measured whenever the
weights are not float32 (`--quantize int8`, `--dtype bfloat16`). `--batch` measures the batched
loop `attn batch` drives: B rows, each its own random prompt, decoded together; the rates are
aggregates over the rows.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import time
from enum import Enum
from typing import Annotated, Optional

import torch
import typer

from cli.common import (
    stdout_console,
    epilog,
    choice,
    ColorOpt,
    Color,
    DeviceOpt,
    Dtype,
    DtypeOpt,
    ModelOpt,
    QuietOpt,
    VerboseOpt,
    peak_memory_mb,
    reset_peak_memory,
    use_color,
    write_out,
)
from cli import llamacpp
from cli.main import app
from cli.models import Loaded, open_model, pick_device
from cli.speed import CompileOpt, Quantize, QuantizeOpt, ThreadsOpt, apply_speed_options, set_threads
from model.errors import AttnError, UsageError
from model.engine import Generation, Request, run_batch
from model.quant.kernels import cpu_features, cpuinfo
from model.generate import generate
from model.sampling import SamplingSettings

EPILOG = """\
Examples:

  attn bench                                  # 64-token prompt, 128 generated tokens, 5 repetitions

  attn bench -p 64 -p 512 -n 128 -r 5 --json

  attn bench --quantize int8                  # speed, plus top-1 agreement and perplexity vs float32

  attn bench --compare transformers           # the same weights through transformers, ratio printed

  attn bench --quantize int8 --compare llama.cpp   # against llama.cpp on Q8_0 (pip install -e ".[bench]")
  attn bench --batch 1,4,16,64 -r 3           # aggregate prefill and decode tok/s per batch size
"""

GREEDY = SamplingSettings(temperature=0.0)

# The fixed text for quality numbers (written for attn; the first 512 tokens are used).
QUALITY_TEXT = """\
The lighthouse stood at the end of a long spit of sand, and for most of the year the only people who \
saw it up close were the keeper and the man who brought his supplies on the first Monday of every month. \
The keeper had come to the island as a young man, expecting to stay a season, and had stayed forty years. \
He kept a logbook in which he wrote the weather, the ships he saw, the birds that rested on the gallery \
rail, and, very rarely, a thought of his own. Most of the entries were short. "Wind northeast, strong. \
Two trawlers heading south. Lamp cleaned." On some days he wrote nothing but the date.

When the lamp was finally automated, an engineer from the mainland came to install the new equipment. \
She was patient with the old man, who followed her up and down the spiral stairs asking what each part \
did and why it had to be replaced. She explained that the new light would switch itself on at dusk and \
off at dawn, that a sensor would measure the fog and start the horn, and that a small computer would \
report any fault by radio. Nothing, she said, would need a person any more. The keeper listened, nodded, \
and asked who would write in the logbook.

The engineer did not have an answer. That evening, after the work was done, they sat in the kitchen and \
read through the old books together. There were forty of them, one for each year, bound in the same green \
cloth. In the early volumes the handwriting was careful and upright; later it leaned forward, as if in a \
hurry, and in the last few years it had grown large and uneven. Between the weather reports there were \
small drawings of gulls, a pressed flower, a list of the names of ships that had sunk within sight of the \
island, and a note that a child on a passing ferry had waved for a full minute.

Before she left the next morning, the engineer asked whether she could take one of the logbooks to the \
museum in the harbour town. The keeper chose the volume from his first year, when everything had been new \
to him, and wrapped it in brown paper. Then he walked her down to the boat, watched it round the point, \
and went back up the stairs to see the new lamp turn itself on. It worked exactly as she had promised. \
He stood beside it for a long time, and then he went down to the kitchen, opened a fresh logbook, and \
wrote the date, the wind, and the words: "Light came on by itself. Nobody needed."

Years later, visitors to the museum could read that first volume under glass. A card beside it explained \
what a lighthouse keeper did, how the lamps were trimmed and the lenses polished, and why the work had \
ended. Most people read the card and moved on. A few stayed to turn the pages on the screen beside the \
case, reading about winds and trawlers and birds, and some of them laughed at the note about the child on \
the ferry, because they had been children on that ferry once, and had waved."""


COMPARE_HELP = (
    "Also run this engine on the same prompt ids (greedy, same threads), alternating repetitions, and print the ratio: "
    "transformers (same weights, same process) or llama.cpp (llama-cpp-python in a child process, CPU only, on the GGUF "
    "matching the mode: --quantize int4 → the model's own Q4_0/Q4_1 GGUF, int8 → Q8_0, float32 → F32, bfloat16/float16 → F16; "
    "requantized once with llama.cpp and cached in $ATTN_HOME/llamacpp; needs pip install -e \".[bench]\")."
)


class Compare(str, Enum):
    transformers = "transformers"
    llama_cpp = "llama.cpp"


@app.command("bench", short_help='Measure speed (prefill, decode, first token), memory and quality.', epilog=epilog(EPILOG))
def bench_cmd(
    model: ModelOpt = None,
    prompt_lens: Annotated[Optional[list[int]], typer.Option("--prompt-tokens", "-p", min=1, metavar="N", help="Prompt length in tokens (repeatable). [default: 64]", show_default=False)] = None,
    n_gen: Annotated[int, typer.Option("--gen-tokens", "-n", min=1, help="Tokens generated per repetition.")] = 128,
    reps: Annotated[int, typer.Option("--repetitions", "-r", min=1, help="Timed repetitions (after one warm-up run).")] = 5,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    threads: ThreadsOpt = None,
    quantize: QuantizeOpt = Quantize.none,
    compile_step: CompileOpt = None,
    compare: Annotated[Optional[Compare], typer.Option("--compare", **choice(Compare), help=COMPARE_HELP, show_default=False)] = None,
    batches: Annotated[Optional[list[str]], typer.Option("--batch", metavar="B[,B…]", help="Batch sizes to measure (comma-separated or repeated): B rows decoded together, aggregate rates. [default: one sequence, no batch]", show_default=False)] = None,
    quality: Annotated[Optional[bool], typer.Option("--quality/--no-quality", help="Top-1 agreement and perplexity vs float32 over a fixed text, and greedy output identical to float32 on 5 prompts. [default: on unless float32 eager]", show_default=False)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object on stdout instead of a table.")] = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    color: ColorOpt = Color.auto,
) -> None:
    """Measure prefill and decode speed, time to first token and peak memory."""
    sizes = batch_sizes(batches) if batches else None
    if sizes and compare is not None:
        raise UsageError("--compare runs one sequence at a time: leave out --batch")
    # Both checks come before any loading: a missing package or a wrong device fails at once.
    hf_cls = _transformers_class() if compare is Compare.transformers else None
    if compare is Compare.llama_cpp:
        llamacpp.installed_version()
        device = "cpu" if device.strip().lower() == "auto" else device  # the comparison is llama.cpp's CPU build
        if pick_device(device).type != "cpu":
            raise UsageError("--compare llama.cpp runs llama.cpp on the CPU: use --device cpu")
    set_threads(threads)
    prompt_lens = prompt_lens or [64]
    max_len = max(prompt_lens) + n_gen
    m = open_model(model, device, dtype, quiet, quantize.value, defer_packing=True)
    if max_len > m.cfg.max_len:
        raise AttnError(f"prompt ({max(prompt_lens)}) + generated ({n_gen}) tokens exceed the model's context ({m.cfg.max_len})")
    compile_s = apply_speed_options(m, compile_step, max_len, quiet)
    from model import prefill  # (here: it imports the build's helpers, which a run of any other command need not)

    # Resident, quantized or not, as the timed runs hold them (packed for oneDNN when eager, plain under a compiled step;
    # with the packages for many rows, their re-blocked codes too: model/prefill.py); not the cache.
    weights_mb = (sum(t.numel() * t.element_size() for _, t in m.model.weights()) + prefill.resident_bytes(m.model)) / 2**20
    if compile_s is None:
        m.model.setup_cache(max_len)
    kv_mb = sum(b.numel() * b.element_size() for n, b in m.model.named_buffers() if n.endswith((".k", ".v"))) / 2**20

    vocab = min(m.cfg.vocab_size, m.tokenizer.vocab_size)
    g = torch.Generator().manual_seed(0)
    prompts = {p: torch.randint(0, vocab, (p,), generator=g).tolist() for p in prompt_lens}
    compare_info = None
    if sizes:
        results = [_batch_row(m, b, p, n_gen, reps, vocab) for p in prompt_lens for b in sizes]
        kv_mb = max(r["kv_cache_mb"] for r in results)
    else:
        with contextlib.ExitStack() as stack:
            other = None
            if hf_cls is not None:
                hf = _load_transformers(hf_cls, m)
                other = lambda p, n: _hf_run(hf, m, p, n)  # noqa: E731
                compare_info = {"engine": "transformers", "version": _transformers_version()}
            elif compare is Compare.llama_cpp:
                llama = stack.enter_context(llamacpp.LlamaCpp(torch.get_num_threads()))
                gguf = _start_llamacpp(llama, m, quantize, max_len, quiet)
                other = lambda p, n: _llama_run(llama, p, n)  # noqa: E731
            while True:
                try:
                    results = _measure(m, prompts, n_gen, reps, compare.value if compare else None, other)
                    break
                except llamacpp.Crashed as crash:
                    # Loads llama.cpp again without repacked buffers and measures both engines anew; a second
                    # crash (or one where nothing was repacked) ends with attn's error instead.
                    llama.fall_back(crash, quiet)
            if compare is Compare.llama_cpp:
                compare_info = _llamacpp_info(llama, gguf)

    want_quality = quality if quality is not None else (quantize is not Quantize.none or m.dtype != torch.float32 or compile_s is not None)
    out = {
        "model": m.name,
        "path": str(m.path),
        "device": str(m.device),
        "dtype": str(m.dtype).removeprefix("torch."),
        "quantize": quantize.value,
        "kernels": m.kernels,  # quantized layers per "Class:kernel" (which path ran)
        "cpu": cpu_features() if m.device.type == "cpu" else None,
        "compile": compile_s is not None,
        "compile_s": round(compile_s, 2) if compile_s is not None else None,
        "threads": torch.get_num_threads(),
        "repetitions": reps,
        "load_ms": round(m.load_ms, 1),
        "weights_mb": round(weights_mb, 1),
        "kv_cache_mb": round(kv_mb, 1),
        "cpu_info": cpu_info(),
        "results": results,
        "quality": quality_vs_float32(m) if want_quality else None,
        "compare": compare.value if compare else None,
        "compare_info": compare_info,
    }
    if json_out:
        write_out(json.dumps(out) + "\n")
    else:
        _print_table(out, use_color(color, None))


def _measure(m: Loaded, prompts: dict[int, list[int]], n_gen: int, reps: int, name: str | None, other) -> list[dict]:
    """Warm-up at every prompt length, then the repetitions, alternating attn and the other engine (if any)
    so that machine drift hits both; one row per prompt length."""
    for prompt in prompts.values():  # kernel choices, allocator, CUDA caches: excluded
        _attn_run(m, prompt, min(8, n_gen))
        if other is not None:
            other(prompt, min(8, n_gen))
    results = []
    for p, prompt in prompts.items():
        ours, theirs = [], []
        for _ in range(reps):
            ours.append(_attn_run(m, prompt, n_gen))
            if other is not None:
                theirs.append(other(prompt, n_gen))
        row = {"prompt_tokens": p, "gen_tokens": n_gen, **_summarise(ours), "peak_memory_mb": round(peak_memory_mb(m.device), 1)}
        if other is not None:
            # Same prompt ids, greedy: the tokens agree until the two engines' roundings first pick differently.
            row[name] = {**_summarise(theirs), "same_greedy_tokens": _common_prefix(ours[0]["tokens"], theirs[0]["tokens"])}
            row["ratio"] = {
                k: round(row[f"{k}_tps"]["median"] / row[name][f"{k}_tps"]["median"], 2)
                if row[name][f"{k}_tps"]["median"] else None
                for k in ("prefill", "decode")
            }
        results.append(row)
    return results


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# --- one repetition of each engine ---------------------------------------------------------


def batch_sizes(values: list[str]) -> list[int]:
    """--batch 1,4,16 (or repeated): the sizes, each ≥ 1, in the order given."""
    sizes = []
    for v in values:
        for part in v.replace(",", " ").split():
            if not part.isdigit() or int(part) < 1:
                raise UsageError(f"--batch must be positive integers, comma-separated (got {v!r})")
            sizes.append(int(part))
    if not sizes:
        raise UsageError("--batch needs at least one size")
    return sizes


def _batch_row(m: Loaded, b: int, p: int, n: int, reps: int, vocab: int) -> dict:
    """Batch size b: b rows, each its own random prompt of p tokens, n tokens each; aggregate rates over reps."""
    g = torch.Generator().manual_seed(b)
    prompts = [torch.randint(0, vocab, (p,), generator=g).tolist() for _ in range(b)]
    _batch_run(m, prompts, min(8, n))  # warm-up, excluded; sets up the cache for b rows
    runs = [_batch_run(m, prompts, n) for _ in range(reps)]
    # The cache may hold more rows than b (a larger size ran before): b rows' share of it.
    kv_mb = sum(x.numel() * x.element_size() for name, x in m.model.named_buffers() if name.endswith((".k", ".v"))) / 2**20 * b / m.model.cache_rows
    return {"batch": b, "prompt_tokens": p, "gen_tokens": n, **_summarise(runs), "peak_memory_mb": round(peak_memory_mb(m.device), 1), "kv_cache_mb": round(kv_mb, 1)}


def _batch_run(m: Loaded, prompts: list[list[int]], n: int) -> dict:
    """One greedy batch through the loop `attn batch` drives (EOS ignored). Prefill: from the rows'
    admission to the last row's first token; decode: from there to the end, (n - 1) tokens per row."""
    reset_peak_memory(m.device)
    gens = [Generation(m.model, m.tokenizer, Request(pr, n, GREEDY, ignore_eos=True), set()) for pr in prompts]
    for _ in run_batch(m.model, gens, slots=len(gens), max_len=len(prompts[0]) + n):
        pass
    _sync(m.device)
    t_end = time.perf_counter()  # after the device has finished the last step
    t0, t_first = min(x.t0 for x in gens), max(x.t_first for x in gens)
    rates = _rates(len(prompts[0]), n, t0, t_first, t_end)
    return {k: v * len(prompts) if k != "ttft_ms" and v is not None else v for k, v in rates.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _attn_run(m: Loaded, prompt: list[int], n: int) -> dict:
    """One greedy generation through the loop `attn generate` drives (EOS ignored): TTFT, prefill and decode rates."""
    reset_peak_memory(m.device)
    gen = Generation(m.model, m.tokenizer, Request(prompt, n, GREEDY, ignore_eos=True), set())
    for _ in gen:
        pass
    _sync(m.device)
    gen.t_end = time.perf_counter()  # after the device has finished the last step
    return {**_rates(len(prompt), len(gen.ids), gen.t0, gen.t_first, gen.t_end), "tokens": gen.ids}


def _hf_run(hf, m: Loaded, prompt: list[int], n: int) -> dict:
    """transformers' `generate`: one call for the first token (TTFT), one for all n; decode = the difference."""
    ids = torch.tensor([prompt], device=m.device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        _sync(m.device)
        t1 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        _sync(m.device)
        t2 = time.perf_counter()
    first = t1 - t0
    return {**_rates(len(prompt), n, t1 - first, t1, t1 + (t2 - t1)), "tokens": out[0, len(prompt):].tolist()}


def _llama_run(llama: llamacpp.LlamaCpp, prompt: list[int], n: int) -> dict:
    """llama.cpp in its child process, timed there the way `_attn_run` times attn (the pipe is outside the timings)."""
    r = llama.run(prompt, n)
    return {**_rates(len(prompt), len(r["tokens"]), 0.0, r["ttft_s"], r["ttft_s"] + r["decode_s"]), "tokens": r["tokens"]}


def _rates(p: int, count: int, t0: float, t_first: float, t_end: float) -> dict:
    ttft = t_first - t0
    decode = t_end - t_first
    return {
        "ttft_ms": ttft * 1e3,
        "prefill_tps": p / ttft if ttft > 0 else 0.0,
        "decode_tps": (count - 1) / decode if count > 1 and decode > 0 else None,
    }


def _summarise(runs: list[dict]) -> dict:
    """Median and spread (min, max, every value) of each measure over the repetitions."""
    out = {}
    for key in ("prefill_tps", "decode_tps", "ttft_ms"):
        vals = [r[key] for r in runs if r[key] is not None]
        if not vals:
            out[key] = {"median": None, "min": None, "max": None, "values": []}
            continue
        out[key] = {
            "median": round(statistics.median(vals), 2),
            "min": round(min(vals), 2),
            "max": round(max(vals), 2),
            "values": [round(v, 2) for v in vals],
        }
    return out


# --- llama.cpp -----------------------------------------------------------------------------------


def _start_llamacpp(llama: llamacpp.LlamaCpp, m: Loaded, quantize: Quantize, max_len: int, quiet: bool) -> dict:
    """Start the child, pick or make the GGUF matching attn's mode, load it; what the output says about it."""
    types = llamacpp.gguf_types(quantize.value, str(m.dtype).removeprefix("torch."))
    src = llamacpp.source_gguf(m.path, m.name)
    llama.start()
    path, gtype = llamacpp.gguf_for_mode(src, types, llama, quiet)
    llama.load(path, max_len, quiet)
    return {"gguf": str(path), "gguf_type": gtype, "source_gguf": str(src)}


def _llamacpp_info(llama: llamacpp.LlamaCpp, gguf: dict) -> dict:
    return {
        "engine": "llama.cpp",
        "package": llamacpp.PACKAGE,
        "version": llama.info.get("version"),
        "pinned": llamacpp.PINNED,
        **gguf,
        "threads": llama.threads,
        "extra_buffers": llama.extra_bufts,  # False only after a crash with them (then `crash` says what happened)
        "repacked": llama.repacked,
        "buffers_mib": llama.loaded.get("buffers"),
        "crash": llama.crash,
        "system_info": llama.info.get("system_info"),
    }


# Flags that decide which kernels can run (llama.cpp's and PyTorch's), as /proc/cpuinfo spells them.
CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_info() -> dict:
    """The CPU's model name and kernel-relevant features (Linux): what decides llama.cpp's kernels as well as PyTorch's."""
    flags = set((cpuinfo("flags") or "").split())
    return {
        "model": cpuinfo("model name") or platform.processor() or None,
        "cores": os.cpu_count(),
        "features": [f for f in CPU_FLAGS if f in flags],
    }


# --- transformers ----------------------------------------------------------------------------


def _transformers_class():
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise AttnError("--compare transformers needs the transformers package (pip install transformers)") from None
    return AutoModelForCausalLM


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _load_transformers(cls, m: Loaded):
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # stderr stays for attn's own notes
    try:
        hf = cls.from_pretrained(m.path, dtype=m.dtype, attn_implementation="sdpa")
    except Exception as e:  # transformers raises many types for a directory it cannot read
        raise AttnError(f"transformers could not load {m.path}: {type(e).__name__}: {e}") from None
    return hf.to(m.device).eval()


# --- quality -----------------------------------------------------------------------------------


# Prompts for the greedy-output check: 32 tokens each, compared with float32 eager on the same device.
GREEDY_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "A fluffy blue creature roamed the verdant forest. It",
    "The three primary colors are",
    "Once upon a time, in a small village by the sea,",
]
GREEDY_TOKENS = 32


@torch.inference_mode()
def quality_vs_float32(m: Loaded, max_tokens: int = 512) -> dict:
    """How far this mode is from float32 eager: teacher-forced top-1 agreement and perplexity over
    QUALITY_TEXT, and on how many of GREEDY_PROMPTS 32 greedy tokens (this mode's own decode path,
    compiled step included) are identical."""
    from model.loading import load_model

    ids = m.tokenizer.encode(QUALITY_TEXT)[:max_tokens]
    x = torch.tensor([ids], device=m.device)
    prompts = [m.tokenizer.encode(p) for p in GREEDY_PROMPTS]
    ref = load_model(m.path, torch.float32, m.device)
    ref.setup_cache(len(ids))
    ref_logits = ref(x, 0)[0].float()  # (T, V)
    ref_greedy = [[s.id for s in generate(ref, p, GREEDY_TOKENS, GREEDY)] for p in prompts]
    del ref
    ours = [[s.id for s in generate(m.model, p, GREEDY_TOKENS, GREEDY)] for p in prompts]
    m.model.setup_cache(len(ids))
    logits = m.model(x, 0)[0].float()
    agree = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    nll = torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:]).item()
    ref_nll = torch.nn.functional.cross_entropy(ref_logits[:-1], x[0, 1:]).item()
    return {
        "text_tokens": len(ids),
        "top1_agreement": round(agree, 4),
        "perplexity": round(math.exp(nll), 3),
        "perplexity_float32": round(math.exp(ref_nll), 3),
        "perplexity_diff": round(math.exp(nll) - math.exp(ref_nll), 3),
        "greedy_identical": sum(a == b for a, b in zip(ours, ref_greedy)),
        "greedy_prompts": len(prompts),
        "greedy_tokens": GREEDY_TOKENS,
    }


# --- table ----------------------------------------------------------------------------------------


def _cell(s: dict | None, digits: int = 1) -> str:
    if not s or s.get("median") is None:
        return "—"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def _print_table(out: dict, color: bool) -> None:
    from rich.table import Table

    import sys

    mode = out["dtype"] + (f" {out['quantize']}" if out["quantize"] != "none" else "") + (" compiled" if out["compile"] else "")
    if out["kernels"]:
        mode += " (" + ", ".join(f"{n} × {k}" for k, n in out["kernels"].items()) + ")"
    title = f"{out['model']} · {out['device']} · {mode} · {out['threads']} threads · median (min–max) of {out['repetitions']}"
    table = Table(title=title)
    batched = any("batch" in r for r in out["results"])
    cols = ("batch", "prompt", "gen", "prefill tok/s", "decode tok/s", "× batch 1", "TTFT ms", "KV MiB", "peak MiB") if batched else ("prompt", "gen", "prefill tok/s", "decode tok/s", "TTFT ms", "peak MiB")
    for col in cols:
        table.add_column(col, justify="right")
    compare = out["compare"]
    if compare:
        for col in (f"{compare} prefill", f"{compare} decode", "× prefill", "× decode"):
            table.add_column(col, justify="right")
    for r in out["results"]:
        if batched:
            one = next((x for x in out["results"] if x["batch"] == 1 and x["prompt_tokens"] == r["prompt_tokens"]), None)
            ratio = f"{r['decode_tps']['median'] / one['decode_tps']['median']:.1f}×" if one and one["decode_tps"]["median"] and r["decode_tps"]["median"] else "—"
            table.add_row(str(r["batch"]), str(r["prompt_tokens"]), str(r["gen_tokens"]), _cell(r["prefill_tps"]), _cell(r["decode_tps"]), ratio, _cell(r["ttft_ms"], 0), f"{r['kv_cache_mb']:.1f}", f"{r['peak_memory_mb']:.0f}")
            continue
        cells = [str(r["prompt_tokens"]), str(r["gen_tokens"]), _cell(r["prefill_tps"]), _cell(r["decode_tps"]), _cell(r["ttft_ms"], 0), f"{r['peak_memory_mb']:.0f}"]
        if compare:
            t = r[compare]
            ratio = r["ratio"]
            cells += [_cell(t["prefill_tps"]), _cell(t["decode_tps"]), f"{ratio['prefill']}×", f"{ratio['decode']}×"]
        table.add_row(*cells)
    console = stdout_console(no_color=not color, highlight=False, width=200 if not sys.stdout.isatty() else None)
    console.print(table)
    notes = [f"weights {out['weights_mb']:.0f} MiB, KV cache {out['kv_cache_mb']:.1f} MiB, load {out['load_ms']:.0f} ms"]
    if out["compile_s"] is not None:
        notes.append(f"compile {out['compile_s']:.1f} s (not in the timings)")
    q = out["quality"]
    if q:
        notes.append(
            f"quality over {q['text_tokens']} tokens: top-1 agreement with float32 {q['top1_agreement']:.1%}, "
            f"perplexity {q['perplexity']:.3f} vs {q['perplexity_float32']:.3f} (float32); "
            f"{q['greedy_tokens']} greedy tokens identical to float32 on {q['greedy_identical']}/{q['greedy_prompts']} prompts"
        )
    info = out["compare_info"]
    if info and info["engine"] == "llama.cpp":
        notes += _llamacpp_notes(info)
    console.print("\n".join(notes))


def _llamacpp_notes(info: dict) -> list[str]:
    buffers = ", ".join(f"{name} {mib:.0f} MiB" for name, mib in (info["buffers_mib"] or {}).items())
    lines = [
        f"llama.cpp: {info['package']} {info['version']}"
        + ("" if info["version"] == info["pinned"] else f" (attn's bench extra pins {info['pinned']})")
        + f", {info['gguf_type']} GGUF {info['gguf']}, {info['threads']} threads",
        f"llama.cpp weights: {'repacked for this CPU' if info['repacked'] else 'not repacked'} ({buffers})",
    ]
    crash = info["crash"]
    if crash:
        lines.append(
            f"llama.cpp CRASHED with its repacked weight buffers ({crash['status']} during {crash['during']}); the numbers "
            "above are from a second run without them (use_extra_bufts=False), not llama.cpp's default configuration"
        )
    return lines
