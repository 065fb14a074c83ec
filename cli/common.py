"""What several commands share: typed options, the defaults they name, and writing to stdout and stderr."""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer

from cli.requests import MAX_SEED
from model.errors import AttnError, UsageError
from model.sampling import SamplingSettings
from weights.registry import DEFAULT_MODEL

DEMO_SENTENCE = "a fluffy blue creature roamed the verdant forest"


class Color(str, Enum):
    auto = "auto"
    always = "always"
    never = "never"


class Dtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


# --- help and options shared by several commands -----------------------------------------


def epilog(text: str) -> str:
    """An --help epilog printed as written (click rewraps a paragraph unless it opens with \\b): an
    unindented line after a blank one starts a section; the blank lines inside one are dropped."""
    sections: list[list[str]] = []
    blank = True
    for line in text.splitlines():
        if not line.strip():
            blank = True
            continue
        if blank and not line.startswith(" ") or not sections:
            sections.append([])
        sections[-1].append(line)
        blank = False
    return "\n\n".join("\b\n" + "\n".join(lines) for lines in sections)



def one_of(names: list[str]) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def choice(enum: type[Enum], aliases: dict[str, str] | None = None, metavar: str | None = None, expected: str | None = None) -> dict[str, Any]:
    """typer.Option arguments for a fixed set of values: the Enum member, or an error phrased as
    attn's others (`--format must be table, json or csv (got 'yaml')`); `aliases` maps other
    accepted spellings to values, `expected` says in the error what is accepted when the values
    alone would not."""
    names = [e.value for e in enum]
    expected = expected or one_of(names)

    def parse(value: Any) -> Enum:
        if isinstance(value, enum):  # the default
            return value
        try:
            return enum((aliases or {}).get(value, value))
        except ValueError:
            raise typer.BadParameter(f"must be {expected} (got {value!r})") from None

    return {"parser": parse, "metavar": metavar or "|".join(names)}


ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", envvar="ATTN_MODEL", help=f"Registry name, model directory, .gguf file, or hub id (ORG/NAME). [default: {DEFAULT_MODEL}]", show_default=False),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N (auto: CUDA when available).")]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", **choice(Dtype), help="Weights and activations dtype (auto: bfloat16 on CUDA, float32 on CPU).")]
ColorOpt = Annotated[Color, typer.Option("--color", **choice(Color), help="Colour on stderr / tables: auto (TTY, honours NO_COLOR), always, never.")]

VERBOSE = False  # set when the running command parsed -v/--verbose: errors then show their traceback


def _verbose(value: bool) -> bool:
    """Runs when typer has parsed -v/--verbose for the command: tracebacks follow the option itself,
    so a `-v` that is a value (`--stop -v`, `-p -v`) turns nothing on."""
    global VERBOSE
    VERBOSE = VERBOSE or value
    return value


VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", callback=_verbose, help="More detail on stderr (a chosen seed, tracebacks of errors).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No warnings or notes on stderr.")]
PromptArg = Annotated[Optional[str], typer.Argument(help="The prompt ('-' reads stdin). Piped stdin is prepended.", show_default=False)]
PromptOpt = Annotated[Optional[str], typer.Option("--prompt", "-p", help="The prompt, as an option.", show_default=False)]
FileOpt = Annotated[Optional[Path], typer.Option("--file", "-f", help="Read the prompt from a file ('-' = stdin).", show_default=False)]
NoStdinOpt = Annotated[bool, typer.Option("--no-stdin", help="Ignore stdin even when it is piped.")]
ChatOpt = Annotated[
    Optional[bool], typer.Option("--chat/--raw", help="Apply the model's chat template. [default: chat when the model ships a template, else raw]", show_default=False)
]
RawChatOpt = Annotated[bool, typer.Option("--chat/--raw", help="Apply the model's chat template to the prompt. [default: raw]", show_default=False)]
TokenOpt = Annotated[
    Optional[str],
    typer.Option("--token", "-t", help="The chosen token: an index (negative from the end) or its text ('the' finds 'the' and ' the'; a word split into pieces, its last piece). [default: the last token]", show_default=False),
]
OccurrenceOpt = Annotated[Optional[int], typer.Option("--occurrence", help="With --token TEXT: which match, 1 = first, -1 = last. [default: 1]", show_default=False)]
SystemOpt = Annotated[Optional[str], typer.Option("--system", help="System message (chat mode).", show_default=False)]
class InvalidUtf8(str, Enum):
    error = "error"
    replace = "replace"


