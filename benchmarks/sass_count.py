"""SASS instructions per kept value of the Gluon fragment kernels' main loops (mma_v2: gluon_nm16.py, wgmma:
gluon_wgmma.py), per launch variant, compiled for sm_90 with the Triton in this environment (3.6 on the GPU host) --
no GPU needed: ``triton.compile`` targets sm_90 and the cubin is disassembled with the cuobjdump that Triton ships.

    python3 benchmarks/sass_count.py --out benchmarks/results/sass_h200.json

mma_v2: the main loop is unrolled by two K steps; per thread one trip decodes 2 rows x 2 groups x 2 steps = 64 kept
values, whatever BM/WN/WK are, so ``sass_per_kept = loop instructions / 64``. wgmma: one trip is one K step, 32 kept
values per thread (x staging and the wgmma issue included). Also recorded: registers per thread (occupancy) and the
instruction mix of the loop.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import inspect
import json
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEPT_PER_TRIP = 64
VARIANTS = {  # name: (BM, WN, WK, outliers, outliers in the loop) -- the launch shapes pick_config uses
    "BM8 bare": (8, 1, 4, False, True), "BM8 outliers": (8, 1, 4, True, True),
    "BM16 bare": (16, 1, 8, False, False), "BM16 outliers": (16, 1, 8, True, False),
    "BM32 bare": (32, 2, 4, False, False), "BM32 outliers": (32, 2, 4, True, False),
    "BM16 pre": (16, 1, 8, False, False, True),
    "BM16 outliers, 2 outlier lanes": (16, 1, 8, True, False, False, 2),   # config olanes = 2 (not the default)
    # the outlier stage on the first ot tokens only (pick_config's ot = pow2ceil(M) at M < BM; keyword arguments)
    "BM8 outliers, M=1 (ot 1)": (8, 1, 4, True, True, {"ot": 1}),
    "BM8 outliers, M=2 (ot 2)": (8, 1, 4, True, True, {"ot": 2}),
    "BM8 outliers, M=3-4 (ot 4)": (8, 1, 4, True, True, {"ot": 4}),
    # the loop as it runs where M is not a multiple of BM (M 1-7, 9-15): x loads masked per token row (the launcher's
    # EVEN_X is off unless config xc) -- the variants above are M = 8 / 16 or xc
    "BM8 bare, x rows masked (M 1-7)": (8, 1, 4, False, True, {"even_x": False}),
    "BM8 outliers, M=1 (ot 1), x rows masked": (8, 1, 4, True, True, {"ot": 1, "even_x": False}),
    "BM8 outliers, M=2 (ot 2), x rows masked": (8, 1, 4, True, True, {"ot": 2, "even_x": False}),
    "BM8 outliers, M=3-4 (ot 4), x rows masked": (8, 1, 4, True, True, {"ot": 4, "even_x": False}),
    "BM8 outliers, x rows masked (M 5-7)": (8, 1, 4, True, True, {"even_x": False}),
    "BM16 bare, x rows masked (M 9-15)": (16, 1, 8, False, False, {"even_x": False}),
    "BM16 outliers, x rows masked (M 9-15)": (16, 1, 8, True, False, {"even_x": False}),
    # config xc (not the default yet): rows past M re-read row M - 1, no row masks in the loop
    "BM8 outliers, M=1 (ot 1), xc": (8, 1, 4, True, True, {"ot": 1, "xc": True}),
    "BM8 bare, xc (M 1-7)": (8, 1, 4, False, True, {"xc": True}),
    "BM16 outliers, xc (M 9-15)": (16, 1, 8, True, False, {"xc": True}),
}


WGMMA_VARIANTS = {  # name: (NW, BM, outliers, SPLIT[, pre[, K, pf, tma]]) -- gluon_wgmma.pick_config's shapes; one
    # trip = one K step
    "wgmma BM32 bare": (4, 32, False, 1), "wgmma BM32 outliers": (4, 32, True, 3),
    "wgmma BM64 bare": (4, 64, False, 1), "wgmma BM64 outliers": (4, 64, True, 4),
    "wgmma BM64 NW8 outliers": (8, 64, True, 1), "wgmma BM128 bare": (4, 128, False, 2),
    "wgmma BM64 NW8 pre": (8, 64, False, 1, True), "wgmma BM128 NW8 bare": (8, 128, False, 1),
    # the TMA ring (config tma): x and W from shared memory, no prefetch registers
    "wgmma tma BM32 bare": (4, 32, False, 3, False, 4096, 0, True),
    "wgmma tma BM32 outliers": (4, 32, True, 3, False, 4096, 0, True),
    "wgmma tma BM64 pre": (4, 64, False, 2, True, 4096, 0, True),
    "wgmma tma BM128 pre": (4, 128, False, 2, True, 4096, 0, True),
    # the ring fed by a loader warp (config ws; refused by the launcher since session 12: wrong results on the H100):
    # the decode warps' loop, no TMA issue, no CTA barrier
    "wgmma tma ws BM64 pre": (4, 64, False, 2, True, 4096, 0, True, 0, True),
    "wgmma tma ws BM128 pre": (4, 128, False, 2, True, 4096, 0, True, 0, True),
    # decoder warpgroups storing A tiles for an MMA warpgroup (config dp; off: measured slower, session 12): the
    # decoder's loop
    "wgmma tma dp1 BM128 pre": (4, 128, False, 1, True, 4096, 0, True, 0, False, 1),
    "wgmma tma dp2 BM128 pre": (4, 128, False, 1, True, 4096, 0, True, 0, False, 2),
    "wgmma tma dp1 BM256 pre": (4, 256, False, 1, True, 4096, 0, True, 0, False, 1),
}
WGMMA_KEPT_PER_TRIP = 32  # 2 rows x 2 groups x 8 kept values per thread and K step


def _import_kernel():
    try:
        import torch  # noqa: F401
    except ImportError:  # a CPU box with only Triton: the module needs torch at import, not for compiling
        class _Stub(types.ModuleType):
            def __getattr__(self, k):
                return type(k, (), {})
        sys.modules["torch"] = _Stub("torch")
    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("vllm_nm16.kernels.fragment", ROOT / "vllm_nm16/kernels/fragment.py")
    fr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fr)
    sys.modules["vllm_nm16.kernels.fragment"] = fr
    spec = importlib.util.spec_from_file_location("vllm_nm16.kernels.gluon_nm16",
                                                  ROOT / "vllm_nm16/kernels/gluon_nm16.py")
    g = importlib.util.module_from_spec(spec)
    sys.modules["vllm_nm16.kernels.gluon_nm16"] = g
    spec.loader.exec_module(g)
    spec = importlib.util.spec_from_file_location("vllm_nm16.kernels.gluon_wgmma",
                                                  ROOT / "vllm_nm16/kernels/gluon_wgmma.py")
    w = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(w)
    return g, w


def _loop(sass: str) -> list[str]:
    """Opcodes of the longest loop closed by a conditional backward branch (the main K loop; an unconditional one is
    the jump back from an out-of-line mbarrier retry, which would span the epilogue)."""
    ins = [(int(m.group(1), 16), m.group(3), m.group(4), m.group(2)) for m in
           re.finditer(r"^\s+/\*([0-9a-f]{4})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*?);", sass, re.M)]
    best: list[str] = []
    for addr, op, rest, pred in ins:
        t = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") and pred else None
        if t and int(t.group(1), 16) < addr:
            body = [o for a, o, _, _ in ins if int(t.group(1), 16) <= a <= addr]
            best = max(best, body, key=len)
    return best


def count(g, BM, WN, WK, has_out, in_loop, pre=False, olanes=None, K=4096, maxnreg=None, pf=0, ot=None,
          even_x=True, xc=False) -> dict:
    from triton.experimental.gluon import language as gl

    olanes = olanes or g.outlier_lanes(BM)
    ot = ot or BM
    args = dict(x_ptr="*bf16", xw_ptr="*i32", wv_ptr="*i32", wm_ptr="*i32", tab_ptr="*i32", ov_ptr="*bf16",
                oi_ptr="*u8", scale_ptr="*fp32", shift_ptr="*fp32", bias_ptr="*bf16", pre_ptr="*fp32",
                y_ptr="*bf16", M="i32", N="i32", K="i32", S="i32", stride_ym="i32", NO="i32", XS=K, ASM=g._ASM, DT=gl.bfloat16,
                WK=WK, WN=WN, BM=BM, EVEN_K=True, EVEN_X=even_x, HAS_OUT=has_out, OUT_IN_LOOP=in_loop, HAS_PRE=pre, OB=256,
                OK=4,
                OC=olanes * WK, HAS_SCALE=has_out, HAS_SHIFT=False, HAS_BIAS=False, PF=pf, OT=ot, XC=xc)
    for name, lay in zip(("mma", "a_l", "b_l", "vl", "gl4", "xl", "ol"), g.make_layouts(WK, WN, BM, olanes, ot)):
        args[name] = lay
    sig, cex, attrs = _signature(g.nm16_fragment_kernel, args)
    return _sass_stats(g.nm16_fragment_kernel, sig, cex, attrs, WK * WN, KEPT_PER_TRIP,
                       {"BM": BM, "WN": WN, "WK": WK, "outliers": has_out, "outliers_in_loop": in_loop and has_out,
                        "pre": pre, "olanes": olanes, **({"maxnreg": maxnreg} if maxnreg else {}),
                        **({"pf": pf} if pf else {}), **({"ot": ot} if ot != BM else {}),
                        **({} if even_x else {"even_x": False}), **({"xc": True} if xc else {})}, maxnreg)


def _desc(dtype: str, block: list[int], layout) -> str:
    """A tensor descriptor argument's signature type (as the launcher's TensorDescriptor mangles)."""
    return f"tensordesc<{dtype}{block},{layout!r}>"


def count_wgmma(g, w, NW, BM, has_out, split, pre=False, K=4096, pf=0, tma=False, stages=0, ws=False,
                dp=0) -> dict:
    from triton.experimental.gluon import language as gl

    lays = w.make_layouts(NW, BM)
    args = dict(x_ptr="*bf16", xw_ptr="*i32", wv_ptr="*i32", wm_ptr="*i32", tab_ptr="*i32", ov_ptr="*bf16",
                oi_ptr="*u8", scale_ptr="*fp32", shift_ptr="*fp32", bias_ptr="*bf16", pre_ptr="*fp32", y_ptr="*bf16",
                ws_ptr="*fp32", cnt_ptr="*i32", xd=None, wvd=None, wmd=None, M="i32", N="i32", K="i32", S="i32",
                stride_ym="i32", NO="i32", XS=K, ASM=g._ASM, DT=gl.bfloat16, NW=NW, BM=BM, SPLIT=split,
                EVEN_K=True, EVEN_X=True, HAS_OUT=has_out, HAS_PRE=pre, OB=256, OK=4, HAS_SCALE=has_out, HAS_SHIFT=False, HAS_BIAS=False,
                PF=pf, XC=False, TMA=tma, NS=0, vl2=None, ml2=None, WS=ws, DP=dp)
    for name, lay in zip(("acc_l", "a_l", "vl", "gl4", "xl", "ol", "xs_l", "fl"), lays):
        args[name] = lay
    if tma:
        vl2, ml2, wv_s, wm_s = w.make_tma_layouts(NW)
        args.update(xd=_desc("bf16", [BM, 128], lays[6]), wvd=_desc("i32", [16 * NW, 32], wv_s),
                    wmd=_desc("i32", [16 * NW, 4], wm_s),
                    NS=stages or (w.dp_stages(BM) if dp else w.tma_stages(NW, BM)), vl2=vl2, ml2=ml2)
    sig, cex, attrs = _signature(w.nm16_wgmma_kernel, args)
    return _sass_stats(w.nm16_wgmma_kernel, sig, cex, attrs, NW, WGMMA_KEPT_PER_TRIP,
                       {"kernel": "wgmma", "BM": BM, "NW": NW, "SPLIT": split, "outliers": has_out, "pre": pre,
                        **({"pf": pf} if pf else {}), **({"tma": True, "stages": args["NS"]} if tma else {}),
                        **({"ws": True} if ws else {}), **({"dp": dp} if dp else {})},
                       128 if ws else w._DP_MAXNREG[dp] if dp else None)  # ws / dp: the launcher's maxnreg


def _signature(kernel, args):
    sig, cex, attrs = {}, {}, {}
    for i, p in enumerate(inspect.signature(kernel.fn).parameters):
        v = args[p]
        if isinstance(v, str) and v.startswith("tensordesc"):
            sig[p] = v
        elif isinstance(v, str) and v.startswith("*"):
            sig[p], attrs[(i,)] = v, [["tt.divisibility", 16]]
        elif v == "i32":
            sig[p] = "i32"
            if p != "M":
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[p], cex[(i,)] = "constexpr", v
    return sig, cex, attrs


def _sass_stats(kernel, sig, cex, attrs, num_warps, kept_per_trip, info, maxnreg=None) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    k = triton.compile(GluonASTSource(kernel, sig, cex, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, **({"maxnreg": maxnreg} if maxnreg else {})})
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    loop = _loop(sass)
    mix = collections.Counter(o.split(".")[0] for o in loop)
    spills = sum(1 for ln in sass.splitlines() if re.search(r"\b(STL|LDL)\b", ln))
    return {**info, "loop_instructions": len(loop), "sass_per_kept": round(len(loop) / kept_per_trip, 2),
            "registers": int(re.search(r"REG:(\d+)", res).group(1)), "mix": dict(mix.most_common(12)),
            "local_memory_instructions": spills, "loop_local_memory": mix.get("STL", 0) + mix.get("LDL", 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/sass_h200.json")
    args = ap.parse_args()
    import triton

    g, w = _import_kernel()
    rows = {}
    for name, v in list(VARIANTS.items()) + list(WGMMA_VARIANTS.items()):
        if name not in VARIANTS:
            rows[name] = count_wgmma(g, w, *v)
        else:
            rows[name] = count(g, *v[:-1], **v[-1]) if isinstance(v[-1], dict) else count(g, *v)
        r = rows[name]
        print(f"{name:<14} {r['sass_per_kept']:5.2f} SASS/kept  ({r['loop_instructions']} per trip)  "
              f"{r['registers']} regs  {r['mix']}")
    args.out.write_text(json.dumps({"triton": triton.__version__, "target": "sm_90", "command": " ".join(sys.argv),
                                    "kept_per_trip": KEPT_PER_TRIP, "variants": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
