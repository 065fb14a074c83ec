"""`attn generate`: stream sampled text to stdout; stats, notes and errors to stderr."""

from __future__ import annotations

import json
import secrets
import sys
from typing import Annotated

import typer

from cli import common
from cli.common import (
    epilog,
    ChatOpt,
    ColorOpt,
    Color,
    CtxSizeOpt,
    DeviceOpt,
    Dtype,
    DtypeOpt,
    FileOpt,
    IgnoreEosOpt,
    InvalidUtf8Opt,
    LogprobsOpt,
    MaxTokensOpt,
    MinPOpt,
    ModelOpt,
    NoStdinOpt,
    PromptArg,
    PromptOpt,
    QuietOpt,
    RepeatLastNOpt,
    RepeatPenaltyOpt,
    SeedOpt,
    StopOpt,
    SystemOpt,
    TempOpt,
    TopKOpt,
    TopPOpt,
    Truncate,
    TruncateOpt,
    VerboseOpt,
    interrupted_code,
    note,
    peak_memory_mb,
    sampling_settings,
    write_out,
)
from cli.main import app
from cli.models import Loaded, open_model
from cli.parallel import TpOpt, every_rank, rank0, release, start
from cli.prompt import encode_prompt_text, fit_context, read_prompt
from cli.speed import CompileOpt, Quantize, QuantizeOpt, apply_speed_options
from model.errors import AttnError, UsageError
from model.engine import Generation, Request, Token, eos_ids
from model.generate import NonFiniteLogits
from model.loading import load_generation_config

EPILOG = """\
Examples:

  attn generate "a fluffy blue creature roamed the verdant forest"

  cat notes.txt | attn generate "Summarize:" | tee summary.txt

  attn generate --raw --temp 0 -n 32 "The capital of France is"

  attn generate --json --logprobs 3 -n 8 "Hello"
"""


@app.command("generate", short_help='Generate text from a prompt, streamed to stdout.', epilog=epilog(EPILOG))
def generate_cmd(
    ctx: typer.Context,
    prompt: PromptArg = None,
    model: ModelOpt = None,
    prompt_opt: PromptOpt = None,
    file: FileOpt = None,
    max_tokens: MaxTokensOpt = 256,
    temp: TempOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatPenaltyOpt = None,
    repeat_last_n: RepeatLastNOpt = 64,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    ignore_eos: IgnoreEosOpt = False,
    chat: ChatOpt = None,
    system: SystemOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    quantize: QuantizeOpt = Quantize.none,
    compile_step: CompileOpt = None,
    tp: TpOpt = None,
    ctx_size: CtxSizeOpt = None,
    truncate: TruncateOpt = Truncate.error,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object at the end instead of streamed text.")] = False,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="One JSON event per line: token events, then a done event.")] = False,
    logprobs: LogprobsOpt = None,
    stats: Annotated[bool, typer.Option("--stats", help="Timings and peak memory to stderr.")] = False,
    echo: Annotated[bool, typer.Option("--echo", help="Print the prompt before the generated text.")] = False,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="Print the text once, at the end.")] = False,
    no_stdin: NoStdinOpt = False,
    invalid_utf8: InvalidUtf8Opt = "error",
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    color: ColorOpt = Color.auto,
) -> None:
    """Generate text from a prompt, streamed to stdout.

    Sampling defaults come from the model's generation_config.json when it has one, else
    temperature 0.8 and top-p 0.95. Flags beat ATTN_* env vars, which beat generation_config.json.
    """
    start(tp, model, device, quiet, {"--quantize": quantize is not Quantize.none, "--compile": compile_step is True})
    text = read_prompt(prompt, prompt_opt, file, no_stdin, invalid_utf8, quiet)
    if text is None:
        sys.stderr.write(ctx.get_usage() + "\n")
        raise UsageError("no prompt: give one as an argument, with -p/-f, or on stdin")
    if text == "":
        raise UsageError("empty prompt")
    if json_out and jsonl:
        raise UsageError("--json and --jsonl are alternatives: choose one")
    if logprobs is not None and not (json_out or jsonl):
        raise UsageError("--logprobs needs --json or --jsonl")

    m = open_model(model, device, dtype, quiet, quantize.value, defer_packing=True)
    settings = sampling_settings(m.path, load_generation_config(m.path), temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n)
    use_chat = chat if chat is not None else bool(m.tokenizer.chat_template)
    ids = encode_prompt_text(m, text, use_chat, system)[0]
    ids = fit_context(m, ids, max_tokens, ctx_size, truncate, quiet, use_chat)
    apply_speed_options(m, compile_step, len(ids) + max_tokens, quiet)
    if seed is None:
        seed = rank0(secrets.randbelow, 2**31)
        if verbose:
            note(f"seed {seed}")

    mode = "json" if json_out else "jsonl" if jsonl else "text"
    request = Request(ids, max_tokens, settings, seed, stop or [], ignore_eos, logprobs)
    gen = Generation(m.model, m.tokenizer, request, eos_ids(m.cfg, m.tokenizer))
    if echo and mode == "text":
        # Raw text continues the prompt; a chat answer is a reply, put on a line of its own.
        write_out(text + ("\n" if use_chat else ""))
    code = run(gen, mode, stream=not no_stream)
    peaks = every_rank(peak_memory_mb(m.device)) if stats and code == 0 else [peak_memory_mb(m.device)]
    release()
    if mode == "text":
        write_out((gen.text if no_stream else "") + "\n")
    summary = summarize(m, gen, seed)
    if mode == "json":
        write_out(json.dumps(summary, ensure_ascii=False) + "\n")
    elif mode == "jsonl":
        write_out(json.dumps({"type": "done", **{k: v for k, v in summary.items() if k not in ("text", "logprobs")}}, ensure_ascii=False) + "\n")
    if stats:
        t = summary["timings"]
        note(
            f"load {t['load_ms']:.0f} ms · prompt {summary['usage']['prompt_tokens']} tokens · TTFT {t['ttft_ms']:.0f} ms · "
            f"prefill {t['prompt_tps']:.1f} tok/s · decode {t['decode_tps']:.1f} tok/s ({summary['usage']['completion_tokens']} tokens) · "
            + (f"peak memory {peaks[0]:.0f} MiB" if len(peaks) == 1 else f"peak memory per rank {' / '.join(f'{p:.0f}' for p in peaks)} MiB")
        )
    if code:
        raise typer.Exit(code)


