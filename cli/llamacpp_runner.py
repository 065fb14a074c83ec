"""The llama.cpp side of `attn bench --compare llama.cpp`, run in a child process (never imported by attn).

    python -m cli.llamacpp_runner FD

Requests arrive on stdin, one JSON object a line; each gets one JSON line back on file descriptor
FD, a pipe attn passed in. stdout and stderr belong to llama.cpp and Python (attn captures both
to a file), so nothing they print can mix with the answers or reach attn's stdout. The child
imports only the standard library, numpy and llama_cpp: it starts fast, and llama.cpp's OpenMP
runtime never shares a process with PyTorch's.

    {"op": "hello"}                                      → version, system info, extra-buffer switch
    {"op": "quantize", "src", "dst", "type", "threads"}  → writes dst (F32 | F16 | Q8_0 | …)
    {"op": "load", "path", "threads", "n_ctx", "extra_bufts"} → file type, weight buffers (MiB by type)
    {"op": "run", "prompt": [ids], "n"}                  → ttft_s, decode_s, tokens (greedy)
    {"op": "quit"}

A failed request answers {"ok": false, "error": "…"}; a crash answers nothing (attn sees the pipe
close and the exit status).
"""

from __future__ import annotations

import ctypes
import json
import re
import sys
import time

# llama.cpp's file types by the names `attn bench` reports (llama-quantize's names).
FTYPES = {"F32": "LLAMA_FTYPE_ALL_F32", "F16": "LLAMA_FTYPE_MOSTLY_F16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
          "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1"}


OPS = ("hello", "quantize", "load", "run")


class Runner:
    def __init__(self) -> None:
        import llama_cpp
        from llama_cpp import llama_cpp as C

        self.llama_cpp, self.C = llama_cpp, C
        self.llm = None
        self.logs: list[str] = []
        # Keep llama.cpp's log in memory instead of on stderr: the load lines say which weight buffers
        # were used (repacked or not), and errors quote the tail. A reference is kept: ctypes would
        # free the callback while C still holds it.
        self._log_cb = C.llama_log_callback(self._log)
        C.llama_log_set(self._log_cb, ctypes.c_void_p(0))

    def _log(self, level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        self.logs.append(text.decode("utf-8", "replace"))

    def hello(self) -> dict:
        return {
            "version": self.llama_cpp.__version__,
            "system_info": self.C.llama_print_system_info().decode("utf-8", "replace").strip(),
            # `use_extra_bufts` (loading without repacked weight buffers) exists in newer llama.cpp only.
            "extra_bufts_switch": any(f[0] == "use_extra_bufts" for f in self.C.llama_model_params._fields_),
        }

    def quantize(self, src: str, dst: str, type: str, threads: int) -> dict:
        C = self.C
        params = C.llama_model_quantize_default_params()
        params.ftype = getattr(C, FTYPES[type])
        params.nthread = threads
        params.allow_requantize = True  # the source is quantized already (the default model's Q4_1)
        params.pure = True  # every matrix in `type`, not llama-quantize's per-tensor mixture
        rc = C.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize returned {rc}: {self._log_tail()}")
        return {}

    def load(self, path: str, threads: int, n_ctx: int, extra_bufts: bool = True) -> dict:
        self.logs.clear()
        if not extra_bufts:
            # Llama() builds its model parameters from llama_model_default_params() and has no argument
            # for this field, so the defaults it asks for are changed instead.
            C = self.C
            default = C.llama_model_default_params

            def without_extra_bufts():
                p = default()
                p.use_extra_bufts = False
                return p

            C.llama_model_default_params = without_extra_bufts
        self.llm = self.llama_cpp.Llama(
            model_path=path, n_ctx=n_ctx, n_batch=max(512, n_ctx), n_ubatch=512, n_threads=threads,
            n_threads_batch=threads, verbose=False,
        )
        log = "".join(self.logs)
        buffers = {name: float(mib) for name, mib in re.findall(r"(\S+) model buffer size\s*=\s*([\d.]+) MiB", log)}
        ftype = re.search(r"file type\s*=\s*(\S+)", log)
        return {"buffers": buffers, "file_type": ftype.group(1) if ftype else None, "n_vocab": self.llm.n_vocab()}

    def run(self, prompt: list[int], n: int) -> dict:
        """Greedy generation of n tokens after the prompt ids, timed like attn's: the first token ends the prefill."""
        import numpy as np

        llm, C = self.llm, self.C
        n_vocab = llm.n_vocab()

        def argmax() -> int:
            return int(np.ctypeslib.as_array(C.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,)).argmax())

        llm.reset()  # the next eval drops the cached positions from 0 on
        tokens = []
        t0 = time.perf_counter()
        llm.eval(prompt)
        tokens.append(argmax())
        t1 = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([tokens[-1]])
            tokens.append(argmax())
        t2 = time.perf_counter()
        return {"ttft_s": t1 - t0, "decode_s": t2 - t1, "tokens": tokens}

    def _log_tail(self) -> str:
        lines = [line.strip() for line in "".join(self.logs).splitlines() if line.strip()]
        return " | ".join(lines[-3:]) or "no log"


def serve(fd: int) -> None:
    out = open(fd, "w", encoding="utf-8", buffering=1)
    runner = None
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        if op == "quit":
            break
        try:
            if runner is None:
                runner = Runner()
            if op not in OPS:
                raise ValueError(f"unknown op {op!r}")
            reply = {"ok": True, **getattr(runner, op)(**req)}
        except Exception as e:  # reported to attn, which turns it into its one-line error
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    serve(int(sys.argv[1]))
