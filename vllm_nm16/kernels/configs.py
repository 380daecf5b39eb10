"""Launch configurations: a table tuned on the H100 (``configs_h100.json`` beside this file, written by
``benchmarks/kernel_lab.py --tune``), keyed by (N, K, M bucket), with a heuristic for shapes it does not hold.

A config is a dict: ``kernel`` ("gemv" | "dot"), block sizes ``BM`` (rows of x), ``BN`` (output rows), ``BG`` (groups
of M columns per K step), ``num_warps``, ``num_stages`` and, for the dot kernel, ``GROUP_M``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("configs_h100.json")
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# Largest M the gemv (CUDA-core, gather-x) kernel serves by default; above it the tile is decoded for tl.dot.
GEMV_MAX_M = 8


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
    bucket = m_bucket(M)
    if bucket <= GEMV_MAX_M:
        # Keep ~2-4K kept values per program and step (16-32 registers of accumulator per thread), small BN so that
        # even N = 4096 gives ~1000 programs: many independent 16-byte loads in flight per SM.
        BN, BG = {1: (4, 64), 2: (4, 32), 4: (4, 16), 8: (2, 16)}[bucket]
        return {"kernel": "gemv", "BM": bucket, "BN": BN, "BG": BG, "BO": 16, "num_warps": 4, "num_stages": 2}
    if bucket <= 16:
        return {"kernel": "dot", "BM": 16, "BN": 64, "BG": 4, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
    if bucket <= 64:
        return {"kernel": "dot", "BM": bucket, "BN": 64, "BG": 4, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
    if bucket <= 128:
        return {"kernel": "dot", "BM": 64, "BN": 128, "BG": 2, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    return {"kernel": "dot", "BM": 128, "BN": 128, "BG": 2, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def pick_config(N: int, K: int, M: int, *, n: int = 8, m: int = 16, outlier_block: int | None = None) -> dict:
    """The tuned config for (N, K, bucket of M) if the table has one, else the heuristic; adjusted so that it is
    legal for this N:M pattern (tl.dot needs K steps of >= 16 columns inside one outlier block)."""
    bucket = m_bucket(M)
    cfg = dict(_table().get(table_key(N, K, bucket)) or heuristic_config(N, K, M))
    if cfg["kernel"] == "dot":
        while cfg["BG"] * m < 16:  # tl.dot needs K steps of >= 16 columns
            cfg["BG"] *= 2
    return cfg
