"""`attn batch`: many prompts in one run, decoded together; one JSON record per request on stdout."""

from __future__ import annotations

import json
import secrets
import signal
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import (
    epilog,
    choice,
    ChatOpt,
    Color,
    ColorOpt,
    CtxSizeOpt,
    DeviceOpt,
    Dtype,
    DtypeOpt,
    IgnoreEosOpt,
    InvalidUtf8Opt,
    LogprobsOpt,
    MaxTokensOpt,
    MinPOpt,
    ModelOpt,
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
    note,
    peak_memory_mb,
    sampling_settings,
    use_color,
    write_out,
)
from cli.main import app
from cli.models import Loaded, open_model
from cli.prompt import decode_input, encode_messages, encode_prompt_text, fit_context, stdin_piped
from cli.requests import Item, parse_jsonl, parse_lines
from cli.speed import Quantize, QuantizeOpt
from model.engine import Generation, Request, eos_ids, run_batch
from model.errors import AttnError, UsageError
from model.loading import load_generation_config
from model.sampling import SamplingSettings

# Rows decoded together. Measured on a 2-core CPU (AMD EPYC Zen4), SmolLM2-135M float32, 256 prompts × 64
# tokens (README, Many prompts): 16 rows 207 s, 32 rows 142 s, 64 rows 130 s; 32 takes most of the gain
# for half the KV cache of 64 (the cache is rows × the longest request). CUDA: not measured, room for more.
PARALLEL_CPU, PARALLEL_CUDA = 32, 64

EPILOG = """\
Examples:

  attn batch requests.jsonl > answers.jsonl

  attn batch --lines --temp 0 -n 64 prompts.txt | jq -r .text

  printf '{"id": "a", "prompt": "Hello"}\\n{"id": "b", "messages": [{"role": "user", "content": "Hi"}], "seed": 3}\\n' | attn batch -
"""

class Order(str, Enum):
    input = "input"
    completion = "completion"


@app.command("batch", short_help='Generate for many prompts at once: JSONL or lines in, JSON out.', epilog=epilog(EPILOG))
def batch_cmd(
    file: Annotated[Optional[Path], typer.Argument(metavar="FILE", help="JSONL requests, or prompts with --lines ('-' or none: stdin).", show_default=False)] = None,
    model: ModelOpt = None,
    lines: Annotated[bool, typer.Option("--lines", help="Plain text: each line with a non-space character is a prompt, its id the line number.")] = False,
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
    ctx_size: CtxSizeOpt = None,
    truncate: TruncateOpt = Truncate.error,
    logprobs: LogprobsOpt = None,
    parallel: Annotated[
        Optional[int],
        typer.Option("--parallel", min=1, help=f"Requests decoded together. [default: {PARALLEL_CPU} on CPU (measured: README, Many prompts), {PARALLEL_CUDA} on CUDA]", show_default=False),
    ] = None,
    order: Annotated[Order, typer.Option("--order", **choice(Order), help="Records in input order (held back as needed) or as requests complete.")] = Order.input,
    stats: Annotated[bool, typer.Option("--stats", help="Requests, tokens, wall time, tok/s and peak memory to stderr at the end.")] = False,
    invalid_utf8: InvalidUtf8Opt = "error",
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    color: ColorOpt = Color.auto,
) -> None:
    """Generate for many prompts in one run: JSONL (or lines) in, one JSON record per request out.

    A request is {"id", "prompt"} or {"id", "messages"}, optionally with max_tokens, temperature,
    top_p, top_k, min_p, seed and stop; the flags are the defaults. A bad line or request gives an
    error record {"id", "line", "error"} and the rest go on. Exit status: 0 when every request
    succeeded, 1 when any failed.
    """
    t_start = time.perf_counter()
    data = _read_input(file)
    text = decode_input(data, "stdin" if file is None or str(file) == "-" else str(file), invalid_utf8, quiet)
    items = parse_lines(text) if lines else parse_jsonl(text)

    m = open_model(model, device, dtype, quiet, quantize.value)
    defaults = sampling_settings(m.path, load_generation_config(m.path), temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n)
    eos = eos_ids(m.cfg, m.tokenizer)
    runs: list[tuple[Item, Generation]] = []  # the requests that can run, in input order
    truncated = 0
    for item in items:
        if item.error is None:
            try:
                gen, cut = prepare(item, m, defaults, max_tokens, seed, stop or [], ignore_eos, chat, system, ctx_size, truncate, logprobs, eos)
                runs.append((item, gen))
                truncated += cut
            except AttnError as e:  # a request over the context, a chat template that fails on it, …
                item.error = str(e)
    if truncated:
        note(f"warning: {truncated} prompt(s) truncated on the left to fit the context", quiet)
    slots = parallel or (PARALLEL_CUDA if m.device.type == "cuda" else PARALLEL_CPU)
    slots = max(1, min(slots, len(runs)))
    max_len = max((len(g.request.prompt_ids) + g.request.max_new_tokens for _, g in runs), default=1)

    records = Records(order, len(items))
    for item in items:
        if item.error is not None:
            records.done(item.index, {"id": item.id, "line": item.line, "error": item.error})
    progress = Progress(len(items), sum(i.error is not None for i in items), enabled=sys.stderr.isatty() and not quiet, color=use_color(color))
    tokens = 0
    code = 0
    with InterruptFlag() as interrupted, progress:
        item_of = {id(g): item for item, g in runs}
        events = run_batch(m.model, (g for _, g in runs), slots, max_len)
        try:
            for gen, tok in events:
                if tok is not None:
                    tokens += tok.id is not None
                else:
                    item = item_of[id(gen)]
                    records.done(item.index, record(item, gen))
                    progress.advance(tokens)
                if interrupted.signal:
                    break
        finally:
            events.close()
        if interrupted.signal:
            records.flush_finished()  # what finished stays, in order; what did not is left out
            code = 143 if interrupted.signal == signal.SIGTERM else 130
    failed = sum(1 for r in records.written if "error" in r)
    if stats:  # (after an interruption too, as generate's)
        wall = time.perf_counter() - t_start
        done = f"{len(records.written)} of {len(items)} written, interrupted" if code else f"{len(items)} requests"
        note(
            f"{done} ({failed} failed) · {tokens} tokens in {wall:.1f} s · {tokens / wall:.1f} tok/s overall · "
            f"{slots} at a time · load {m.load_ms:.0f} ms · peak memory {peak_memory_mb(m.device):.0f} MiB"
        )
    if code:
        raise typer.Exit(code)
    if failed:
        raise typer.Exit(1)


