"""Launch-shape sweep of the outlier pass (vllm_nm16/kernels/outliers.py) on the GPU host.

    python3 benchmarks/gpu/outlier_sweep.py --out $OUT/outlier_sweep.json [--shapes 28672x4096,...] [--ms 16,64]

Per shape (random 4-per-256 outliers, bf16) and M: every config of the grid below is checked against the float64
reference (rel err <= 1e-4) and timed as the benchmarks time kernels (CUDA-graph replay over enough copies of the
outlier tensors that they come from HBM, median of 7); the transpose of x is included (it is part of the pass).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import graph_us  # noqa: E402  (benchmarks/common.py)

from nm16_dev.kernel_testing import layer_args, random_layer, reference_linear  # noqa: E402
from vllm_nm16.kernels.outliers import outlier_product, pick_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="6144x4096,28672x4096,4096x14336,57344x8192")
    ap.add_argument("--ms", default="8,16,32,64,128")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    t0 = time.time()
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        t = random_layer(N, K, outlier_block=256, outliers_per_block=4, device="cuda")
        v, mk, ov, oi, _, _ = layer_args(t)
        copies = max(1, int(120e6 // (ov.numel() * 3)))
        outs = [(ov, oi)] + [(ov.clone(), oi.clone()) for _ in range(copies - 1)]
        for M in (int(m) for m in args.ms.split(",")):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = (reference_linear(x, v, mk, ov, oi, None, None, None, n=8, m=16, outlier_block=256,
                                    outliers_per_block=4)
                   - reference_linear(x, v, mk, None, None, None, None, None, n=8, m=16, outlier_block=None,
                                      outliers_per_block=0))
            default = pick_config(M)
            grid = [dict(BR=br, BS=bs, BT=bt, num_warps=nw) for br, bs, bt, nw in
                    itertools.product((16, 32, 64, 128), (4, 8, 16), (16, 32, 64), (4, 8))
                    if bt <= max(16, 2 * M) and br * bs * bt // (32 * nw) <= 128]
            for cfg in [default] + [c for c in grid if c != default]:
                kw = dict(N=N, outlier_block=256, outliers_per_block=4, in_features=K, config=cfg)
                try:
                    o = outlier_product(x, ov, oi, **kw)
                    err = float((o.double() - ref).norm() / ref.norm())
                    us = graph_us([lambda a=a, b=b: outlier_product(x, a, b, **kw) for a, b in outs], 2000)
                except Exception as e:  # noqa: BLE001
                    rows.append({"N": N, "K": K, "M": M, "cfg": cfg, "error": f"{type(e).__name__}: {e}"[:300]})
                    continue
                rows.append({"N": N, "K": K, "M": M, "cfg": cfg, "us": round(us, 2), "rel_err": err,
                             "default": cfg == default, "ok": err <= 1e-4})
            best = min((r for r in rows if r.get("N") == N and r["M"] == M and "us" in r), key=lambda r: r["us"])
            dflt = next(r for r in rows if r.get("N") == N and r["M"] == M and r.get("default"))
            print(f"{shape} M={M}: default {dflt.get('us')} us, best {best['us']} us {best['cfg']}", flush=True)
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(),
                                          "rows": rows, "seconds": round(time.time() - t0)}, indent=1))
    bad = [r for r in rows if not r.get("ok")]
    print(f"{len(rows)} configs, {len(bad)} failed or inexact", flush=True)


if __name__ == "__main__":
    main()
