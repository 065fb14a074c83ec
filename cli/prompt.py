"""The prompt: read from the argument, -p, -f or stdin, and encoded (chat template, BOS fallback) into tokens."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from cli.common import DEMO_SENTENCE, Truncate, note
from cli.models import Loaded
from cli.parallel import rank0
from cli.tokens import token_labels
from model.errors import AttnError, UsageError

# --- reading -----------------------------------------------------------------------------


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
    """The prompt from argument / -p / -f, with piped stdin prepended (`stdin + "\\n\\n" + prompt`).

    Text read from stdin or a file loses one final newline, as a shell's `$(…)` drops them: `echo
    "the cat sat" | attn inspect` inspects "sat", not the newline `echo` adds. Arguments are taken as typed.
    Tensor parallel: rank 0 reads, every rank gets what it read (or its error).
    """
    return rank0(_read_prompt, arg, opt, file, no_stdin, invalid, quiet)


def _read_prompt(arg: str | None, opt: str | None, file: Path | None, no_stdin: bool, invalid: str, quiet: bool) -> str | None:
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
            prompt = drop_final_newline(decode_input(file.read_bytes(), str(file), invalid, quiet))
        except OSError as e:
            raise AttnError(f"cannot read {file}: {e.strerror}") from None
    stdin_text = None
    if explicit_stdin and sys.stdin is None:
        raise UsageError("'-' asks for stdin, but there is none")
    if explicit_stdin or (not no_stdin and stdin_piped()):
        stdin_text = drop_final_newline(decode_input(sys.stdin.buffer.read(), "stdin", invalid, quiet)) or None  # empty stdin adds nothing
    if stdin_text is not None and prompt is not None:
        return stdin_text.rstrip("\r\n") + "\n\n" + prompt
    return stdin_text if stdin_text is not None else prompt


def drop_final_newline(text: str) -> str:
    """`text` without one final "\\n" (or "\\r\\n")."""
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def stdin_piped() -> bool:
    """True when stdin is a pipe or file; False for a terminal, a closed stdin or /dev/null (as in CI)."""
    if sys.stdin is None or sys.stdin.isatty():
        return False
    try:
        st = os.fstat(sys.stdin.fileno())
    except (OSError, ValueError):
        return True  # not a real file descriptor (an in-process test): trust it
    return not stat.S_ISCHR(st.st_mode)  # /dev/null and other character devices carry no prompt


def prompt_or_demo(
    arg: str | None, opt: str | None, file: Path | None, no_stdin: bool, invalid: str = "error", quiet: bool = False
) -> str:
    """The prompt as read_prompt reads it; the demo sentence (said on stderr) when there is none."""
    text = read_prompt(arg, opt, file, no_stdin, invalid, quiet)
    if text is None:
        note(f'no prompt given: using the demo sentence "{DEMO_SENTENCE}"', quiet)
        return DEMO_SENTENCE
    if text == "":
        raise UsageError("empty prompt")
    return text


# --- encoding ----------------------------------------------------------------------------


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


def counted(n: int, chat: bool) -> str:
    """'31 tokens', or '31 tokens with the chat template' when the template's own tokens are in the count."""
    return f"{n} tokens" + (" with the chat template" if chat else "")


def encode_messages(m: Loaded, messages: list[dict[str, str]]) -> list[int]:
    """Ids of a conversation through the model's chat template (an error when it has none)."""
    if not m.tokenizer.chat_template:
        raise AttnError("'messages' need a chat template and this model has none; give a 'prompt'")
    messages = [{"role": x["role"], "content": x["content"]} for x in messages]
    return m.tokenizer.encode(m.tokenizer.render_chat(messages), add_special_tokens=False)


def encode_prompt(m: Loaded, text: str, chat: bool, system: str | None) -> tuple[list[int], list[str]]:
    """Token ids (raw unless `chat`) within the model's context, and their labels: the tokens inspect, explain, explore
    and heads show."""
    ids = encode_prompt_text(m, text, chat, system)[0]
    if len(ids) > m.cfg.max_len:
        raise AttnError(f"prompt of {counted(len(ids), chat)} exceeds the model's {m.cfg.max_len} positions")
    return ids, token_labels(m.tokenizer, ids)


def fit_context(
    m: Loaded, ids: list[int], max_tokens: int, ctx_size: int | None, truncate: Truncate, quiet: bool, chat: bool = False, said_as: str = "--max-tokens"
) -> list[int]:
    """The prompt's ids with room for `max_tokens` in the context: as they are, their tail (--truncate left), or an error
    (naming `max_tokens` as the user gave it, `said_as`: the flag, or a request's key)."""
    ctx = ctx_size or m.cfg.max_len
    if ctx > m.cfg.max_len and m.cfg.positions == "learned":
        raise UsageError(f"--ctx-size {ctx} exceeds the {m.cfg.max_len} positions this model has")
    if len(ids) + max_tokens <= ctx:
        return ids
    if truncate is Truncate.left and max_tokens < ctx:
        keep = ctx - max_tokens
        note(f"warning: prompt truncated from {len(ids)} to its last {keep} tokens to fit the context of {ctx}", quiet)
        return ids[-keep:]
    if truncate is Truncate.left:  # -n alone fills the context: no tail of the prompt fits
        raise AttnError(f"{said_as} ({max_tokens}) leaves no room for the prompt in the context ({ctx} tokens); lower it")
    raise AttnError(
        f"prompt ({counted(len(ids), chat)}) + {said_as} ({max_tokens}) exceeds the context ({ctx} tokens); "
        f"shorten the prompt, lower {'-n' if said_as == '--max-tokens' else said_as}, or use --truncate left"
    )
