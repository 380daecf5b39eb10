"""Kernel correctness cases, shared by tests/test_kernels.py: run under TRITON_INTERPRET=1 in a subprocess (CPU, CI)
and directly on CUDA (GPU-only tests). ``python tests/kernel_cases.py DEVICE`` prints one JSON line per case."""

from __future__ import annotations

import json
import sys


REL_ERR_BOUND = 1e-2  # bf16 output rounding (~3e-3 measured), fp32 accumulation
REL_ERR_BOUND_FP32 = 1e-5  # fp32 output (products of bf16 values and fp32 x, fp32 sums)
REL_ERR_BOUND_FP16 = 2e-3  # fp16 output (~3e-4 measured): tight enough that a wrong decode of a few groups shows

# (name, n, m, N, K, M, dtype, outliers (B, k) or None, scale, shift, bias, pos_mode, config override)
GEMV = {"kernel": "gemv", "BM": 4, "BN": 4, "BG": 16, "BO": 16, "num_warps": 4}
GEMV_PERSISTENT = dict(GEMV, persistent=1, BM=1)
SCRATCH = {"kernel": "scratch"}
DOT_SPLIT = {"kernel": "dot", "BM": 16, "BN": 16, "BG": 4, "SPLIT_K": 3, "num_warps": 1}
CASES = [
    # default configs: the M-bucket picks gemv (M <= 2) or the tile-decode dot kernel
    ("m1_bf16_out_scale", 8, 16, 24, 512, 1, "bfloat16", (256, 4), True, False, False, None, None),
    ("m2_fp16_bare", 8, 16, 24, 512, 2, "float16", None, False, False, False, None, None),
    ("m7_bf16_all", 8, 16, 24, 512, 7, "bfloat16", (256, 4), True, True, True, None, None),
    ("m16_fp16_out", 8, 16, 40, 256, 16, "float16", (128, 2), False, False, True, None, None),
    ("m33_bf16_scale_shift", 8, 16, 24, 768, 33, "bfloat16", None, True, True, False, None, None),
    ("m128_bf16_all", 8, 16, 20, 256, 128, "bfloat16", (256, 4), True, True, True, None, None),
    # forced kernels / layouts
    ("gemv_m7_outloop", 8, 16, 18, 512, 7, "bfloat16", (256, 4), True, True, True, None, GEMV),
    ("gemv_persistent_m1", 8, 16, 37, 256, 1, "float16", (128, 4), True, False, True, None, GEMV_PERSISTENT),
    ("dot_splitk_m5", 8, 16, 24, 1024, 5, "bfloat16", (256, 4), True, True, True, None, DOT_SPLIT),
    ("nibble32_m1", 8, 16, 24, 512, 1, "bfloat16", (256, 4), True, False, False, "nibble32", None),
    ("nibble32_m16", 8, 16, 24, 512, 16, "float16", None, True, False, True, "nibble32", None),
    ("byte816_m33", 8, 16, 12, 256, 33, "bfloat16", (64, 3), True, True, False, "byte", None),
    # other N:M patterns (POS_BYTE), K not a multiple of the block sizes
    ("p24_m1", 2, 4, 12, 100, 1, "bfloat16", None, True, False, True, None, None),
    ("p24_m16_out", 2, 4, 12, 96, 16, "float16", (32, 2), True, True, False, None, None),
    ("p48_m7", 4, 8, 10, 72, 7, "bfloat16", (24, 3), False, True, True, None, None),
    ("p1632_m2", 16, 32, 9, 96, 2, "bfloat16", None, True, False, False, None, None),
    ("p1632_m33_out", 16, 32, 9, 128, 33, "float16", (64, 5), True, True, True, None, None),
    ("dot_bm64_outmerge_m70", 8, 16, 40, 512, 70, "bfloat16", (256, 4), True, True, True, None,
     {"kernel": "dot", "BM": 64, "BN": 32, "BG": 4, "num_warps": 4, "out_merge": True}),
    ("dot_bm64_outmerge_fp16_m64", 8, 16, 24, 256, 64, "float16", (128, 2), False, False, False, None,
     {"kernel": "dot", "BM": 64, "BN": 16, "BG": 8, "num_warps": 4, "out_merge": True}),
    ("dot_bm32_xt_gather_m40", 8, 16, 24, 512, 40, "bfloat16", (256, 4), True, True, True, None,
     {"kernel": "dot", "BM": 32, "BN": 16, "BG": 4, "num_warps": 4, "SPLIT_K": 2}),
    ("mixed_bf16_weights_fp16_x_m1", 8, 16, 24, 512, 1, "bfloat16>float16", (256, 4), True, True, True, None,
     None),
    ("mixed_bf16_weights_fp16_x_m40", 8, 16, 24, 512, 40, "bfloat16>float16", (256, 4), True, True, True, None,
     None),
    # fp32 activations (vLLM --dtype float32; values cast up at load): exact fp32 dot (no TF32)
    ("fp32_x_m1", 8, 16, 24, 512, 1, "bfloat16>float32", (256, 4), True, True, True, None, None),
    ("fp32_x_m7", 8, 16, 24, 512, 7, "bfloat16>float32", (256, 4), True, True, True, None, None),
    ("fp32_x_m40", 8, 16, 24, 512, 40, "bfloat16>float32", (256, 4), True, True, True, None, None),
    ("n816_k_odd_groups_m16", 8, 16, 17, 208, 16, "bfloat16", None, True, True, True, None, None),
    # large-M path: decode into a transient dense scratch + matmul (kernels/scratch.py)
    ("scratch_m40_bf16_all", 8, 16, 37, 512, 40, "bfloat16", (256, 4), True, True, True, None, SCRATCH),
    ("scratch_m3_fp16_nibble", 8, 16, 24, 256, 3, "float16", (128, 2), True, False, True, "nibble32", SCRATCH),
    ("scratch_p24_m33_out", 2, 4, 12, 96, 33, "bfloat16", (32, 3), True, True, False, None, SCRATCH),
    ("scratch_p1632_m20_mixed", 16, 32, 9, 128, 20, "bfloat16>float16", (64, 5), True, True, True, None, SCRATCH),
    ("scratch_chunked_m40", 8, 16, 37, 512, 40, "bfloat16", (256, 4), True, True, True, None,
     {"kernel": "scratch", "chunk_mb": 16 * 512 * 2 / 2**20}),   # 16-row chunks: 16 + 16 + 5 rows
    ("scratch_ob192_m64", 8, 16, 20, 576, 64, "bfloat16", (192, 3), True, True, False, None, SCRATCH),
    ("scratch_k208_tail_m32", 8, 16, 33, 208, 32, "float16", None, True, False, True, None, SCRATCH),
    ("scratch_byte816_m40", 8, 16, 12, 256, 40, "bfloat16", (64, 3), True, True, False, "byte", SCRATCH),
    # two buffers, chunks 16 + 16 + 5 rows (on the GPU: decodes on a side stream overlapping the GEMMs)
    ("scratch_overlap3_m40", 8, 16, 37, 512, 40, "bfloat16", (256, 4), True, True, True, None,
     {"kernel": "scratch", "overlap": 3}),
    ("scratch_overlap2_m130_fp16", 8, 16, 48, 256, 130, "float16", (128, 2), True, False, False, None,
     {"kernel": "scratch", "overlap": 2}),
    # more than 16 outlier slots per block: the outlier loop is not unrolled (the GPU fuzz's k = 5147 timed out)
    ("scratch_many_outliers_m20", 8, 16, 9, 256, 20, "bfloat16", (128, 40), True, False, True, None, SCRATCH),
    ("default_m300_bf16_all", 8, 16, 24, 512, 300, "bfloat16", (256, 4), True, True, True, None, None),
]