# --- input -------------------------------------------------------------------------------


def _read_input(file: Path | None) -> bytes:
    if file is None or str(file) == "-":
        if file is None and not stdin_piped():
            raise UsageError("no input: give a FILE of requests, or pipe them on stdin ('-')")
        if sys.stdin is None:
            raise UsageError("'-' asks for stdin, but there is none")
        return sys.stdin.buffer.read()
    try:
        return file.read_bytes()
    except OSError as e:
        raise AttnError(f"cannot read {file}: {e.strerror}") from None


def prepare(
    item: Item, m: Loaded, defaults: SamplingSettings, max_tokens: int, seed: int | None, stops: list[str], ignore_eos: bool,
    chat: bool | None, system: str | None, ctx_size: int | None, truncate: Truncate, logprobs: int | None, eos: set[int],
) -> tuple[Generation, bool]:
    """The item's Generation (its fields over the command's defaults), and whether its prompt was truncated."""
    f = item.fields
    n = f.get("max_tokens", max_tokens)
    use_chat = "messages" in f or (chat if chat is not None else bool(m.tokenizer.chat_template))
    ids = encode_messages(m, f["messages"]) if "messages" in f else encode_prompt_text(m, f["prompt"], use_chat, system)[0]
    fitted = fit_context(m, ids, n, ctx_size, truncate, quiet=True, chat=use_chat, said_as="max_tokens" if "max_tokens" in f else "--max-tokens")
    settings = SamplingSettings(
        temperature=float(f.get("temperature", defaults.temperature)),
        top_k=f.get("top_k", defaults.top_k),
        top_p=float(f.get("top_p", defaults.top_p)),
        min_p=float(f.get("min_p", defaults.min_p)),
        repeat_penalty=defaults.repeat_penalty,
        repeat_last_n=defaults.repeat_last_n,
    )
    chosen = f.get("seed", seed if seed is not None else secrets.randbelow(2**31))
    stop = f.get("stop", stops)
    request = Request(fitted, n, settings, chosen, [stop] if isinstance(stop, str) else list(stop), ignore_eos, logprobs)
    return Generation(m.model, m.tokenizer, request, eos), len(fitted) < len(ids)


# --- output ------------------------------------------------------------------------------


def record(item: Item, g: Generation) -> dict:
    """The output record of a request that ran: its text and how it ended, or the error that ended it."""
    if g.error is not None:
        return {"id": item.id, "line": item.line, "error": f"{g.error}; try --dtype float32"}
    out = {
        "id": item.id,
        "line": item.line,
        "text": g.text,
        "finish_reason": g.finish_reason,
        "usage": {"prompt_tokens": len(g.request.prompt_ids), "completion_tokens": len(g.ids)},
        "seed": g.request.seed,
    }
    if g.request.logprobs is not None:
        out["logprobs"] = g.logprobs
    return out


class Records:
    """Writes records whole, one line each, flushed: in input order (held back until those before
    are written) or as they complete."""

    def __init__(self, order: Order, total: int) -> None:
        self.order, self.total = order, total
        self.held: dict[int, dict] = {}
        self.next = 0  # the first index not yet written (input order)
        self.written: list[dict] = []

    def done(self, index: int, rec: dict) -> None:
        if self.order is Order.completion:
            self._write(rec)
            return
        self.held[index] = rec
        while self.next in self.held:
            self._write(self.held.pop(self.next))
            self.next += 1

    def flush_finished(self) -> None:
        """After an interruption: every finished record still held, in input order (the unfinished ones missing)."""
        for index in sorted(self.held):
            self._write(self.held.pop(index))

    def _write(self, rec: dict) -> None:
        write_out(json.dumps(rec, ensure_ascii=False) + "\n")
        self.written.append(rec)


class InterruptFlag:
    """Ctrl-C and SIGTERM set a flag instead of raising, so a record is never cut mid-line; the loop
    checks it after each event and stops there."""

    def __enter__(self) -> InterruptFlag:
        self.signal = 0
        self.previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._set)
            except ValueError:  # not the main thread (an embedding application): leave signals alone
                pass
        return self

    def _set(self, signum, frame) -> None:
        self.signal = self.signal or signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Progress:
    """Requests done and tokens per second on stderr, as a rich bar, when stderr is a terminal."""

    def __init__(self, total: int, done: int, enabled: bool, color: bool) -> None:
        self.enabled, self.total, self.done = enabled, total, done
        self.t0 = time.perf_counter()
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

            console = Console(file=sys.stderr, no_color=not color)
            self.bar = Bar(TextColumn("requests"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console, transient=True)
            self.task = self.bar.add_task("", total=total, completed=done, rate="")

    def __enter__(self) -> Progress:
        if self.enabled:
            self.bar.start()
        return self

    def advance(self, tokens: int) -> None:
        if self.enabled:
            rate = tokens / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, advance=1, rate=f"{rate:.1f} tok/s")

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()
