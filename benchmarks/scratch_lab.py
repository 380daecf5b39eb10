"""Lab for the large-M scratch path (GPU host): unpack tile configs, the unpack's achieved bandwidth, and
scratch + cuBLAS vs the fused dot kernel vs cuBLAS dense per M. Raw numbers for docs/KERNELS.md.

    python3 benchmarks/scratch_lab.py --out lab.json

Timing: calls captured back to back in a CUDA graph over enough weight copies (>= 160 MB) that the packed bytes
come from HBM; median of 7 replays, per call (``common.graph_us``, the same method as bench_kernels.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import SHAPES, SHAPES_8B, graph_us


def main() -> None:
    import torch
    import torch.nn.functional as F

    from vllm_nm16.kernels import nm16_linear, repack
    from vllm_nm16.kernels.scratch import unpack_to_dense
    from nm16_dev.kernel_testing import layer_args, random_layer

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ms", default="4,8,16,32,64,128,256,1024")
    ap.add_argument("--shapes", default=",".join(SHAPES_8B))
    ap.add_argument("--tune", action="store_true", help="also sweep the unpack tile configs")
    ap.add_argument("--chunks", default="0,4,8,16,32", help="scratch chunk sizes in MB (0: whole layer)")
    args = ap.parse_args()
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": []}
    # copy bandwidth (read + write bytes / time) in this run
    a = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = graph_us([lambda: b.copy_(a)])
    res["copy_tb_s"] = 2 * a.numel() / (t * 1e-6) / 1e12
    del a, b
    print(f"copy bandwidth {res['copy_tb_s']:.2f} TB/s", flush=True)
    kw8 = dict(n=8, m=16, outlier_block=256, outliers_per_block=4)
    for name in args.shapes.split(","):
        N, K = SHAPES[name]
        t = random_layer(N, K, outlier_block=256, outliers_per_block=4, scale=True, shift=False, device="cuda")
        v, mk, ov, oi, sc, sh = layer_args(t)
        packed = repack(v, mk, ov, oi, **kw8)
        copies = max(1, int(160e6 // (N * K * 1.2)) + 1)
        layers = [tuple(p.clone() if p is not None else None for p in packed) + (sc.clone(),) for _ in range(copies)]
        dense_w = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(max(1, int(160e6 // (2 * N * K)) + 1))]
        lk = dict(kw8, in_features=K, out_features=N)
        bytes_rw = N * K * (1.125 + 4 * 3 / 256) + 4 * N + 2 * N * K
        best = None
        for rows in ((16, 32, 64) if args.tune else ()):
            for cols in (64, 128, 256):
                for warps in (4, 8):
                    outs = [torch.empty(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
                    fns = [lambda L=L, o=outs[i % 2]: unpack_to_dense(L[0], L[1], L[2], L[3], L[4], dtype=torch.bfloat16,
                                                                   rows=rows, cols=cols, num_warps=warps, out=o, **lk)
                           for i, L in enumerate(layers)]
                    us = graph_us(fns)
                    row = {"kind": "unpack", "shape": name, "N": N, "K": K, "rows": rows, "cols": cols,
                           "warps": warps, "us": us, "tb_s": bytes_rw / (us * 1e-6) / 1e12}
                    res["rows"].append(row)
                    if best is None or us < best["us"]:
                        best = row
                    del outs
        if best:
            print(f"{name}: best unpack {best['us']:.1f} us = {best['tb_s']:.2f} TB/s (rows {best['rows']} cols "
                  f"{best['cols']} warps {best['warps']})", flush=True)
        for M in [int(s) for s in args.ms.split(",")]:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            d_us = graph_us([lambda w=w: F.linear(x, w) for w in dense_w])
            row = {"kind": "linear", "shape": name, "N": N, "K": K, "M": M, "dense_us": d_us}
            for c in [float(v) for v in args.chunks.split(",")]:
                row[f"scratch_us_chunk{c:g}"] = graph_us([lambda L=L: nm16_linear(
                    x, L[0], L[1], L[2], L[3], L[4], None, None, config={"kernel": "scratch", "chunk_mb": c}, **lk)
                    for L in layers])
            s_us = min(v for k, v in row.items() if k.startswith("scratch_us_chunk"))
            if M < 512:
                row["default_us"] = graph_us([lambda L=L: nm16_linear(x, L[0], L[1], L[2], L[3], L[4], None, None,
                                                                       **lk) for L in layers])
            res["rows"].append(row)
            print(f"  M={M}: dense {d_us:.1f} us, scratch " + " ".join(
                f"{k[16:]}:{v:.1f}" for k, v in row.items() if k.startswith("scratch_us_chunk"))
                + f" best {d_us / s_us:.2f}x"
                  + (f", default {row['default_us']:.1f} us ({d_us / row['default_us']:.2f}x)"
                     if "default_us" in row else ""), flush=True)
        del layers, dense_w
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
