"""Launch configurations: a table tuned on the H100 (``configs_h100.json`` beside this file, written by
``benchmarks/kernel_lab.py --tune``), keyed by (N, K, M bucket), with a heuristic for shapes it does not hold.

A config is a dict: ``kernel`` ("gemv" | "dot" | "scratch": decode to a transient dense weight + cuBLAS), block
sizes ``BM`` (rows of x), ``BN`` (output rows), ``BG`` (groups of M columns per K step), ``num_warps``,
``num_stages`` and, for the dot kernel, ``GROUP_M``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from vllm_nm16 import envs

TABLE_PATH = Path(__file__).with_name("configs_h100.json")
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# Largest M the gemv (CUDA-core, gather-x) kernel serves by default; above it the tile is decoded for tl.dot.
GEMV_MAX_M = 2
# From this M on, the layer is decoded into a transient dense scratch and multiplied by cuBLAS (kernels/scratch.py).
# On the H100 with the default outliers: M <= 16, the split-K dot kernel 0.41-0.65x cuBLAS vs scratch 0.31-0.39x;
# from the M = 32 bucket on, the dot kernel 0.02-0.17x vs scratch 0.31-0.9x
# (benchmarks/results/raw/h100_lab/scratch_lab2_h100.json, kernels_h100.json). NM16_SCRATCH_MIN_M overrides it (0
# disables the path).


def m_bucket(M: int) -> int:
    for b in M_BUCKETS:
        if M <= b:
            return b
    return M_BUCKETS[-1]


@lru_cache(maxsize=1)
def _table() -> dict[str, dict]:
    if not TABLE_PATH.is_file():
        return {}
    return json.loads(TABLE_PATH.read_text()).get("configs", {})


def table_key(N: int, K: int, bucket: int) -> str:
    return f"{N}x{K}:{bucket}"


def heuristic_config(N: int, K: int, M: int) -> dict:
    """Rules distilled from the H100 lab runs (benchmarks/results/raw/h100_lab/lab*_h100.json, docs/KERNELS.md)."""
    bucket = m_bucket(M)
    wide = N >= 16384          # enough output rows to fill 132 SMs without splitting K
    deep = K >= 8192
    if bucket <= GEMV_MAX_M:
        # gemv: ~1K kept values per program and step; 4 warps and 32 registers give full occupancy, which this
        # latency-bound loop needs (a persistent grid measured no better). Outliers in their own short loop.
        BN, BG = {1: (2, 64), 2: (2, 32)}[bucket]
        return {"kernel": "gemv", "BM": bucket, "BN": BN, "BG": BG, "BO": 64, "num_warps": 4, "num_stages": 2,
                "out_in_loop": False}
    if bucket <= 16:
        # One warp per 16x16 (or 16x32) tile and split-K: thousands of small programs keep the decode ALUs busy.
        if wide:
            return {"kernel": "dot", "BM": 16, "BN": 32, "BG": 4, "num_warps": 1, "num_stages": 3, "SPLIT_K": 4}
        return {"kernel": "dot", "BM": 16, "BN": 16, "BG": 8, "num_warps": 1, "num_stages": 3,
                "SPLIT_K": 4 if deep else 2}
    if bucket <= 64:
        if deep and not wide:
            return {"kernel": "dot", "BM": bucket, "BN": 32, "BG": 8, "num_warps": 2, "num_stages": 3,
                    "SPLIT_K": 4}
        return {"kernel": "dot", "BM": bucket, "BN": 64, "BG": 8, "num_warps": 4, "num_stages": 3, "SPLIT_K": 2}
    if bucket <= 128:
        return {"kernel": "dot", "BM": 128, "BN": 64, "BG": 4, "num_warps": 4, "num_stages": 3, "GROUP_M": 8}
    # Large M: the widest BM amortises each decoded W tile over the most rows of x.
    return {"kernel": "dot", "BM": 256, "BN": 64, "BG": 4, "num_warps": 4, "num_stages": 3, "GROUP_M": 8}


def scratch_fits(m: int, outlier_block: int | None) -> bool:
    """Whether the scratch path can tile the layer: its tiles are a power of two of >= 16 columns (and >= one group)
    lying inside one outlier block, so the largest power of two dividing the block must reach that (found by the GPU
    fuzz: 2:4 with outlier blocks of 4 or 68 columns; such layers take the dot kernel, which handles any block)."""
    return not outlier_block or (outlier_block & -outlier_block) >= max(16, m)


def pick_config(N: int, K: int, M: int, *, n: int = 8, m: int = 16, outlier_block: int | None = None) -> dict:
    """The tuned config for (N, K, bucket of M) if the table has one, else the heuristic; adjusted so that it is
    legal for this N:M pattern (tl.dot needs K steps of >= 16 columns inside one outlier block)."""
    scratch_min_m = envs.NM16_SCRATCH_MIN_M
    if scratch_min_m and M >= scratch_min_m and scratch_fits(m, outlier_block):
        return {"kernel": "scratch"}
    bucket = m_bucket(M)
    cfg = dict(_table().get(table_key(N, K, bucket)) or heuristic_config(N, K, M))
    if cfg["kernel"] == "dot":
        if (n, m) != (8, 16):
            # The generic decode compares every kept value with every column of its group ([BN, BG, n, m]
            # registers): keep K steps at 32 columns and BN <= 32 so it fits.
            cfg["BG"] = max(1, 32 // m)
            cfg["BN"] = min(cfg["BN"], 32)
        while cfg["BG"] * m < 16:  # tl.dot needs K steps of >= 16 columns
            cfg["BG"] *= 2
    return cfg