InvalidUtf8Opt = Annotated[
    InvalidUtf8, typer.Option("--invalid-utf8", **choice(InvalidUtf8), help="Input that is not UTF-8: 'error' (exit 2) or 'replace' (U+FFFD, with a warning).")
]

# Sampling: None means "not given", so ATTN_* env vars, then generation_config.json, then built-ins apply.
TempOpt = Annotated[Optional[float], typer.Option("--temp", "--temperature", envvar="ATTN_TEMP", min=0.0, help="Temperature; 0 = greedy. [default: generation_config.json, else 0.8]", show_default=False)]
TopKOpt = Annotated[Optional[int], typer.Option("--top-k", envvar="ATTN_TOP_K", min=0, help="Keep the K most likely tokens (0 = off). [default: generation_config.json, else 0]", show_default=False)]
TopPOpt = Annotated[Optional[float], typer.Option("--top-p", envvar="ATTN_TOP_P", help="Nucleus sampling, in (0, 1]. [default: generation_config.json, else 0.95]", show_default=False)]
MinPOpt = Annotated[Optional[float], typer.Option("--min-p", envvar="ATTN_MIN_P", min=0.0, max=1.0, help="Drop tokens below P × the top probability. [default: generation_config.json, else 0]", show_default=False)]
RepeatPenaltyOpt = Annotated[Optional[float], typer.Option("--repeat-penalty", envvar="ATTN_REPEAT_PENALTY", help="Penalty on recent tokens (1.0 = off). [default: generation_config.json, else 1.0]", show_default=False)]
RepeatLastNOpt = Annotated[int, typer.Option("--repeat-last-n", envvar="ATTN_REPEAT_LAST_N", min=-1, help="How many recent tokens the penalty sees (-1 = all).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", envvar="ATTN_SEED", min=0, max=MAX_SEED, help="Random seed. [default: a random one, reported with -v and in JSON]", show_default=False)]

# Generation: what to generate and when to stop (generate, batch).
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", "-n", envvar="ATTN_MAX_TOKENS", min=1, help="New tokens at most.")]
StopOpt = Annotated[Optional[list[str]], typer.Option("--stop", metavar="TEXT", help="Stop at this text (repeatable); it is not printed.", show_default=False)]
IgnoreEosOpt = Annotated[bool, typer.Option("--ignore-eos", help="Keep going past end-of-sequence tokens.")]
CtxSizeOpt = Annotated[Optional[int], typer.Option("--ctx-size", min=1, help="Context length. [default: the model's]", show_default=False)]


class Truncate(str, Enum):
    error = "error"
    left = "left"


TruncateOpt = Annotated[Truncate, typer.Option("--truncate", **choice(Truncate), help="Prompt + max tokens over the context: error, or keep the tail (left).")]
LogprobsOpt = Annotated[
    Optional[int], typer.Option("--logprobs", min=0, max=20, help="Per-token logprob, bytes and the top K alternatives (generate: with --json/--jsonl; batch: in each record).", show_default=False)
]


# --- streams -------------------------------------------------------------------------


def use_color(choice: Color, stream=None) -> bool:
    """--color, then NO_COLOR, FORCE_COLOR, TERM=dumb, then whether the stream is a TTY."""
    stream = stream or sys.stderr
    if choice is not Color.auto:
        return choice is Color.always
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    if os.environ.get("TERM") == "dumb":
        return False
    return stream.isatty()


def size_text(n_bytes: float) -> str:
    """A size in binary units, as every output of attn gives it (bench and README too): 513.6 MiB, 1.25 GiB."""
    if n_bytes >= 2**30:
        return f"{n_bytes / 2**30:.2f} GiB"
    if n_bytes >= 2**20:
        return f"{n_bytes / 2**20:.1f} MiB"
    return f"{n_bytes / 2**10:.1f} KiB"


def note(message: str, quiet: bool = False) -> None:
    """A line for the user on stderr (never stdout)."""
    if not quiet:
        sys.stderr.write(f"attn: {message}\n")
        sys.stderr.flush()


TERMINATED = False  # set by the SIGTERM handler: an interruption then exits 143, not 130
SIGNALLED = False  # set by the SIGINT and SIGTERM handlers, as well as raised: a loop that checks it stops even where a library swallowed the KeyboardInterrupt