GLUON = {"kernel": "gluon"}
# The Gluon 8:16 fragment kernel (GPU only: Gluon does not run under TRITON_INTERPRET; its decode program and load
# offsets are checked on the CPU by tests/test_fragment.py). Forced, so every M runs it (the dispatcher uses it up to
# M = 32); K tails (576, 160: not multiples of the 128-column step), 192-column outlier blocks, both dtypes.
GLUON_CASES = [
    ("gluon_m1_bf16_out_scale", 8, 16, 256, 4096, 1, "bfloat16", (256, 4), True, False, False, None, GLUON),
    ("gluon_m2_fp16_bare_k576", 8, 16, 48, 576, 2, "float16", None, False, False, False, None, GLUON),
    ("gluon_m3_bf16_all_ob192", 8, 16, 96, 1536, 3, "bfloat16", (192, 3), True, True, True, None, GLUON),
    ("gluon_m8_fp16_out", 8, 16, 64, 1024, 8, "float16", (128, 2), False, False, True, None, GLUON),
    ("gluon_m16_bf16_all", 8, 16, 1024, 4096, 16, "bfloat16", (256, 4), True, True, True, None, GLUON),
    ("gluon_m17_bf16_out", 8, 16, 160, 2048, 17, "bfloat16", (256, 4), True, False, False, None, GLUON),
    ("gluon_m33_fp16_all_k576", 8, 16, 96, 576, 33, "float16", (192, 3), True, True, True, None, GLUON),
    ("gluon_m64_bf16_scale", 8, 16, 512, 1024, 64, "bfloat16", None, True, False, False, None, GLUON),
    ("gluon_m100_bf16_all", 8, 16, 64, 512, 100, "bfloat16", (256, 4), True, True, True, None, GLUON),
    ("gluon_m256_fp16_out", 8, 16, 128, 256, 256, "float16", (64, 1), False, False, False, None, GLUON),
    ("gluon_m300_bf16_all_k160", 8, 16, 48, 160, 300, "bfloat16", (32, 2), True, True, True, None, GLUON),
    ("gluon_m1024_bf16_out", 8, 16, 64, 512, 1024, "bfloat16", (256, 4), True, False, False, None, GLUON),
    ("gluon_m5_bf16_out_pre", 8, 16, 256, 4096, 5, "bfloat16", (256, 4), True, False, False, None,
     dict(GLUON, pre=True)),
    ("gluon_m16_fp16_all_pre_k576", 8, 16, 96, 576, 16, "float16", (192, 3), True, True, True, None,
     dict(GLUON, pre=True)),
    ("gluon_m40_bf16_all_pre_ob64", 8, 16, 128, 1024, 40, "bfloat16", (64, 1), True, True, True, None,
     dict(GLUON, pre=True)),
    # the outlier stage on fewer tokens than the block (ot < BM: widened in the epilogue), after the loop
    ("gluon_m1_fp16_all_ot1_bm16", 8, 16, 256, 4096, 1, "float16", (256, 4), True, True, True, None,
     dict(GLUON, BM=16, ot=1)),
    ("gluon_m2_bf16_out_ot2_bm32", 8, 16, 256, 4096, 2, "bfloat16", (256, 4), True, False, False, None,
     dict(GLUON, BM=32, WN=2, WK=4, ot=2)),
    # x loads without row masks at M not a multiple of BM (xc: rows past M re-read row M - 1)
    ("gluon_m3_bf16_all_xc", 8, 16, 512, 4096, 3, "bfloat16", (256, 4), True, True, True, None, dict(GLUON, xc=True)),
    ("gluon_m13_fp16_out_xc_ktail", 8, 16, 128, 1568, 13, "float16", (224, 2), True, False, False, None,
     dict(GLUON, xc=True)),
]
# The wgmma kernel (sm_90), forced: every M class incl. several token blocks, K tails, split-K (auto and forced,
# counters reused across cases), 4 and 8 warps, both dtypes.
WGMMA = {"kernel": "wgmma"}
WGMMA_CASES = [
    ("wgmma_m1_bf16_out_scale", 8, 16, 256, 4096, 1, "bfloat16", (256, 4), True, False, False, None, WGMMA),
    ("wgmma_m17_bf16_all", 8, 16, 1024, 4096, 17, "bfloat16", (256, 4), True, True, True, None, WGMMA),
    ("wgmma_m33_fp16_all_k576", 8, 16, 192, 576, 33, "float16", (192, 3), True, True, True, None, WGMMA),
    ("wgmma_m64_bf16_scale_split8", 8, 16, 512, 4096, 64, "bfloat16", None, True, False, False, None,
     dict(WGMMA, SPLIT=8)),
    ("wgmma_m100_bf16_all_nw8", 8, 16, 256, 2048, 100, "bfloat16", (256, 4), True, True, True, None,
     dict(WGMMA, NW=8, SPLIT=3)),
    ("wgmma_m256_fp16_out", 8, 16, 128, 1024, 256, "float16", (64, 1), False, False, False, None, WGMMA),
    ("wgmma_m300_bf16_all_k160", 8, 16, 64, 160, 300, "bfloat16", (32, 2), True, True, True, None, WGMMA),
    ("wgmma_m1024_bf16_out_bm32", 8, 16, 64, 512, 1024, "bfloat16", (256, 4), True, False, False, None,
     dict(WGMMA, BM=32)),
    ("wgmma_m45_bf16_out_pre", 8, 16, 256, 4096, 45, "bfloat16", (256, 4), True, True, False, None,
     dict(WGMMA, PRE=True)),
    ("wgmma_m130_fp16_all_pre_k576", 8, 16, 192, 576, 130, "float16", (192, 3), True, True, True, None,
     dict(WGMMA, PRE=True, SPLIT=2)),
    ("wgmma_m64_bf16_all_pre_nosplit", 8, 16, 512, 2048, 64, "bfloat16", (256, 4), True, True, True, None,
     dict(WGMMA, PRE=True, SPLIT=1)),
    ("wgmma_m45_bf16_all_xc", 8, 16, 256, 2048, 45, "bfloat16", (256, 4), True, True, True, None,
     dict(WGMMA, xc=True)),
    # every operand through the TMA ring (x permuted by the launcher): M classes, 4 / 8 warps, split-K, stages, fp16,
    # in-kernel outliers and PRE, a K that is not a multiple of 128 (falls back to the register-staged loop)
    ("wgmma_m17_bf16_all_tma", 8, 16, 1024, 4096, 17, "bfloat16", (256, 4), True, True, True, None,
     dict(WGMMA, tma=True)),
    ("wgmma_m100_bf16_all_nw8_tma", 8, 16, 256, 2048, 100, "bfloat16", (256, 4), True, True, True, None,
     dict(WGMMA, NW=8, SPLIT=3, tma=True)),
    ("wgmma_m256_fp16_out_tma_stages2", 8, 16, 128, 1024, 256, "float16", (64, 1), False, False, False, None,
     dict(WGMMA, tma=True, stages=2)),
    ("wgmma_m64_bf16_scale_split8_tma", 8, 16, 512, 4096, 64, "bfloat16", None, True, False, False, None,
     dict(WGMMA, SPLIT=8, tma=True)),
    ("wgmma_m130_fp16_all_pre_tma", 8, 16, 192, 1536, 130, "float16", (192, 3), True, True, True, None,
     dict(WGMMA, PRE=True, SPLIT=2, tma=True)),
    ("wgmma_m33_fp16_all_k576_tma_fallback", 8, 16, 192, 576, 33, "float16", (192, 3), True, True, True, None,
     dict(WGMMA, tma=True)),
    # decoder warpgroups feeding an MMA warpgroup through shared memory (dp): BM 64-256, 1 / 2 decoders, split-K,
    # several token blocks, outliers (their pass: PRE, the default above M = 32), scale / shift / bias, fp16
    ("wgmma_m256_bf16_all_dp1", 8, 16, 192, 2048, 256, "bfloat16", (256, 4), True, True, True, None,
     dict(WGMMA, BM=256, tma=True, dp=1)),
    ("wgmma_m300_fp16_out_pre_dp2_split2", 8, 16, 128, 1536, 300, "float16", (256, 4), True, False, False, None,
     dict(WGMMA, BM=128, tma=True, dp=2, PRE=True, SPLIT=2)),
    ("wgmma_m64_bf16_scale_dp1", 8, 16, 256, 1024, 64, "bfloat16", None, True, False, True, None,
     dict(WGMMA, tma=True, dp=1)),
    ("wgmma_m1024_bf16_bare_dp2", 8, 16, 64, 512, 1024, "bfloat16", None, False, False, False, None,
     dict(WGMMA, BM=128, tma=True, dp=2)),
    ("wgmma_m520_fp16_scale_bias_dp1_bm256", 8, 16, 128, 1024, 520, "float16", None, True, False, True, None,
     dict(WGMMA, BM=256, tma=True, dp=1)),
]


