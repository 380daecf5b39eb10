"""Shared by the GPU benchmark scripts: the layer shapes and the CUDA-graph timer.

A script in ``benchmarks/`` imports it as ``from common import SHAPES, graph_us`` (Python puts the script's folder
first on ``sys.path``); the project itself (``vllm_nm16``, ``offline``) comes from the installed package.
"""

from __future__ import annotations

# Linear layers of Llama-3 8B / 70B: name -> (N = out_features, K = in_features)
SHAPES: dict[str, tuple[int, int]] = {
    "8B qkv": (6144, 4096), "8B o": (4096, 4096), "8B gate_up": (28672, 4096), "8B down": (4096, 14336),
    "70B o": (8192, 8192), "70B gate_up": (57344, 8192), "70B down": (8192, 28672),
}
SHAPES_8B = tuple(name for name in SHAPES if name.startswith("8B "))


def graph_us(fns, target_us: float | None = None, replays: int = 7) -> float:
    """Median per-call time (µs) of the calls in ``fns`` (e.g. one per weight copy, so that the weights come from
    HBM), captured back to back in one CUDA graph and replayed ``replays`` times (no launch overhead).

    ``target_us``: repeat the whole list in the graph as often as needed (1-40 times) for one replay to take about
    that long, estimated from one eager pass; None: the list once."""
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
    times = []
    for _ in range(replays):
        e0.record()
        graph.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(1e3 * e0.elapsed_time(e1) / (reps * len(fns)))
    del graph
    return sorted(times)[len(times) // 2]
