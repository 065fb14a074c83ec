"""Tensor parallelism from the command line (the model side is model/parallel.py).

Two ways in, one code path:
- `attn generate --tp N …` starts N copies of its own command line through torch.distributed's
  elastic launcher (what `torchrun` runs), waits for them, and exits as rank 0 did;
- `torchrun --nproc-per-node N --no-python attn generate …` (or `python -m cli.main`) starts them
  itself, on one host or, with torchrun's rendezvous, on several.
Every copy runs the command as one process would, each on its slice of the model; `start` makes
rank 0 the one voice: only rank 0 reads stdin (what it reads, and choices such as a random seed, are
broadcast: `rank0`), only rank 0 writes stdout and stderr, and once the model work is done the
other ranks exit (`release`), leaving the rendering and any files to rank 0.

Failures: a rank that exits breaks the next collective on the others (`RankLost`: one line, exit
1); one that hangs is given up after ATTN_TP_TIMEOUT seconds (default 120), and rank 0, failing, ends
the ranks on its machine (`_end_peers`). The launcher stops every rank when one fails, and speaks
only when rank 0 could not (it was stopped or killed).
Ranks other than 0 ignore Ctrl-C and SIGTERM — rank 0 ends the run, and they end with it — and
die with their parent (Linux), so none is left behind.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from model.errors import AttnError, UsageError

COMMANDS = ("generate", "inspect", "explain", "heads")  # the commands that run tensor-parallel
TIMEOUT_S = 120  # default of ATTN_TP_TIMEOUT: how long a collective waits for the other ranks

TpOpt = Annotated[
    Optional[int],
    typer.Option(
        "--tp",
        min=1,
        metavar="N",
        help="Tensor parallel: split the model's heads over N processes (N must divide the number of key/value heads: 1 or 3 for the default model), started through torch.distributed; gloo on CPU, NCCL on CUDA (one GPU each). Under torchrun: its process count. [default: 1]",
        show_default=False,
    ),
]


@dataclass
class Joined:
    rank: int
    world: int
    local_rank: int
    owns_group: bool  # this process made the group (not a test's pool that keeps one for many commands)
    peers: list[tuple] = field(default_factory=list)  # every rank's (machine, pid, start time): `_end_peers`


JOINED: Joined | None = None  # set in every process of a tensor-parallel run


def launched() -> bool:
    """Started by torchrun (or `--tp`'s launcher) as one of several processes."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def enter(command: str | None) -> None:
    """Before a command parses its options: under torchrun, ranks other than 0 go silent (a usage error is
    rank 0's to report), and a command that does not run tensor-parallel, which would run N times over, is refused."""
    if not launched():
        return
    if int(os.environ["RANK"]) != 0:
        _silence()
    if command is not None and command not in COMMANDS:
        raise UsageError(f"attn {command} does not run tensor-parallel; under torchrun use {', '.join(COMMANDS)}")


def start(tp: int | None, model: str | None, device: str, quiet: bool, refused: dict[str, bool] | None = None) -> None:
    """First thing in a tensor-parallel command, before anything is read: join the group this process
    was launched into; or, for `--tp N` in a plain process, launch N processes and exit as rank 0 did."""
    if launched():
        world = int(os.environ["WORLD_SIZE"])
        _join(world)
        if tp is not None and tp != world:
            raise UsageError(f"--tp {tp}, but torchrun started {world} processes (leave --tp out under torchrun)")
        _refuse(refused)
        return
    if tp is None or tp == 1:
        return
    _refuse(refused)
    raise typer.Exit(_launch(tp, model, device, quiet))


def _refuse(refused: dict[str, bool] | None) -> None:
    for flag, given in (refused or {}).items():
        if given:
            raise UsageError(f"{flag} does not combine with tensor parallelism (--tp, torchrun) yet")


def check_split(cfg, world: int, name: str) -> None:
    """A model splits over `world` ranks only by whole KV heads: otherwise one line naming the valid N."""
    from model.parallel import unsplittable, valid_sizes

    if world > 1 and unsplittable(cfg):
        raise UsageError(f"--tp {world}: {name}: {unsplittable(cfg)}; use --tp 1")
    if cfg.n_kv_heads % world:
        valid = valid_sizes(cfg)
        raise UsageError(
            f"--tp {world}: {name} has {cfg.n_kv_heads} KV heads, which do not split evenly over {world} processes; "
            f"--tp must be {', '.join(map(str, valid[:-1])) + ' or ' if len(valid) > 1 else ''}{valid[-1]}"
        )


def rank0(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` run by rank 0 alone, its result (or its AttnError) on every rank: what only rank 0
    may do, such as reading stdin, or what must come out the same everywhere, such as a random seed."""
    if JOINED is None:
        return fn(*args)
    from model.parallel import broadcast_object

    box = None
    if JOINED.rank == 0:
        try:
            box = ("value", fn(*args))
        except AttnError as e:
            box = ("error", e)
    kind, value = broadcast_object(box, 0)
    if kind == "error":
        raise value
    return value


def every_rank(value: Any) -> list[Any]:
    """`value` of every rank, in rank order (one process: `[value]`). A collective: every rank calls it."""
    if JOINED is None:
        return [value]
    import torch.distributed as dist

    from model.parallel import _lost

    out: list[Any] = [None] * JOINED.world
    try:
        dist.all_gather_object(out, value)
    except RuntimeError as e:
        raise _lost(e) from None
    return out


def release() -> None:
    """The model work is done: ranks other than 0 exit here; what follows (rendering, files) is rank 0's."""
    if JOINED is not None and JOINED.rank != 0:
        raise typer.Exit(0)


# --- joining a group ----------------------------------------------------------------------------


def _join(world: int) -> None:
    global JOINED
    import torch
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns_group = not dist.is_initialized()
    if owns_group:
        from datetime import timedelta

        cuda = torch.cuda.is_available() and dist.is_nccl_available()
        if cuda:
            torch.cuda.set_device(local_rank)  # "cuda" is this rank's GPU from here on
        try:
            # CPU tensors (the prompt, the microscope's results) go through gloo, CUDA tensors through NCCL.
            dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timedelta(seconds=_timeout()))
        except (RuntimeError, ValueError) as e:
            raise AttnError(f"tensor-parallel: rank {rank} could not join the group ({str(e).strip().splitlines()[0]})") from None
    JOINED = Joined(rank, world, local_rank, owns_group)
    _die_with_parent()
    if owns_group:
        JOINED.peers = every_rank(_me())


def _me() -> tuple:
    """This process, told apart from any other: its machine (boot, PID namespace), its pid and its start time."""
    try:
        machine = (open("/proc/sys/kernel/random/boot_id").read().strip(), os.readlink("/proc/self/ns/pid"))
        started = open(f"/proc/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()[19]
    except OSError:  # not Linux: no ending of peers
        return (None, os.getpid(), None)
    return (machine, os.getpid(), started)


def _end_peers() -> None:
    """Rank 0 failed and ends the run: SIGKILL the ranks on this machine. One that hangs (stopped, stuck in a
    computation) would otherwise keep the run alive until the launcher gives up on it, 30 s after rank 0 is gone.
    A peer that has already ended is left alone: its pid is only trusted with the start time it had."""
    machine, _, _ = _me()
    for other, pid, started in JOINED.peers[1:]:
        if machine is None or other != machine:
            continue
        try:
            if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19] == started:
                os.kill(pid, signal.SIGKILL)
        except (OSError, IndexError):
            pass


def vocab_parallel() -> bool:
    """ATTN_TP_VOCAB: `parallel` (default) splits the embedding and head over the ranks, `replicated` gives every
    rank all of them (README, Tensor parallel: what the choice measured)."""
    raw = os.environ.get("ATTN_TP_VOCAB", "parallel")
    if raw not in ("parallel", "replicated"):
        raise UsageError(f"ATTN_TP_VOCAB must be 'parallel' or 'replicated' (got {raw!r})")
    return raw == "parallel"


def _timeout() -> float:
    raw = os.environ.get("ATTN_TP_TIMEOUT", str(TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1
    if not seconds > 0:
        raise UsageError(f"ATTN_TP_TIMEOUT must be a number of seconds > 0 (got {raw!r})")
    return seconds


def hold_signals() -> None:
    """Rank 0 is reporting an error, the outcome of the run: the launcher's SIGTERM to every rank must not cut it short."""
    if JOINED is not None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


ERRORS = "ATTN_TP_ERRORS"  # the launcher's folder where a rank leaves the error line it ended with (its stderr is silenced)


def report(message: str) -> None:
    """A rank other than 0 ending with an error: leave its line for the launcher, which says it when rank 0 could not."""
    folder = os.environ.get(ERRORS)
    if launched() and folder and int(os.environ["RANK"]) != 0:
        try:
            Path(folder, f"rank-{os.environ['RANK']}.err").write_text(message, encoding="utf-8")
        except OSError:
            pass


def leave(code: int) -> None:
    """End a rank's process now, its streams flushed: the interpreter's teardown with torch took 1-2 s on a
    busy 2-core machine, and a rank's sockets stay open (the others waiting) until the process is gone."""
    if JOINED is None or not JOINED.owns_group:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    if JOINED.rank == 0 and code not in (0, 130, 143):  # an interrupted run ends by its signal, which every rank got
        _end_peers()
    os._exit(code)


def _silence() -> None:
    """A rank other than 0: no stdin, no stdout; no stderr unless ATTN_DEBUG asks for every rank's tracebacks."""
    keep_stderr = os.environ.get("ATTN_DEBUG", "") not in ("", "0")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1) if keep_stderr else (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115
    sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
    if not keep_stderr:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
    # Rank 0 ends the run (Ctrl-C, SIGTERM) and this rank with it: stopped halfway through a collective,
    # it would leave rank 0 waiting instead of finishing what it was writing.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _die_with_parent() -> None:
    """SIGKILL this process when the launcher dies, however it dies (Linux prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent was already gone before the call
        os._exit(1)


# --- launching N processes --------------------------------------------------------------------


def _launch(tp: int, model: str | None, device: str, quiet: bool) -> int:
    """Run this command line in `tp` processes (torch.distributed's elastic launcher); rank 0's exit code."""
    import tempfile
    import uuid

    import torch

    from cli.models import ensure_model, pick_device
    from model.config import ModelConfig

    dev = pick_device(device)
    if dev.type == "cuda":
        if dev.index is not None:
            raise UsageError(f"--device {device}: with --tp each process uses its own GPU (cuda:0 … cuda:{tp - 1}); use --device cuda")
        if torch.cuda.device_count() < tp:
            raise UsageError(f"--tp {tp} on CUDA needs {tp} GPUs; this machine has {torch.cuda.device_count()}")
    path, _ = ensure_model(model, quiet=quiet)  # pulled here, once, not by N processes at once
    check_split(ModelConfig.from_dir(path), tp, path.name if model is None or os.path.exists(os.path.expanduser(model)) else model)

    import logging

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The agent's log lines (workers started, signals sent, a failure report) are not attn's to show.
    quiet_log = logging.getLogger("torch.distributed")
    saved_log = quiet_log.handlers[:], quiet_log.propagate
    quiet_log.handlers, quiet_log.propagate = [logging.NullHandler()], False
    saved_env = dict(os.environ)
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    if "OMP_NUM_THREADS" not in os.environ:  # N processes share the cores instead of each taking all of them
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // tp))
    try:
        with tempfile.TemporaryDirectory(prefix="attn-tp-") as logs:
            config = LaunchConfig(
                min_nodes=1, max_nodes=1, nproc_per_node=tp, run_id=uuid.uuid4().hex,
                rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                logs_specs=DefaultLogsSpecs(log_dir=logs),
                # After Ctrl-C or SIGTERM here, how long a rank may take to end before SIGKILL (when a rank fails,
                # torch waits 30 s instead). The ranks other than 0 ignore SIGTERM and end when rank 0 has
                # (RankLost), or rank 0 ends them (`_end_peers`): only one that hangs through Ctrl-C waits this out.
                shutdown_timeout=10,
            )
            os.environ[ERRORS] = logs
            try:
                elastic_launch(config, sys.executable)("-m", "cli.main", *sys.argv[1:])
                return 0
            except ChildFailedError as e:
                return _exit_code({r: f.exitcode for r, f in e.failures.items()}, tp, Path(logs))
            except SignalException as e:  # Ctrl-C or SIGTERM here: the workers got it too; rank 0 wrote what it had
                return 128 + int(e.sigval)
    finally:
        quiet_log.handlers, quiet_log.propagate = saved_log
        os.environ.clear()
        os.environ.update(saved_env)
        for s, handler in saved_signals.items():
            signal.signal(s, handler)


def _exit_code(codes: dict[int, int], world: int, errors: Path | None = None) -> int:
    """The run's exit code from the ranks that failed (rank → exit code, negative: killed by that signal).

    Rank 0 speaks for the run when it chose its code (an error it printed, a usage error, a closed
    pipe); when it was stopped, killed or interrupted because another rank failed, the launcher says
    that rank's own error line where it left one in `errors` (`report`), else which rank and how, in
    one line, and the run exits 1.
    """
    c0 = codes.get(0, 0)
    if c0 > 0 and c0 not in (130, 143):
        return c0
    others = {r: c for r, c in codes.items() if r != 0}  # ranks that only lost another exit 0 (RankLost): not here
    if not others and c0 >= 0:
        return c0
    for rank, code in sorted(others.items()):  # a rank that ended with an error line of its own (report): that line
        said = errors / f"rank-{rank}.err" if errors is not None else None
        if code > 0 and said is not None and said.is_file():
            sys.stderr.write(f"attn: error: {said.read_text(encoding='utf-8')} (tensor-parallel rank {rank} of {world}; every rank was stopped)\n")
            return code
    rank, code = min(others.items(), key=lambda rc: (rc[1] >= 0, rc[0])) if others else (0, c0)  # a killed rank first
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    note = "" if rank else " before it could finish"
    sys.stderr.write(f"attn: error: tensor-parallel rank {rank} of {world} {how}{note}; every rank was stopped\n")
    sys.stderr.flush()
    return 1