def run(gen: Generation, mode: str, stream: bool) -> int:
    """Drive the generation, showing text as it comes; the exit code (0, or 130/143 when interrupted)."""

    def show(tok: Token) -> None:
        if mode == "text" and stream:
            write_out(tok.text)
        elif mode == "jsonl" and tok.id is not None:
            event = {"type": "token", "text": tok.text, "id": tok.id, **(tok.logprob or {})}
            write_out(json.dumps(event, ensure_ascii=False) + "\n")

    try:
        for tok in gen:
            show(tok)
            if common.SIGNALLED:  # the signal's KeyboardInterrupt was lost inside a library call
                raise KeyboardInterrupt
    except NonFiniteLogits as e:
        raise AttnError(f"{e}; try --dtype float32") from None
    except KeyboardInterrupt:
        rest = gen.interrupted()
        if rest:
            show(Token(None, rest))
        return interrupted_code()
    return 0


def summarize(m: Loaded, gen: Generation, seed: int) -> dict:
    """The --json object (and, without text and logprobs, the --jsonl done event)."""
    t = gen.timings()
    out = {
        "text": gen.text,
        "finish_reason": gen.finish_reason,
        "stop_sequence": gen.stop_sequence,
        "usage": {"prompt_tokens": len(gen.request.prompt_ids), "completion_tokens": len(gen.ids)},
        "timings": {
            "load_ms": round(m.load_ms, 2),
            "ttft_ms": round(t["ttft_ms"], 2),
            "prompt_ms": round(t["prompt_ms"], 2),
            "prompt_tps": round(t["prompt_tps"], 2),
            "decode_ms": round(t["decode_ms"], 2),
            "decode_tps": round(t["decode_tps"], 2),
            "total_ms": round(m.load_ms + t["run_ms"], 2),
        },
        "seed": seed,
        "model": m.name,
        "device": str(m.device),
        "dtype": str(m.dtype).removeprefix("torch."),
        "params": m.params,
    }
    if gen.request.logprobs is not None:
        out["logprobs"] = gen.logprobs
    return out
