"""The real default model (SmolLM2-135M-Instruct, converted from its GGUF) answers as it should."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_raw_completion_knows_paris(attn, real_model_dir):
    r = attn(["generate", "-m", str(real_model_dir), "--raw", "--temp", "0", "-n", "8", "The capital of France is"])
    assert r.code == 0, r
    assert "Paris" in r.out


def test_chat_answer_knows_paris(attn, real_model_dir):
    r = attn(["generate", "-m", str(real_model_dir), "--chat", "--temp", "0", "-n", "24", "What is the capital of France?"])
    assert r.code == 0, r
    assert "Paris" in r.out


def test_chat_is_the_default_and_stops_at_eos(attn, real_model_dir):
    r = attn(["generate", "-m", str(real_model_dir), "--temp", "0", "-n", "64", "--json", "What is the capital of France?"])
    d = json.loads(r.out)
    assert d["finish_reason"] == "eos" and "Paris" in d["text"]
    assert "<|im_end|>" not in d["text"]


def test_default_model_by_name_through_the_installed_command(real_model_dir):
    """`attn generate` with no --model finds the pulled default under ATTN_HOME."""
    home = real_model_dir.parent.parent  # $ATTN_HOME/models/<name>
    env = {**os.environ, "ATTN_HOME": str(home), "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, "-c", "from cli.main import main; main()", "generate", "--raw", "--temp", "0", "-n", "8", "The capital of France is"],
        env=env, cwd=ROOT, capture_output=True, stdin=subprocess.DEVNULL, timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert "Paris" in p.stdout.decode()