def run_case(case, device: str) -> dict:
    import torch

    from nm16_dev.kernel_testing import layer_args, random_layer, reference_linear
    from vllm_nm16.kernels import nm16_linear, repack

    name, n, m, N, K, M, dtype, outl, scale, shift, bias, mode, cfg = case
    wdtype, _, xdtype = dtype.partition(">")  # "bfloat16>float16": bf16 checkpoint served with fp16 activations
    dt = getattr(torch, wdtype)
    xdt = getattr(torch, xdtype or wdtype)
    g = torch.Generator(device="cpu").manual_seed(abs(hash(name)) % 2**31)  # fresh data per case and run
    B, k = outl if outl else (None, 0)
    t = random_layer(N, K, n=n, m=m, outlier_block=B, outliers_per_block=k, scale=scale, shift=shift, dtype=dt,
                     generator=g)
    t = {key: val.to(device) for key, val in t.items()}
    v, mk, ov, oi, sc, sh = layer_args(t)
    wv, wm, ov2, oi2 = repack(v, mk, ov, oi, n=n, m=m, outlier_block=B, outliers_per_block=k, pos_mode=mode)
    x = torch.randn(M, K, generator=g).to(xdt).to(device)
    b = torch.randn(N, generator=g).to(xdt).to(device) if bias else None
    y = torch.full((M, N), float("nan"), dtype=xdt, device=device)  # poisoned: every element must be written
    nm16_linear(x, wv, wm, ov2, oi2, sc, sh, b, n=n, m=m, outlier_block=B, outliers_per_block=k, in_features=K,
                out_features=N, config=cfg, out=y)
    ref = reference_linear(x.cpu(), v.cpu(), mk.cpu(), ov.cpu() if ov is not None else None,
                           oi.cpu() if oi is not None else None, sc.cpu() if sc is not None else None,
                           sh.cpu() if sh is not None else None, b.cpu() if b is not None else None,
                           n=n, m=m, outlier_block=B, outliers_per_block=k)
    y = y.cpu().double()
    finite = bool(torch.isfinite(y).all())
    err = float((y - ref).norm() / ref.norm()) if finite else float("nan")
    if cfg and cfg["kernel"] == "scratch":
        # The scratch itself, into a NaN-poisoned buffer: every element written, equal to the effective weight
        # scale * W_nm + W_out (the float64 reference applied to the identity gives its transpose).
        from vllm_nm16.kernels.scratch import unpack_to_dense

        w = torch.full((N, K), float("nan"), dtype=xdt, device=device)
        unpack_to_dense(wv, wm, ov2, oi2, sc, n=n, m=m, outlier_block=B, outliers_per_block=k, in_features=K,
                        out_features=N, dtype=xdt, out=w)
        w_ref = reference_linear(torch.eye(K, dtype=torch.float64), v.cpu(), mk.cpu(),
                                 ov.cpu() if ov is not None else None, oi.cpu() if oi is not None else None,
                                 sc.cpu() if sc is not None else None, None, None, n=n, m=m, outlier_block=B,
                                 outliers_per_block=k).T
        w = w.cpu().double()
        finite = finite and bool(torch.isfinite(w).all())
        err = max(err, float((w - w_ref).norm() / w_ref.norm())) if finite else float("nan")
    bound = {torch.bfloat16: REL_ERR_BOUND, torch.float16: REL_ERR_BOUND_FP16}.get(xdt, REL_ERR_BOUND_FP32)
    return {"name": name, "finite": finite, "rel_err": err, "bound": bound}


if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    names = set(sys.argv[2:])
    for case in CASES:
        if names and case[0] not in names:
            continue
        print(json.dumps(run_case(case, device)), flush=True)
