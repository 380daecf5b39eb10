"""nm16 kernels vs cuBLAS dense (`F.linear`) on Llama-3 8B/70B linear shapes (GPU), and the plot/table maker (CPU).

    python3 benchmarks/bench_kernels.py --out benchmarks/results/kernels_h200.json      # on the GPU host
    python benchmarks/bench_kernels.py --plot benchmarks/results/kernels_h200.json      # here: PNG + markdown
    python3 benchmarks/bench_kernels.py --shapes 8B o,2048x5632 --ms 1,16               # presets or NxK literals

Per shape: a random 8:16 layer (bf16) with the default outlier budget (k per block of B columns, --outliers-k /
--outlier-block) and a per-row scale; each kernel path is first checked against a float64 reference. Then per M:
cuBLAS dense, nm16 with outliers + scale, and nm16 bare (no outliers/scale), each timed as vLLM runs decode: calls
captured back to back in a CUDA graph (no Python launch overhead, which otherwise leaks into event timings of
these ~10-100 us kernels), rotating over enough copies of the weights (>= 120 MB) that they come from HBM, not
the 50 MB L2; the median of 7 replays, divided by the number of calls.
Floors: nm16 bytes (values + 16-bit masks [+ outliers + scale] + x + y) over the copy bandwidth measured in this
run, and 2*M*N*K over the bf16 matrix rate measured in this run (8192^3 cuBLAS); pct_of_floor = max(both) / time.
All small-M rows (M <= 64) of every shape run before the large-M ones, so a long stretch of tensor-core work does
not heat the chip right before the (clock-sensitive) decode rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# benchmarks/common.py (the script folder is on sys.path)
from common import SHAPES, commit_record, graph_us as _graph_us, graphs_us_interleaved

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the kernels' launch-shape rules (sass_per_kept) without an installed checkout
    sys.path.insert(1, str(ROOT))

MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


def parse_shapes(spec: str) -> dict[str, tuple[int, int]]:
    """Comma-separated preset names (SHAPES) or ``NxK`` literals (out_features x in_features); empty = all presets."""
    if not spec:
        return dict(SHAPES)
    out = {}
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item in SHAPES:
            out[item] = SHAPES[item]
            continue
        try:
            n_str, k_str = item.lower().split("x")
            out[item] = (int(n_str), int(k_str))
        except ValueError:
            raise SystemExit(f"--shapes: {item!r} is neither a preset ({', '.join(SHAPES)}) nor NxK") from None
    return out


def kernel_name(N: int, K: int, M: int, B: int | None) -> str:
    """The kernel nm16_linear runs for this call (the plugin's own choice, kernels.choose_config)."""
    import torch

    from vllm_nm16.kernels import choose_config

    x = torch.empty(M, K, device="cuda", dtype=torch.bfloat16)
    wv = torch.empty(0, device="cuda", dtype=torch.bfloat16)
    wm = torch.empty(0, device="cuda", dtype=torch.int16)
    return choose_config(x, wv, wm, n=8, m=16, out_features=N, outlier_block=B)["kernel"]  # B None: no outliers


def launch_config(kernel: str, M: int, N: int, K: int, with_out: bool) -> dict | None:
    """The Gluon kernels' launch config for this call as this checkout picks it (recorded per row, so that a table made
    later from the JSON -- SASS per kept value -- describes the loop that ran, not a later checkout's choice)."""
    if kernel == "gluon":
        from vllm_nm16.kernels.gluon_nm16 import pick_config as gluon_pick

        return gluon_pick(M, N, K, has_outliers=with_out)
    if kernel == "wgmma":
        from vllm_nm16.kernels.gluon_wgmma import pick_config as wgmma_pick

        return wgmma_pick(M, N, K)
    return None


def measure(args) -> dict:
    import torch
    import torch.nn.functional as F
    import triton

    from nm16_dev.kernel_testing import layer_args, random_layer, reference_linear
    from vllm_nm16.kernels import nm16_linear, repack
    from vllm_nm16.kernels.configs import pick_config

    bench = lambda fn: 1e3 * triton.testing.do_bench(fn, warmup=10, rep=args.rep_ms, return_mode="median")  # noqa

    def graph_us(fns) -> float:
        """Median per-call time of the calls in ``fns`` (one per weight copy) replayed from a CUDA graph."""
        return _graph_us(fns, target_us=args.graph_us)

    def copies_for(nbytes: float) -> int:
        return max(1, min(8, -(-int(120e6) // int(nbytes))))
    torch.manual_seed(0)
    a = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    bw = 2 * a.numel() / (bench(lambda: b.copy_(a)) * 1e-6)
    del a, b
    p = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    flops = 2 * 8192**3 / (bench(lambda: p @ p) * 1e-6)
    del p
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    header = {"gpu": smi, "torch": torch.__version__, "triton": triton.__version__,
              "copy_bandwidth_Bps": bw, "bf16_matmul_flops": flops, "command": " ".join(sys.argv),
              **commit_record(args.commit),
              "outliers_k": args.outliers_k, "outlier_block": args.outlier_block,
              "timing": "CUDA-graph replay of back-to-back calls rotating over >= 120 MB of weight copies "
                        "(weights from HBM, no launch overhead); median of 7 replays; --gluon-configs variants "
                        "with main's own choice (variant_baseline) replayed interleaved, rotating order, 7 rounds"}
    print(f"{smi}  torch {torch.__version__}  triton {triton.__version__}  copy {bw / 1e12:.2f} TB/s  "
          f"bf16 matmul {flops / 1e12:.0f} TFLOP/s", flush=True)

    k, B = args.outliers_k, args.outlier_block
    shapes = parse_shapes(args.shapes)
    ms = [int(v) for v in args.ms.split(",")] if args.ms else list(MS)
    layers, checks = {}, []
    variant_configs = json.loads(args.gluon_configs) if args.gluon_configs else []

    def variants_at(M: int) -> list[dict]:
        """The --gluon-configs variants timed at M: where a variant lists its own ``ms``, those M only; else every M
        (the Gluon mma_v2 kernel's only up to M = 64). Returned without the ``ms`` key (a launch config)."""
        return [{k: v for k, v in vc.items() if k != "ms"} for vc in variant_configs
                if (M in vc["ms"] if "ms" in vc else not (vc.get("kernel", "gluon") == "gluon" and M > 64))]
    for name, (N, K) in shapes.items():
        t = random_layer(N, K, outlier_block=B, outliers_per_block=k, scale=True, device="cuda")
        v, mk, ov, oi, sc, _ = layer_args(t)
        full = repack(v, mk, ov, oi, n=8, m=16, outlier_block=B, outliers_per_block=k)
        W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        layers[name] = (N, K, v, mk, ov, oi, sc, full, W)
        # gemv, both dot regimes, split-K and not, a non-multiple of BM; and the first M of each variant's own "ms"
        for M in sorted({1, 5, 16, 64, 300} | {min(vc["ms"]) for vc in variant_configs if "ms" in vc}):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = reference_linear(x, v, mk, ov, oi, sc, None, None, n=8, m=16, outlier_block=B,
                                   outliers_per_block=k)
            # the plugin's own choice (None), then every variant timed below, where it is timed
            for vc in [None] + (variants_at(M) if M <= max(ms) else []):
                cfg = None if vc is None else {"kernel": "gluon", **vc}
                y = nm16_linear(x, *full, sc, None, None, n=8, m=16, outlier_block=B, outliers_per_block=k,
                                in_features=K, out_features=N, config=cfg)
                err = float((y.double() - ref).norm() / ref.norm())
                checks.append({"shape": name, "M": M, **({} if vc is None else {"config": vc}), "rel_err": err})
                if not err <= 1e-2:
                    what = name if vc is None else f"variant {vc} {name}"
                    raise SystemExit(f"WRONG: {what} M={M} rel err {err:.3e}")
            del ref
        torch.cuda.empty_cache()
        print(f"checked {name}: max rel err {max(c['rel_err'] for c in checks if c['shape'] == name):.2e}",
              flush=True)

    rows = []
    order = [(n, M) for M in ms if M <= 64 for n in shapes] + [(n, M) for M in ms if M > 64 for n in shapes]
    for name, M in order:
        N, K, v, mk, ov, oi, sc, full, W = layers[name]
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        Ws = [W] + [W.clone() for _ in range(copies_for(W.numel() * 2) - 1)]
        dense_us = graph_us([lambda w=w: F.linear(x, w) for w in Ws])
        del Ws
        cfg = pick_config(N, K, M, outlier_block=B)
        kname = kernel_name(N, K, M, B)
        kname_bare = kernel_name(N, K, M, None)
        triton_us = None
        fulls = [full] + [tuple(t.clone() for t in full) for _ in range(copies_for(N * K * 1.125) - 1)]

        def calls(config, with_out):
            """One nm16_linear call per weight copy: with outliers + scale, or bare 8:16; ``config`` None is the
            plugin's own choice."""
            if with_out:
                return [lambda f=f: nm16_linear(x, *f, sc, None, None, n=8, m=16, outlier_block=B,
                                                outliers_per_block=k, in_features=K, out_features=N,
                                                config=config) for f in fulls]
            return [lambda f=f: nm16_linear(x, f[0], f[1], None, None, None, None, None, n=8, m=16,
                                            outlier_block=None, outliers_per_block=0, in_features=K,
                                            out_features=N, config=config) for f in fulls]
        for with_out in (True, False):
            try:
                us = graph_us(calls(None, with_out))
            except Exception as e:  # noqa: BLE001  (record and go on: one bad config must not lose the run)
                print(f"FAILED {name} M={M} outliers={with_out} {cfg}: {type(e).__name__}: {str(e)[:300]}")
                us = float("nan")
            nbytes = N * K // 16 * 18 + 2 * M * (K + N)
            if with_out:
                nbytes += N * (K // B) * k * 3 + 4 * N
            floor_us = max(nbytes / bw, 2 * M * N * K / flops) * 1e6
            rows.append({"shape": name, "N": N, "K": K, "M": M, "dense_us": dense_us, "nm16_us": us,
                         "speedup": dense_us / us, "GBps": nbytes / (us * 1e-6) / 1e9,
                         "floor_us": floor_us, "pct_of_floor": 100 * floor_us / us,
                         "dense_pct_of_floor": 100 * max((2 * N * K + 2 * M * (K + N)) / bw,
                                                         2 * M * N * K / flops) * 1e6 / dense_us,
                         "outliers": with_out, "scale": with_out, "kernel": kname if with_out else kname_bare,
                         "config": {"kernel": kname} if kname in ("gluon", "wgmma") else cfg,
                         "launch": launch_config(kname if with_out else kname_bare, M, N, K, with_out),
                         "weight_copies": len(fulls)})
        variants = variants_at(M)
        if variants:
            # Each variant with and without outliers, timed interleaved with the product's own choice (same
            # rounds, rotating order): a variant measured after main in a separate pass ran ~3% slow on the H200.
            configs = [None] + [{"kernel": "gluon", **vc} for vc in variants]
            us = graphs_us_interleaved([calls(c, w) for c in configs for w in (True, False)], args.graph_us)
            rows[-2]["variant_baseline"] = {"nm16_us": us[0], "bare_us": us[1]}
            for j, vc in enumerate(variants, start=1):
                v_us, b_us = us[2 * j], us[2 * j + 1]
                rows[-2].setdefault("variants", []).append({"config": vc, "nm16_us": v_us, "bare_us": b_us})
                print(f"   variant {vc}: {v_us:.1f} us ({v_us / us[0]:.3f} of main's {us[0]:.1f}), bare "
                      f"{b_us:.1f} us ({b_us / us[1]:.3f} of {us[1]:.1f})", flush=True)
        if kname in ("gluon", "wgmma"):  # the previous (Triton/scratch) kernel on the same call: "not slower than main"
            triton_us = graph_us(calls(cfg, True))
            rows[-2]["triton_us"] = triton_us
            rows[-2]["speedup_vs_triton"] = triton_us / rows[-2]["nm16_us"]
        del fulls
        r0, r1 = rows[-2], rows[-1]
        print(f"{name:<12} M={M:<5} dense {dense_us:8.1f}  nm16 {r0['nm16_us']:8.1f} ({r0['speedup']:.2f}x, "
              f"{r0['pct_of_floor']:.0f}% floor)  bare {r1['nm16_us']:8.1f} ({r1['speedup']:.2f}x, "
              f"{r1['pct_of_floor']:.0f}%)  {kname}" + (f"  triton {triton_us:.1f}" if triton_us else ""), flush=True)
        out = {"header": header, "checks": checks, "rows": rows}
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, args.out)
    return out


SASS_JSON = Path(__file__).resolve().parent / "results" / "sass_h200.json"


def sass_per_kept(row: dict, variants: dict) -> float | None:
    """SASS instructions per kept value of the main loop that served ``row`` (sass_count.py's compile of the same
    kernel with the same BM, warps and outliers-in-the-kernel choice as the launcher's pick_config for this M, N, K in
    this checkout); None where that variant was not compiled or the row ran another kernel."""
    M, N, K = row["M"], row["N"], row["K"]
    if row["kernel"] == "gluon":
        from vllm_nm16.kernels.gluon_nm16 import load_masks, pick_config

        # the config the run recorded (rows from before 'launch' was recorded: this checkout's choice)
        c = row.get("launch") or pick_config(M, N, K, has_outliers=row["outliers"])
        want = {"BM": c["BM"], "outliers": row["outliers"] and not c["pre"]}
        _, even_x, _ = load_masks(M, K, c)  # the launcher's EVEN_X: row masks in the loop or not
        found = [v for v in variants.values() if v.get("kernel", "gluon") == "gluon" and v["BM"] == want["BM"]
                 and v["outliers"] == want["outliers"] and (not want["outliers"] or v["outliers_in_loop"] ==
                                                             c["out_in_loop"])
                 and v.get("olanes", c["olanes"]) == c["olanes"]
                 and (not want["outliers"] or v.get("ot", v["BM"]) == c["ot"])
                 and v.get("even_x", True) == even_x]
    elif row["kernel"] == "wgmma":
        from vllm_nm16.kernels.gluon_wgmma import pick_config

        c = row.get("launch") or pick_config(M, N, K)
        found = [v for v in variants.values() if v.get("kernel") == "wgmma" and v["BM"] == c["BM"]
                 and v["NW"] == c["NW"] and v["outliers"] == (row["outliers"] and not c["PRE"])
                 and v.get("tma", False) == c["tma"] and v.get("ws", False) == c.get("ws", False)]
    else:
        return None
    return found[0]["sass_per_kept"] if found else None


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    rows, h = data["rows"], data["header"]
    if SASS_JSON.is_file():  # the loop's SASS per kept value, where known (compiled on the CPU: sass_count.py)
        variants = json.loads(SASS_JSON.read_text())["variants"]
        for r in rows:
            r["sass_per_kept"] = sass_per_kept(r, variants)
        h["sass_source"] = f"{SASS_JSON.relative_to(ROOT)} (benchmarks/sass_count.py; launch shapes of this checkout)"
        path.write_text(json.dumps(data, indent=1))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, with_out in zip(axes, (True, False)):
        for name in dict.fromkeys(r["shape"] for r in rows):
            rs = sorted((r for r in rows if r["shape"] == name and r["outliers"] == with_out), key=lambda r: r["M"])
            N, K = rs[0]["N"], rs[0]["K"]
            ax.plot([r["M"] for r in rs], [r["speedup"] for r in rs], marker="o", label=f"{name} {N}x{K}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (rows of x)")
        ax.set_title(f"nm16 8:16 {'+ outliers (k=%d/B=%d) + scale' % (h['outliers_k'], h['outlier_block']) if with_out else 'bare'}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speedup vs cuBLAS bf16 F.linear")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{h['gpu']}  torch {h['torch']}  triton {h['triton']}  copy {h['copy_bandwidth_Bps'] / 1e12:.2f} TB/s")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)

    lines = [f"GPU: {h['gpu']}; torch {h['torch']}, triton {h['triton']}; copy bandwidth "
             f"{h['copy_bandwidth_Bps'] / 1e12:.2f} TB/s, bf16 matmul {h['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s "
             f"(both measured in the same run). Command: `{h['command']}`. {h['timing']}.", "",
             "nm16 = 8:16 with outliers (k=%d per %d columns) + per-row scale; bare = no outliers/scale. "
             "%%floor = max(byte floor, FLOP floor) / time." % (h["outliers_k"], h["outlier_block"]), "",
             "| shape | N x K | M | cuBLAS µs | nm16 µs | speedup | %floor | bare µs | bare speedup | bare %floor | kernel "
             "| SASS/kept (nm16 / bare) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keyed = {(r["shape"], r["M"], r["outliers"]): r for r in rows}
    for name in dict.fromkeys(r["shape"] for r in rows):
        for M in sorted({r["M"] for r in rows if r["shape"] == name}):
            a, b = keyed.get((name, M, True)), keyed.get((name, M, False))
            if not a or not b:
                continue
            lines.append(f"| {name} | {a['N']}x{a['K']} | {M} | {a['dense_us']:.1f} | {a['nm16_us']:.1f} | "
                         f"{a['speedup']:.2f} | {a['pct_of_floor']:.0f} | {b['nm16_us']:.1f} | {b['speedup']:.2f} | "
                         f"{b['pct_of_floor']:.0f} | {a['kernel']} | {_fmt(a.get('sass_per_kept'))} / "
                         f"{_fmt(b.get('sass_per_kept'))} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {path.with_suffix('.png')} and {path.with_suffix('.md')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/kernels_h200.json")
    ap.add_argument("--plot", type=Path, help="make the PNG and markdown table from a results JSON (no GPU)")
    ap.add_argument("--shapes", default="", help="comma-separated presets (" + ", ".join(SHAPES) + ") or NxK literals")
    ap.add_argument("--ms", default="", help="comma-separated M values (default: all)")
    ap.add_argument("--outliers-k", type=int, default=4)
    ap.add_argument("--outlier-block", type=int, default=256)
    ap.add_argument("--rep-ms", type=int, default=40)
    ap.add_argument("--gluon-configs", default="",
                    help="JSON list of launch configs to time too, e.g. {\"WK\": 4} (Gluon mma_v2 kernel, M <= 64) "
                         "or {\"kernel\": \"wgmma\", \"BM\": 64, \"NW\": 8}; a config's \"ms\": [..] limits it "
                         "to those M")
    ap.add_argument("--commit", help="the commit this tree was copied from (the GPU host's git answers with the "
                                     "commit its session started from)")
    ap.add_argument("--graph-us", type=float, default=3000, help="target GPU time of one graph replay")
    args = ap.parse_args()
    if args.plot:
        plot(args.plot)
        return
    t0 = time.time()
    measure(args)
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
