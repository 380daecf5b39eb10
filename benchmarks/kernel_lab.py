"""Kernel lab (GPU): check and time nm16 kernel variants/configs side by side in one device call.

    python3 benchmarks/kernel_lab.py --out $OUT/lab.json [--shapes 4096x4096,28672x4096] [--ms 1,4,16,64,1024]
        [--budget-s 420] [--quick]

For every shape: builds a random 8:16 layer (bf16, k=4 outliers per 256-block + scale), checks every variant against
a float64 reference (rel err <= 1e-2), times it (triton.testing.do_bench median, L2 flushed before every run), and
prints per (shape, M) the best config of each variant with its %-of-floor and speedup over cuBLAS. Copy bandwidth is
measured in the same run. The JSON holds every timing (used to fill vllm_nm16/kernels/configs_h100.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from nm16_dev.kernel_testing import layer_args, random_layer, reference_linear
from vllm_nm16.kernels import nm16_linear, repack


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    a = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=100, return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)


def nm16_bytes(N: int, K: int, M: int, outliers: bool, pos_mode: str, k: int = 4, B: int = 256) -> float:
    meta = {"lut16": 2, "nibble32": 4, "byte": 8}[pos_mode]
    b = N * K // 16 * (16 + meta) + M * K * 2 + M * N * 2
    if outliers:
        b += N * (K // B) * k * 3 + N * 4
    return float(b)


def gemv_configs(M: int, quick: bool) -> list[dict]:
    bm = min(8, 1 << max(0, (M - 1).bit_length()))
    if M == 1:
        space = [(1, 128, 4, p) for p in (0, 8, 16)] + [(2, 64, 4, p) for p in (0, 8, 16)] + \
                [(1, 64, 4, 16), (2, 128, 4, 8), (4, 64, 4, 8), (1, 128, 8, 8)]
    else:
        space = [(2, 32, 4, p) for p in (0, 8, 16)] + [(4, 16, 4, 0), (2, 64, 4, 8)]
    return [{"kernel": "gemv", "BM": bm, "BN": bn, "BG": bg, "BO": 64, "num_warps": w, "num_stages": 2,
             "out_in_loop": False, "persistent": p} for bn, bg, w, p in space]


def dot_configs(M: int, quick: bool) -> list[dict]:
    # (BM, BN, BG, warps, stages, split_k)
    if M <= 16:
        space = [(16, 16, 8, 1, 3, sk) for sk in (1, 2, 4, 8)] + [(16, 32, 8, 2, 3, sk) for sk in (1, 2, 4, 8)] + \
                [(16, 64, 8, 4, 3, sk) for sk in (2, 4, 8)] + [(16, 32, 4, 1, 3, 4), (16, 16, 16, 1, 2, 4)]
    elif M <= 64:
        space = [(64, 64, 8, 4, 3, sk) for sk in (1, 2, 4)] + [(64, 32, 8, 2, 3, sk) for sk in (1, 2, 4)] + \
                [(32, 64, 8, 4, 3, 2), (64, 128, 8, 8, 3, 2)]
    elif M <= 256:
        space = [(128, 64, 4, 4, 3, 1), (128, 64, 8, 4, 3, 2), (256, 64, 4, 4, 3, 1)]
    else:
        space = [(256, 64, 4, 4, 3, 1), (256, 64, 8, 4, 3, 1), (256, 128, 4, 8, 3, 1), (128, 128, 4, 8, 3, 1),
                 (256, 64, 4, 4, 4, 1)]
    return [{"kernel": "dot", "BM": bm, "BN": bn, "BG": bg, "GROUP_M": 8, "num_warps": w, "num_stages": st,
             "SPLIT_K": sk} for bm, bn, bg, w, st, sk in space]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="lab.json")
    ap.add_argument("--shapes", default="4096x4096,28672x4096,4096x14336,6144x4096")
    ap.add_argument("--ms", default="1,16,64,2,4,8,256,1024")
    ap.add_argument("--modes", default="lut16")
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gemv-max-m", type=int, default=4)
    ap.add_argument("--dot-min-m", type=int, default=2)
    args = ap.parse_args()
    t_start = time.time()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    results = {"bandwidth": bw, "device": torch.cuda.get_device_name(), "rows": []}
    ms_list = [int(v) for v in args.ms.split(",")]
    modes = args.modes.split(",")
    summary = []
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        t = random_layer(N, K, outlier_block=256, outliers_per_block=4, scale=True, device="cuda")
        v, mk, ov, oi, sc, _ = layer_args(t)
        packed = {mode: repack(v, mk, ov, oi, n=8, m=16, outlier_block=256, outliers_per_block=4, pos_mode=mode)
                  for mode in modes}
        W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        for M in ms_list:
            if time.time() - t_start > args.budget_s:
                print(f"budget reached: skipping {shape} M={M}", flush=True)
                continue
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            dense_us = 1e3 * triton.testing.do_bench(lambda: F.linear(x, W), warmup=10, rep=40,
                                                     return_mode="median")
            ref = reference_linear(x, v, mk, ov, oi, sc, None, None, n=8, m=16, outlier_block=256,
                                   outliers_per_block=4)
            cands = []
            for mode in modes:
                # The position modes are compared where they matter most (M = 1 gemv, M = 16 dot); else lut16.
                if M <= args.gemv_max_m and (mode == modes[0] or M == 1):
                    cands += [(mode, cfg) for cfg in gemv_configs(M, args.quick)]
                if M >= args.dot_min_m and (mode == modes[0] or M == 16):
                    cands += [(mode, cfg) for cfg in dot_configs(M, args.quick)]
            for mode, cfg in cands:
                wv, wm, ov2, oi2 = packed[mode]
                for with_out in (True, False):
                    kw = dict(n=8, m=16, outlier_block=256, outliers_per_block=4 if with_out else 0,
                              in_features=K, out_features=N, config=cfg)
                    fn = (lambda: nm16_linear(x, wv, wm, ov2, oi2, sc, None, None, **kw)) if with_out else \
                         (lambda: nm16_linear(x, wv, wm, None, None, None, None, None, **kw))
                    try:
                        y = fn()
                        torch.cuda.synchronize()
                    except Exception as e:  # noqa: BLE001  (a config that does not compile is a lab result too)
                        print(f"  FAIL {shape} M={M} {mode} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                        break
                    if with_out:
                        err = ((y.double() - ref).norm() / ref.norm()).item()
                        if not err <= 1e-2:
                            print(f"  WRONG {shape} M={M} {mode} {cfg}: rel err {err:.3e}", flush=True)
                            break
                    us = 1e3 * triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")
                    floor_us = nm16_bytes(N, K, M, with_out, mode) / bw * 1e6
                    row = dict(N=N, K=K, M=M, mode=mode, cfg=cfg, outliers=with_out, us=us, dense_us=dense_us,
                               speedup=dense_us / us, pct_of_floor=100 * floor_us / us,
                               err=err if with_out else None)
                    results["rows"].append(row)
            Path(args.out).write_text(json.dumps(results, indent=1))
            for mode in modes:
                for kern in ("gemv", "dot"):
                    for with_out in (False, True):
                        rs = [r for r in results["rows"] if r["N"] == N and r["K"] == K and r["M"] == M
                              and r["mode"] == mode and r["cfg"]["kernel"] == kern and r["outliers"] == with_out]
                        if kern == "gemv" and with_out and M == 1:
                            for flag in (True, False):
                                fs = [r for r in rs if r["cfg"].get("out_in_loop", True) == flag]
                                if fs:
                                    b = min(fs, key=lambda r: r["us"])
                                    summary.append((shape, M, mode, kern, with_out, b["us"], dense_us,
                                                    b["speedup"], b["pct_of_floor"], b["cfg"]))
                            continue
                        if rs:
                            b = min(rs, key=lambda r: r["us"])
                            summary.append((shape, M, mode, kern, with_out, b["us"], dense_us, b["speedup"],
                                            b["pct_of_floor"], b["cfg"]))
            print(f"{shape} M={M} done at {time.time() - t_start:.0f}s", flush=True)
        del packed, t, W
        torch.cuda.empty_cache()
    print("\nshape        M  mode      kern  out   nm16_us dense_us speedup %floor  config")
    for s in summary:
        c = s[9]
        cs = f"BM{c['BM']} BN{c['BN']} BG{c['BG']} w{c['num_warps']} s{c['num_stages']} sk{c.get('SPLIT_K', 1)}" + \
            f" p{c.get('persistent', 0)}" + \
            (" sepOut" if c.get("out_in_loop") is False else "")
        print(f"{s[0]:<11} {s[1]:>4} {s[2]:<9} {s[3]:<5} {str(s[4]):<5} {s[5]:8.1f} {s[6]:8.1f} {s[7]:6.2f} "
              f"{s[8]:6.1f}  {cs}")
    print(f"total {time.time() - t_start:.0f}s")
    sass_report(args, results)


class _LaunchRecorder:
    """Stands in for a jit kernel (``kernel[grid](...)``) and keeps what the launch returned (the compiled kernel),
    so the lab can read its registers and SASS without the product keeping any state for it."""

    def __init__(self, kernel):
        self.kernel, self.compiled = kernel, None

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.compiled = launch(*args, **kwargs)
            return self.compiled
        return run


def sass_report(args, results) -> None:
    """Registers, spills and an instruction histogram of the best M=1 gemv and M>=64 dot kernels (first shape)."""
    import subprocess  # noqa: PLC0415
    from collections import Counter  # noqa: PLC0415

    from vllm_nm16.kernels import triton_nm16  # noqa: PLC0415

    outdir = Path(args.out).parent
    for M, kern in ((1, "gemv"), (16, "dot"), (1024, "dot")):
        rs = [r for r in results["rows"] if r["M"] == M and r["cfg"]["kernel"] == kern and not r["outliers"]]
        if not rs:
            continue
        b = min(rs, key=lambda r: r["us"])
        N, K = b["N"], b["K"]
        t = random_layer(N, K, device="cuda")
        v, mk, *_ = layer_args(t)
        wv, wm, _, _ = repack(v, mk, None, None, n=8, m=16, outlier_block=None, outliers_per_block=0,
                              pos_mode=b["mode"])
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        name = "_nm16_gemv_kernel" if kern == "gemv" else "_nm16_dot_kernel"
        rec = _LaunchRecorder(getattr(triton_nm16, name))
        setattr(triton_nm16, name, rec)
        try:
            nm16_linear(x, wv, wm, None, None, None, None, None, n=8, m=16, outlier_block=None,
                        outliers_per_block=0, in_features=K, out_features=N, config=b["cfg"])
        finally:
            setattr(triton_nm16, name, rec.kernel)
        ck = rec.compiled
        cubin = outdir / f"{kern}_M{M}.cubin"
        cubin.write_bytes(ck.asm["cubin"])
        hist = Counter()
        try:
            sass = subprocess.run(["cuobjdump", "-sass", str(cubin)], capture_output=True, text=True).stdout
            for line in sass.splitlines():
                parts = line.split("*/")
                if len(parts) > 1 and "/*" in parts[0]:
                    op = parts[1].strip().split(" ")[0].split(".")[0]
                    if op and op[0] != "@":
                        hist[op] += 1
                    elif op.startswith("@") and len(parts[1].split()) > 1:
                        hist[parts[1].split()[1].split(".")[0]] += 1
        except FileNotFoundError:
            pass
        print(f"SASS {kern} M={M} {b['mode']} {b['cfg']}: regs {ck.n_regs} spills {ck.n_spills} "
              f"top ops {hist.most_common(14)}")


if __name__ == "__main__":
    main()
