"""A stand-in for cli/llamacpp_runner.py speaking the same protocol, for tests without llama-cpp-python.

FAKE_LLAMA picks the behaviour: ok | crash-repacked (repacks, then segfaults on the first product unless
loaded without extra buffers) | crash-no-switch (the same, in a version that cannot turn them off) |
crash-plain (no repacking, segfaults anyway) | crash-always (repacks, and segfaults without it too) |
crash-load (segfaults while loading with extra buffers). It prints to stdout and stderr, as llama.cpp does, to show
that none of it reaches attn's stdout.
"""

import json
import os
import signal
import sys

NOISE = "FAKE LLAMA NOISE"


def main(fd: int) -> None:
    mode = os.environ.get("FAKE_LLAMA", "ok")
    out = open(fd, "w", buffering=1)
    print(NOISE, flush=True)
    os.write(1, f"{NOISE} (fd 1)\n".encode())
    os.write(2, f"{NOISE} (fd 2)\n".encode())
    extra = True
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        if op == "quit":
            break
        if op == "hello":
            reply = {"version": "0.0-fake", "system_info": "FAKE = 1", "extra_bufts_switch": mode != "crash-no-switch"}
        elif op == "quantize":
            with open(req["dst"], "wb") as f:
                f.write(f"{req['type']} from {req['src']}".encode())
            reply = {}
        elif op == "load":
            extra = req["extra_bufts"]
            if extra and mode == "crash-load":
                os.kill(os.getpid(), signal.SIGSEGV)
            buffers = {"CPU_Mapped": 1.5}
            if extra and mode in ("crash-repacked", "crash-no-switch", "crash-always"):
                buffers["AMX"] = 2.5
            reply = {"buffers": buffers, "file_type": "F32", "n_vocab": 400}
        elif op == "run":
            if mode in ("crash-plain", "crash-always") or (extra and mode in ("crash-repacked", "crash-no-switch")):
                os.write(2, b"GGML_ASSERT(fake) failed\n")
                os.kill(os.getpid(), signal.SIGSEGV)
            n = req["n"]
            reply = {"ttft_s": 0.001 * len(req["prompt"]), "decode_s": 0.002 * (n - 1), "tokens": [7] * n}
        else:
            reply = None
        out.write(json.dumps({"ok": False, "error": f"unknown op {op}"} if reply is None else {"ok": True, **reply}) + "\n")


if __name__ == "__main__":
    main(int(sys.argv[1]))
