"""GPU check of the Gluon fragment kernels (mma_v2, wgmma) vs float64 (format.unpack). Run on the GPU host:
python3 benchmarks/gpu/gluon_check.py [--kernel wgmma] [--extra JSON] (--extra: a launch variant under test, merged
into every case's config). Prints one JSON line per case."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from nm16_dev.kernel_testing import layer_args, random_layer, reference_linear
from vllm_nm16.kernels import nm16_linear


def check(N, K, M, dtype, k, B, scale, shift, bias, cfg=None):
    t = random_layer(N, K, outlier_block=B if k else None, outliers_per_block=k, scale=scale, shift=shift,
                     dtype=dtype, device="cuda")
    v, mk, ov, oi, sc, sh = layer_args(t)
    b = (0.1 * torch.randn(N, device="cuda")).to(dtype) if bias else None
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    ref = reference_linear(x, v, mk, ov, oi, sc, sh, b, n=8, m=16, outlier_block=B if k else None,
                           outliers_per_block=k)
    y = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
    nm16_linear(x, v, mk, ov, oi, sc, sh, b, n=8, m=16, outlier_block=B if k else None, outliers_per_block=k,
                in_features=K, out_features=N, config={"kernel": "gluon", **(cfg or {})}, out=y)
    torch.cuda.synchronize()
    err = float((y.double() - ref).norm() / ref.norm())
    return {"N": N, "K": K, "M": M, "dtype": str(dtype), "k": k, "B": B, "scale": scale, "shift": shift,
            "bias": bias, "cfg": cfg, "finite": bool(torch.isfinite(y).all()), "rel_err": err}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default="gluon", choices=["gluon", "wgmma"])
    ap.add_argument("--extra", default="{}", help="JSON config keys added to every case (a variant under test)")
    args = ap.parse_args()
    torch.manual_seed(0)
    bad = 0
    cases = []
    # (N, K, M, dtype, outliers k, block B, scale, shift, bias[, config]): every M class, K tails, both dtypes
    for (N, K) in [(4096, 4096), (1024, 14336), (576, 576), (192, 1536), (48, 160)]:
        k, B = (4, 256) if K % 256 == 0 else (3, 192) if K % 192 == 0 else (0, 256)
        for M in (1, 3, 9, 16, 17, 33, 64):
            cases.append((N, K, M, torch.bfloat16, k, B, True, True, True))
        for M in (2, 16, 40):
            cases.append((N, K, M, torch.float16, k, B, True, False, False))
        cases.append((N, K, 8, torch.bfloat16, 0, B, False, False, False))
    for cfg in ({"WK": 2}, {"WK": 16, "WN": 1}, {"WK": 4, "WN": 2}, {"out_in_loop": True, "BM": 16},
                {"out_in_loop": False, "BM": 8}, {"BM": 32, "WN": 4, "WK": 2}, {"BM": 32, "WN": 1, "WK": 8},
                {"pre": True}, {"pre": True, "BM": 16, "out_in_loop": True}, {"olanes": 2, "BM": 16, "WK": 8},
                {"olanes": 1}, {"olanes": 8, "BM": 32, "WN": 2, "WK": 4}, {"maxnreg": 96}, {"pf": 4},
                {"pf": 64, "BM": 16, "WK": 4}, {"xc": True}, {"xc": True, "BM": 16, "WK": 4}):
        cases.append((2048, 4096, 7, torch.bfloat16, 4, 256, True, False, False, cfg))
        cases.append((2048, 4096, 40, torch.bfloat16, 4, 256, True, False, False, cfg))
    # the outlier stage on fewer tokens than the block (ot < BM), in the loop (BM 8) and after it (BM 16, 32)
    for M, cfg in ((1, {"ot": 1}), (2, {"ot": 2, "BM": 16}), (1, {"ot": 1, "BM": 32, "WN": 4, "WK": 2}),
                   (3, {"ot": 4, "out_in_loop": False}), (4, {"ot": 4, "BM": 16, "out_in_loop": True})):
        cases.append((2048, 4096, M, torch.bfloat16, 4, 256, True, False, False, cfg))
        cases.append((1024, 14336, M, torch.float16, 4, 256, True, True, True, cfg))
    for M in (1, 5, 11, 15):  # xc with a K tail (row masks stay for the tail step; offsets clamped)
        cases.append((192, 1568, M, torch.bfloat16, 2, 224, True, True, True, {"xc": True}))
    if args.kernel == "wgmma":  # the wgmma kernel: every M class it serves, configs, tails, both dtypes
        cases = []
        for (N, K) in [(4096, 4096), (1024, 14336), (576, 576), (192, 1536), (64, 160)]:
            k, B = (4, 256) if K % 256 == 0 else (3, 192) if K % 192 == 0 else (0, 256)
            for M in (1, 17, 33, 64, 100, 256, 300):
                cases.append((N, K, M, torch.bfloat16, k, B, True, True, True, {"kernel": "wgmma"}))
            for M in (40, 130):
                cases.append((N, K, M, torch.float16, k, B, True, False, False, {"kernel": "wgmma"}))
            cases.append((N, K, 64, torch.bfloat16, 0, B, False, False, False, {"kernel": "wgmma"}))
        for cfg in ({"BM": 32, "NW": 4, "SPLIT": 1}, {"BM": 64, "NW": 4, "SPLIT": 3}, {"BM": 128, "NW": 8},
                    {"BM": 16, "NW": 8, "SPLIT": 5}, {"BM": 128, "NW": 4, "SPLIT": 8}, {"SPLIT": 32},
                    {"PRE": True}, {"PRE": True, "BM": 32, "SPLIT": 3}, {"pf": 4}, {"pf": 64, "SPLIT": 4},
                    {"xc": True}, {"xc": True, "BM": 64, "SPLIT": 3}, {"tma": True}, {"tma": True, "stages": 2},
                    {"tma": True, "BM": 128, "NW": 4, "SPLIT": 8}, {"tma": True, "BM": 64, "NW": 8, "stages": 6},
                    {"tma": True, "PRE": True}, {"tma": True, "BM": 32, "SPLIT": 1}, {"tma": True, "dp": 1},
                    {"tma": True, "dp": 2, "BM": 128, "SPLIT": 8}, {"tma": True, "dp": 1, "BM": 256, "SPLIT": 2}):
            cases.append((2048, 4096, 77, torch.bfloat16, 4, 256, True, False, False, dict(cfg, kernel="wgmma")))
            cases.append((2048, 4096, 200, torch.bfloat16, 0, 256, False, False, True, dict(cfg, kernel="wgmma")))
    extra = json.loads(args.extra)
    cases = [c[:9] + (dict(c[9] if len(c) > 9 else {}, **extra),) for c in cases]
    for c in cases:
        try:
            r = check(*c)
        except Exception as e:  # noqa: BLE001
            r = {"case": str(c), "error": f"{type(e).__name__}: {str(e)[:2000]}"}
        bound = 1e-2 if "bfloat16" in r.get("dtype", "") else 2e-3
        ok = "error" not in r and r["finite"] and r["rel_err"] <= bound
        bad += not ok
        r["ok"] = ok
        print(json.dumps(r), flush=True)
    print(f"gluon check: {len(cases) - bad} passed, {bad} failed", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