class PipeClosed(Exception):
    """The reader of stdout went away (`| head`): stop at once, exit 141, say nothing."""


def write_out(text: str) -> None:
    """Product text to stdout as UTF-8 bytes, flushed. An unbuffered stdout (PYTHONUNBUFFERED) may take part of a
    write: the rest follows, so that a reader that went away is seen."""
    data = memoryview(text.encode("utf-8"))
    try:
        while data:
            n = sys.stdout.buffer.write(data)
            data = data[n if n is not None else 0 :]
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        raise PipeClosed from None
    except OSError as e:  # a full disk, an I/O error
        raise AttnError(f"cannot write to stdout: {e.strerror or e}") from None


def stdout_console(**options: Any) -> Any:
    """A rich Console on stdout whose reader going away is PipeClosed (exit 141), and a failed write one error line
    (rich's own handling exits 1)."""
    from rich.console import Console

    class Out(Console):
        def on_broken_pipe(self) -> None:
            devnull = os.open(os.devnull, os.O_WRONLY)  # (as rich does: nothing more reaches the closed pipe)
            os.dup2(devnull, sys.stdout.fileno())
            raise PipeClosed

        def _check_buffer(self) -> None:  # (rich's own write: it calls on_broken_pipe for a closed pipe, and raises any other OSError)
            try:
                super()._check_buffer()
            except OSError as e:
                raise AttnError(f"cannot write to stdout: {e.strerror or e}") from None

    return Out(file=sys.stdout, **options)


def write_file(path: Path, data: bytes) -> None:
    """`data` to `path`, whole or not at all: a temporary file beside it, then renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # (a folder that is not one, say: there is nothing to remove)
            pass
        raise AttnError(f"cannot write {path}: {e.strerror or e}") from None


def interrupted_code() -> int:
    return 143 if TERMINATED else 130


def reset_peak_memory(device: torch.device) -> None:
    """Start `peak_memory_mb` over (a bench row's own peak, not the process's so far). On Linux the process's peak
    resident size (VmHWM) is reset through /proc/self/clear_refs; elsewhere the CPU peak is the process's."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """MiB: CUDA's allocated peak, or the process's peak resident size since `reset_peak_memory` (or its start)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def sampling_settings(
    model_dir: Path, gen_cfg: dict, temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n
) -> SamplingSettings:
    """Flags and ATTN_* env (already merged by typer) beat generation_config.json, which beats built-ins."""
    if gen_cfg.get("do_sample") is False:
        g_temp = 0.0
    else:
        g_temp = gen_cfg.get("temperature")
    has_gen = bool(gen_cfg) and any(k in gen_cfg for k in ("temperature", "top_p", "top_k", "do_sample"))
    flags = SamplingSettings(
        temperature=_first(temp, 0.8), top_k=_first(top_k, 0), top_p=_first(top_p, 0.95), min_p=_first(min_p, 0.0),
        repeat_penalty=_first(repeat_penalty, 1.0), repeat_last_n=repeat_last_n,
    )
    problems = flags.check()
    if problems:
        raise UsageError(problems[0])
    # generation_config.json fills in what no flag gave: a value there that is no number, or out of range, is the file's fault
    from_file = {
        "temperature": ("temperature", g_temp if temp is None else None),
        "top_k": ("top_k", gen_cfg.get("top_k") if has_gen and top_k is None else None),
        "top_p": ("top_p", gen_cfg.get("top_p") if has_gen and top_p is None else None),
        "min_p": ("min_p", gen_cfg.get("min_p") if min_p is None else None),
        "repeat_penalty": ("repetition_penalty", gen_cfg.get("repetition_penalty") if repeat_penalty is None else None),
    }
    s = flags
    for field, (key, value) in from_file.items():
        if value is None:
            continue
        where = f"{model_dir / 'generation_config.json'}: {key}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (field == "top_k" and not float(value).is_integer()):
            raise AttnError(f"{where} must be a{'n integer' if field == 'top_k' else ' number'} (got {value!r})")
        s = replace(s, **{field: int(value) if field == "top_k" else float(value)})
        problems = s.check()
        if problems:
            raise AttnError(f"{where} {problems[0].split(' ', 1)[1]}")  # ("--top-p must be …": the file's key instead)
    return s


def _first(*values):
    return next(v for v in values if v is not None)
