"""The typer app: one error type caught in one place, sub-commands registered from their modules."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def _signals_held(held: list[int]) -> Iterator[None]:
    """Ctrl-C and SIGTERM are recorded in `held` instead of raised, then the handlers are put back.

    An interrupt inside an import can be swallowed by a library's own import fallback (leaving a
    half-imported numpy that fails later with a confusing error), or land before main() is running
    and end in a traceback; the caller acts on it once the imports are done instead.
    """
    try:
        previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread, which is where signals arrive anyway
        previous = {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# This module's own imports (typer's is slow on a busy machine) run before main() can catch
# anything: a signal meanwhile is held for main() to act on.
_held_at_import: list[int] = []
with _signals_held(_held_at_import):
    import os
    import sys
    import traceback  # its imports (tokenize, re) take a while on a loaded machine too

    import typer

    from model.errors import AttnError

app = typer.Typer(
    name="attn",
    help="Run decoder-only transformers from safetensors weights, stream tokens, and open up attention.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode=None,  # plain help: "[default: …]" in a help text is not read as rich markup and lost
    epilog=(
        "\b\nExamples:\n"
        "  attn generate \"a fluffy blue creature roamed the verdant forest\"\n"
        "  attn inspect --head 3\n"
        "  cat notes.txt | attn generate \"Summarize:\" | tee summary.txt\n\n"
        "Models live under $ATTN_HOME (default ~/.cache/attn); the default model is pulled on first use. "
        "docs/cli.md in the repository is the full command-line contract."
    ),
    context_settings={"max_content_width": 120},  # click's 80 otherwise, even on a wide terminal
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"attn {version('attn')}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """attn: run transformer language models and see what their attention does."""
    from cli.parallel import enter

    enter(ctx.invoked_subcommand)  # tensor parallel (torchrun): one voice, from rank 0


def _register() -> None:
    """Import the command modules (each adds its commands to `app`; torch's import takes ≈ 1.4 s) with
    Ctrl-C and SIGTERM held, then act on any signal that came during them or this module's imports."""
    held = _held_at_import[:]
    _held_at_import.clear()
    with _signals_held(held):
        from cli import generate  # noqa: F401
        from cli import batch  # noqa: F401
        from cli import bench  # noqa: F401
        from cli import inspect as inspect_cmd_module  # noqa: F401
        from cli import explain  # noqa: F401
        from cli import explore  # noqa: F401
        from cli import heads  # noqa: F401
        from cli import weights_cmds  # noqa: F401
    if held:
        if signal.SIGTERM in held:
            _on_sigterm(signal.SIGTERM, None)
        raise KeyboardInterrupt


def _debug_env() -> bool:
    return os.environ.get("ATTN_DEBUG", "") not in ("", "0")


def _debug() -> bool:
    """ATTN_DEBUG=1, or -v/--verbose as typer parsed it for the command (never a `-v` inside a value)."""
    common = sys.modules.get("cli.common")
    return _debug_env() or bool(common is not None and common.VERBOSE)


_terminated = False
_interrupted = False


def _on_sigterm(signum, frame) -> None:
    global _terminated
    _terminated = True
    _on_sigint(signum, frame)


def _on_sigint(signum, frame) -> None:
    """Ctrl-C (and SIGTERM): raise KeyboardInterrupt, and leave a flag that generation checks between tokens
    (`common.SIGNALLED`), in case the exception lands inside a library that swallows it."""
    global _interrupted
    _interrupted = True  # for cli.common, should it not be imported yet
    common = sys.modules.get("cli.common")
    if common is not None:
        common.SIGNALLED = True
        common.TERMINATED = common.TERMINATED or _terminated
    raise KeyboardInterrupt


def _unraisable(info) -> None:
    """Python's hook for an exception it cannot raise (a weakref or __del__ callback, e.g. importlib's
    module-lock cleanup): Ctrl-C landing there is not lost, since `_on_sigint` left the flag that
    generation checks, so it stays quiet; anything else is reported as Python would."""
    if info.exc_type is KeyboardInterrupt:
        return
    sys.__unraisablehook__(info)


def main() -> None:
    """Console-script entry point: run the app, map every failure to one stderr line and an exit code."""
    global _interrupted
    _interrupted = False
    sys.unraisablehook = _unraisable
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        _register()  # inside the try: Ctrl-C while torch is still importing also ends quietly
        from cli import common

        common.VERBOSE = False  # one run per process from the console script; tests run many
        common.SIGNALLED = _interrupted  # a Ctrl-C already lost inside an import's callback still counts
        sys.argv[1:] = _utf8_arguments(sys.argv[1:])
        code = app(prog_name="attn", standalone_mode=False)
        code = code if isinstance(code, int) else 0
    except typer.TyperException as e:  # typer's own usage errors (bad flag, bad value, missing argument)
        # Raised while the command line is being parsed, before the command has options: -v cannot
        # have been read yet (and the traceback would be the parser's, not attn's), so only ATTN_DEBUG shows it.
        if _debug_env():
            traceback.print_exc()
        if type(e).__name__ == "NoArgsIsHelpError":
            sys.stderr.write(e.format_message() + "\n")
        elif isinstance(e, typer.BadParameter):
            _error(_bad_value(e))
        else:
            _error(e.format_message())
        code = e.exit_code
    except AttnError as e:
        parallel = sys.modules.get("cli.parallel")
        if parallel is not None:
            parallel.hold_signals()  # a tensor-parallel rank: the launcher stopping every rank must not cut this line
            parallel.report(str(e))
        if _debug():
            traceback.print_exc()
        _error(str(e))
        code = e.exit_code
    except (KeyboardInterrupt, typer.Abort):
        code = 130
    except BrokenPipeError:
        code = 141
    except MemoryError:
        _error("out of memory; try --dtype bfloat16 or a shorter prompt")
        code = 1
    except Exception as e:
        code = _other_failure(e)
    if code == 130 and _terminated:
        code = 143
    _exit(code)


def _utf8_arguments(args: list[str]) -> list[str]:
    """The arguments as UTF-8 text: Python keeps a byte that is not UTF-8 as a lone surrogate, which a tokenizer or a
    JSON writer cannot take. Such an argument is a usage error naming its byte offset, as stdin's are, or with
    `--invalid-utf8 replace` its bytes are replaced with U+FFFD (a warning); a file name that exists is left as it is."""
    from cli.prompt import decode_input
    from cli.requests import lone_surrogate

    replace = any(a == "--invalid-utf8=replace" or (a == "--invalid-utf8" and b == "replace") for a, b in zip(args, [*args[1:], ""]))
    quiet = any(a in ("-q", "--quiet") for a in args)
    out = []
    for arg in args:
        if lone_surrogate(arg) and not os.path.exists(arg):
            raw = os.fsencode(arg)
            arg = decode_input(raw, f'the argument "{raw.decode("utf-8", "backslashreplace")}"', "replace" if replace else "error", quiet)
        out.append(arg)
    return out


def _other_failure(e: Exception) -> int:
    """The exit code for what the named cases above do not cover."""
    name = type(e).__name__
    if name == "PipeClosed":  # cli.common's: the reader of stdout went away
        return 141
    if name == "OutOfMemoryError":  # torch.cuda's
        _error("out of memory on the GPU; try --dtype bfloat16, a shorter prompt, or --device cpu")
        return 1
    if isinstance(e, RuntimeError) and "can't allocate memory" in str(e):  # torch's CPU allocator (a RuntimeError, not MemoryError)
        _error("out of memory; try fewer rows at once (--parallel, --batch), a shorter prompt or -n, or --dtype bfloat16")
        return 1
    if name == "NonFiniteLogits":  # model.generate's, where a command does not word it itself (bench)
        _error(f"{e}; try --dtype float32")
        return 1
    if _debug():  # a bug: still one line, the traceback with ATTN_DEBUG=1
        traceback.print_exc()
    _error(f"internal error: {name}: {e} (ATTN_DEBUG=1 shows the traceback)")
    return 1


def _bad_value(e: typer.BadParameter) -> str:
    """A value typer could not take, phrased as attn's own errors: `--top must be an integer (got 'x')`."""
    opts = getattr(e.param, "opts", None) or []
    name = next((o for o in opts if o.startswith("--")), None) or getattr(e.param, "name", None) or "a value"
    try:  # the value came from an ATTN_* variable, not the flag: name the variable
        if e.ctx is not None and e.param is not None and getattr(e.ctx.get_parameter_source(e.param.name), "name", None) == "ENVIRONMENT":
            envvar = e.param.envvar if isinstance(e.param.envvar, str) else next(v for v in e.param.envvar if os.environ.get(v) is not None)
            name = f"{envvar} (for {name})"
    except Exception:  # (a click that keeps no sources: the flag's name)
        pass
    if not e.message.strip():  # (typer's check of a required Path argument that was not given says nothing)
        return f"missing argument {name.upper() if not name.startswith('-') else name}"
    if e.message.startswith("must "):  # cli.common.choice's own phrasing
        return f"{name} {e.message}"
    # typer converts with pydantic; its error names the kind of problem, the limit and the input.
    try:
        err = e.__cause__.errors()[0]  # type: ignore[union-attr]
        kind, limit, got = err["type"], err.get("ctx") or {}, err["input"]
    except Exception:
        return f"{name}: {e.message}"
    rules = {
        "int_parsing": "must be an integer",
        "int_from_float": "must be an integer",
        "float_parsing": "must be a number",
        "greater_than_equal": f"must be ≥ {limit.get('ge')}",
        "greater_than": f"must be > {limit.get('gt')}",
        "less_than_equal": f"must be ≤ {limit.get('le')}",
        "less_than": f"must be < {limit.get('lt')}",
    }
    return f"{name} {rules[kind]} (got {got!r})" if kind in rules else f"{name}: {e.message}"


def _error(message: str) -> None:
    try:
        sys.stderr.write(f"attn: error: {message}\n")
        sys.stderr.flush()
    except Exception:
        pass


def _exit(code: int) -> None:
    if code == 141:
        # The reader went away: point stdout at /dev/null so the interpreter's final flush stays quiet.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except Exception:
            pass
    parallel = sys.modules.get("cli.parallel")
    if parallel is not None:
        parallel.leave(code)  # a tensor-parallel rank ends here at once
    sys.exit(code)


if __name__ == "__main__":  # `python -m cli.main`: run the importable module, whose `app` the commands register on
    from cli.main import main as _main

    _main()
