"""Shared by the benchmark scripts: the layer shapes, the CUDA-graph timer, the readers of vLLM's log lines
(weights GiB, KV-cache tokens, the error of a failed start), atomic result writes and the git state of a run.

A script in ``benchmarks/`` imports it as ``from common import SHAPES, graph_us`` (Python puts the script's folder
first on ``sys.path``); the project itself (``vllm_nm16``, ``offline``) comes from the installed package.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

# Linear layers of Llama-3 8B / 70B: name -> (N = out_features, K = in_features)
SHAPES: dict[str, tuple[int, int]] = {
    "8B qkv": (6144, 4096), "8B o": (4096, 4096), "8B gate_up": (28672, 4096), "8B down": (4096, 14336),
    "70B o": (8192, 8192), "70B gate_up": (57344, 8192), "70B down": (8192, 28672),
}
SHAPES_8B = tuple(name for name in SHAPES if name.startswith("8B "))


def _capture(fns, target_us: float | None):
    """One CUDA graph of the calls in ``fns`` back to back, repeated to last about ``target_us`` (see graph_us).
    Returns (graph, calls per replay)."""
    import torch

    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # eager warm-up (compiles the kernels) and the estimate
        e0.record()
        for f in fns:
            f()
        e1.record()
    torch.cuda.synchronize()
    reps = 1
    if target_us is not None:
        est_us = 1e3 * e0.elapsed_time(e1) / len(fns)
        reps = max(1, min(40, int(target_us / max(est_us * len(fns), 1.0))))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        for _ in range(reps):
            for f in fns:
                f()
    graph.replay()
    torch.cuda.synchronize()
    return graph, reps * len(fns)


def _replay_us(graph, calls: int) -> float:
    """Per-call time (µs) of one replay of a captured graph."""
    import torch

    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    graph.replay()
    e1.record()
    torch.cuda.synchronize()
    return 1e3 * e0.elapsed_time(e1) / calls


def graph_us(fns, target_us: float | None = None, replays: int = 7) -> float:
    """Median per-call time (µs) of the calls in ``fns`` (e.g. one per weight copy, so that the weights come from
    HBM), captured back to back in one CUDA graph and replayed ``replays`` times (no launch overhead).

    ``target_us``: repeat the whole list in the graph as often as needed (1-40 times) for one replay to take about
    that long, estimated from one eager pass; None: the list once."""
    graph, calls = _capture(fns, target_us)
    times = sorted(_replay_us(graph, calls) for _ in range(replays))
    del graph
    return times[len(times) // 2]


def rotations(n: int, rounds: int) -> list[list[int]]:
    """The order of ``n`` timed items in each of ``rounds`` rounds: round r starts at item r mod n, so every item
    is measured early and late equally often (what is timed last in a run measured ~3% slower on the H200)."""
    return [[(r + i) % n for i in range(n)] for r in range(rounds)]


def graphs_us_interleaved(fn_lists, target_us: float | None = None, rounds: int = 7) -> list[float]:
    """Median per-call time (µs) of each list of calls in ``fn_lists``, each captured as in :func:`graph_us` and
    replayed once per round in rotating order (:func:`rotations`), so that clocks and heat drifting over the run
    do not favour whichever was measured first. A list whose capture fails gets NaN (the others are still timed)."""
    graphs: list = []
    for fns in fn_lists:
        try:
            graphs.append(_capture(fns, target_us))
        except Exception as e:  # noqa: BLE001  (one bad variant must not lose the others)
            print(f"FAILED capture: {type(e).__name__}: {str(e)[:300]}", flush=True)
            graphs.append(None)
    live = [i for i, g in enumerate(graphs) if g is not None]
    times: dict[int, list[float]] = {i: [] for i in live}
    for order in rotations(len(live), rounds):
        for j in order:
            i = live[j]
            times[i].append(_replay_us(*graphs[i]))
    del graphs
    return [sorted(times[i])[len(times[i]) // 2] if i in times else float("nan") for i in range(len(fn_lists))]


_MEM_RE = re.compile(r"Model loading took ([0-9.]+) GiB")
_KV_RE = re.compile(r"KV cache size: ([0-9][0-9,]*) tokens")
_ERR_RE = re.compile(r"^(?:\([^)]*\) )?(?:ERROR [^\]]*\] )?([A-Za-z_][\w.]*(?:Error|Exception)\b:?.*)$")
_GENERIC_ERRORS = ("Engine core initialization failed", "Worker failed", "WorkerProc initialization failed",
                   "Engine process failed to start", "EngineDeadError", "failed to start")


def weights_gib_from_log(text: str) -> float | None:
    """vLLM's "Model loading took X GiB" (the last one logged: one line per engine start)."""
    mem = _MEM_RE.findall(text)
    return float(mem[-1]) if mem else None


def kv_tokens_from_log(text: str) -> int | None:
    """vLLM's "GPU KV cache size: N tokens" (N with thousands separators; the last one logged)."""
    kv = _KV_RE.findall(text)
    return int(kv[-1].replace(",", "")) if kv else None


def error_from_log(text: str) -> tuple[str | None, list[str]]:
    """(root cause, exception lines) of a failed vLLM start: the distinct exception lines of the log (with vLLM's
    ``(EngineCore pid=N)`` / ``ERROR ... [file.py:N]`` prefixes stripped); the root cause is the last one that is not
    one of the generic "engine failed" wrappers the front end raises after the engine's own error (else the last)."""
    lines = []
    for raw in text.splitlines():
        m = _ERR_RE.match(raw.strip())
        if m and not m.group(1).startswith(("Traceback", "During handling")):
            msg = m.group(1).strip()
            if msg not in lines:
                lines.append(msg)
    for msg in reversed(lines):
        if not any(g in msg for g in _GENERIC_ERRORS):
            return msg, lines
    return (lines[-1] if lines else None), lines


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a kill mid-write leaves the previous file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def commit_record(given: str | None = None) -> dict:
    """The commit a result ran on: ``given`` (a ``--commit`` argument), else ``NM16_COMMIT``, else git's answer. A copy
    of the tree on the GPU host records the commit it was copied from that way (``commit_given`` says so): its git
    answers with the commit the host's session started from."""
    from vllm_nm16 import envs

    given = given or envs.NM16_COMMIT
    if given:
        return {"commit": given, "dirty": False, "commit_given": True}
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def git(*args: str) -> str | None:
    """The output of ``git ARGS`` in this checkout (None without git, on failure or when empty)."""
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                             timeout=20)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None
