"""What several commands share: typed options, reading the prompt, writing stdout, opening a model."""

from __future__ import annotations

import os
import resource
import stat
import sys
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from model.config import ModelConfig
from model.decoder import Decoder
from model.errors import AttnError, UsageError
from model.loading import DTYPES, load_model
from model.sampling import SamplingSettings
from model.tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"
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


# --- options shared by several commands ------------------------------------------------

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", envvar="ATTN_MODEL", help=f"Registry name, model directory, or hub id. [default: {DEFAULT_MODEL}]", show_default=False),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N (auto: CUDA when available).")]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="Weights and activations dtype (auto: bfloat16 on CUDA, float32 on CPU).")]
ColorOpt = Annotated[Color, typer.Option("--color", help="Colour on stderr / tables: auto (TTY, honours NO_COLOR), always, never.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="More detail on stderr (chosen seed, tracebacks).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No warnings or notes on stderr.")]
PromptArg = Annotated[Optional[str], typer.Argument(help="The prompt ('-' reads stdin). Piped stdin is prepended.", show_default=False)]
PromptOpt = Annotated[Optional[str], typer.Option("--prompt", "-p", help="The prompt, as an option.", show_default=False)]
FileOpt = Annotated[Optional[Path], typer.Option("--file", "-f", help="Read the prompt from a file ('-' = stdin).", show_default=False)]
NoStdinOpt = Annotated[bool, typer.Option("--no-stdin", help="Ignore stdin even when it is piped.")]
ChatOpt = Annotated[
    Optional[bool], typer.Option("--chat/--raw", help="Apply the model's chat template (default: on when the model ships one).", show_default=False)
]
RawChatOpt = Annotated[bool, typer.Option("--chat/--raw", help="Apply the model's chat template to the prompt. [default: raw]", show_default=False)]
TokenOpt = Annotated[
    Optional[str],
    typer.Option("--token", "-t", help="The chosen token: an index (negative from the end) or its text ('creature' matches ' creature'). [default: the last token]", show_default=False),
]
OccurrenceOpt = Annotated[Optional[int], typer.Option("--occurrence", help="With --token TEXT: which match, 1 = first, -1 = last. [default: 1]", show_default=False)]
SystemOpt = Annotated[Optional[str], typer.Option("--system", help="System message (chat mode).", show_default=False)]
InvalidUtf8Opt = Annotated[
    str, typer.Option("--invalid-utf8", help="Input that is not UTF-8: 'error' (exit 2) or 'replace' (U+FFFD, with a warning).")
]

# Sampling: None means "not given", so ATTN_* env vars, then generation_config.json, then built-ins apply.
TempOpt = Annotated[Optional[float], typer.Option("--temp", "--temperature", envvar="ATTN_TEMP", min=0.0, help="Temperature; 0 = greedy. [default: generation_config.json, else 0.8]", show_default=False)]
TopKOpt = Annotated[Optional[int], typer.Option("--top-k", envvar="ATTN_TOP_K", min=0, help="Keep the K most likely tokens (0 = off).", show_default=False)]
TopPOpt = Annotated[Optional[float], typer.Option("--top-p", envvar="ATTN_TOP_P", help="Nucleus sampling, in (0, 1]. [default: generation_config.json, else 0.95]", show_default=False)]
MinPOpt = Annotated[Optional[float], typer.Option("--min-p", envvar="ATTN_MIN_P", min=0.0, max=1.0, help="Drop tokens below P × the top probability.", show_default=False)]
RepeatPenaltyOpt = Annotated[Optional[float], typer.Option("--repeat-penalty", envvar="ATTN_REPEAT_PENALTY", help="Penalty on recent tokens (1.0 = off).", show_default=False)]
RepeatLastNOpt = Annotated[int, typer.Option("--repeat-last-n", envvar="ATTN_REPEAT_LAST_N", min=-1, help="How many recent tokens the penalty sees (-1 = all).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", envvar="ATTN_SEED", min=0, help="Random seed (chosen and reported when absent).", show_default=False)]


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


def note(message: str, quiet: bool = False) -> None:
    """A line for the user on stderr (never stdout)."""
    if not quiet:
        sys.stderr.write(f"attn: {message}\n")
        sys.stderr.flush()


TERMINATED = False  # set by the SIGTERM handler: an interruption then exits 143, not 130


class PipeClosed(Exception):
    """The reader of stdout went away (`| head`): stop at once, exit 141, say nothing."""


def write_out(text: str) -> None:
    """Product text to stdout as UTF-8 bytes, flushed."""
    if text:
        try:
            sys.stdout.buffer.write(text.encode("utf-8"))
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            raise PipeClosed from None


def interrupted_code() -> int:
    return 143 if TERMINATED else 130


def decode_input(data: bytes, source: str, invalid: str, quiet: bool) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if invalid == "replace":
            note(f"warning: {source} is not valid UTF-8 (byte offset {e.start}); invalid bytes replaced with U+FFFD", quiet)
            return data.decode("utf-8", errors="replace")
        raise UsageError(f"{source} is not valid UTF-8 at byte offset {e.start} (use --invalid-utf8 replace to accept it)") from None


def read_prompt(
    arg: str | None, opt: str | None, file: Path | None, no_stdin: bool, invalid: str = "error", quiet: bool = False
) -> str | None:
    """The prompt from argument / -p / -f, with piped stdin prepended (`stdin + "\\n\\n" + prompt`)."""
    if invalid not in ("error", "replace"):
        raise UsageError(f"--invalid-utf8 must be 'error' or 'replace' (got {invalid!r})")
    if arg is not None and opt is not None:
        raise UsageError("give the prompt once: as an argument or with --prompt, not both")
    prompt = opt if opt is not None else arg
    explicit_stdin = prompt == "-" or (file is not None and str(file) == "-")
    if prompt == "-":
        prompt = None
    if file is not None and str(file) != "-":
        if prompt is not None:
            raise UsageError("give the prompt once: --file or a prompt, not both")
        try:
            prompt = decode_input(file.read_bytes(), str(file), invalid, quiet)
        except OSError as e:
            raise AttnError(f"cannot read {file}: {e.strerror}") from None
    stdin_text = None
    if explicit_stdin and sys.stdin is None:
        raise UsageError("'-' asks for stdin, but there is none")
    if explicit_stdin or (not no_stdin and _stdin_piped()):
        stdin_text = decode_input(sys.stdin.buffer.read(), "stdin", invalid, quiet) or None  # empty stdin adds nothing
    if stdin_text is not None and prompt is not None:
        return stdin_text.rstrip("\n") + "\n\n" + prompt
    return stdin_text if stdin_text is not None else prompt


def _stdin_piped() -> bool:
    """True when stdin is a pipe or file; False for a terminal, a closed stdin or /dev/null (as in CI)."""
    if sys.stdin is None or sys.stdin.isatty():
        return False
    try:
        st = os.fstat(sys.stdin.fileno())
    except (OSError, ValueError):
        return True  # not a real file descriptor (an in-process test): trust it
    return not stat.S_ISCHR(st.st_mode)  # /dev/null and other character devices carry no prompt


# --- devices and models ----------------------------------------------------------------


def pick_device(spec: str) -> torch.device:
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        if not torch.cuda.is_available():
            raise AttnError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise AttnError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
        return dev
    raise UsageError(f"--device must be auto, cpu, cuda or cuda:N (got {spec!r})")


def pick_dtype(choice: Dtype, device: torch.device) -> torch.dtype:
    if choice is Dtype.auto:
        # bfloat16 on CUDA. float32 on CPU: decode (what generation spends its time on) measured faster in
        # float32 than bfloat16 on a 2-core AVX-512/AMX CPU (SmolLM2-135M: 31 vs 27 tok/s; bf16 GEMV reads
        # half the bytes at half the speed), and float32 is the exact reference (README, Performance).
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[choice.value]


@dataclass
class Loaded:
    model: Decoder
    tokenizer: Tokenizer
    cfg: ModelConfig
    path: Path
    name: str
    device: torch.device
    dtype: torch.dtype
    load_ms: float
    params: int


def open_model(spec: str | None, device: str, dtype: Dtype, quiet: bool = False) -> Loaded:
    t0 = time.perf_counter()
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    from cli.weights_cmds import ensure_model  # a name, a directory, a .gguf or a hub id; pulls the default once

    path = ensure_model(spec, quiet=quiet)
    cfg = ModelConfig.from_dir(path)
    tokenizer = Tokenizer(path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise AttnError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the embedding only {cfg.vocab_size} rows")
    try:
        model = load_model(path, dt, dev)
    except torch.cuda.OutOfMemoryError:
        raise AttnError(oom_message(path, dev, dt)) from None
    params = sum(p.numel() for p in model.parameters())
    # The name outputs carry: the registry name or hub id as given; for a directory, its own name.
    name = path.name if spec and Path(spec).expanduser().exists() else spec or DEFAULT_MODEL
    return Loaded(model, tokenizer, cfg, path, name, dev, dt, (time.perf_counter() - t0) * 1e3, params)


def encode_prompt_text(m: Loaded, text: str, chat: bool, system: str | None) -> tuple[list[int], list[str]]:
    """Ids of the prompt (through the chat template when `chat`) and the piece of text each covers."""
    tk = m.tokenizer
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        ids, pieces = tk.encode_with_offsets(tk.render_chat(messages), add_special_tokens=False)
    else:
        ids, pieces = tk.encode_with_offsets(text)
    if not ids:
        if m.cfg.bos_token_id is None:
            raise UsageError("the prompt encodes to no tokens and the model has no BOS token to start from")
        ids, pieces = [m.cfg.bos_token_id], [""]
    return ids, pieces


def oom_message(path: Path, device: torch.device, dtype: torch.dtype) -> str:
    size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30
    free = ""
    if device.type == "cuda":
        free_b, total_b = torch.cuda.mem_get_info(device)
        free = f", {free_b / 2**30:.1f} of {total_b / 2**30:.1f} GiB free on {device}"
    return f"out of memory loading {path.name} ({size:.2f} GiB on disk{free}); try --dtype bfloat16 or --device cpu"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
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
    s = SamplingSettings(
        temperature=_first(temp, g_temp, 0.8),
        top_k=_first(top_k, gen_cfg.get("top_k") if has_gen else None, 0),
        top_p=_first(top_p, gen_cfg.get("top_p") if has_gen else None, 0.95),
        min_p=_first(min_p, gen_cfg.get("min_p"), 0.0),
        repeat_penalty=_first(repeat_penalty, gen_cfg.get("repetition_penalty"), 1.0),
        repeat_last_n=repeat_last_n,
    )
    problems = s.check()
    if problems:
        raise UsageError(problems[0])
    return s


def _first(*values):
    return next(v for v in values if v is not None)
