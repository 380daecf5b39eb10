"""Triton kernels for ``y = scale * (x @ W_nm.T) + x @ W_out.T + shift + bias`` on the nm16 layout (see layout.py).

Two kernels, picked by the number of rows M of x (a Python int, so the choice is fixed at trace/capture time); from
M = configs.SCRATCH_MIN_M on, the launcher hands over to scratch.py (decode into a transient dense buffer + cuBLAS):

* ``_nm16_gemv_kernel`` (decode, small M): each program owns BN output rows and walks K one tile of BG groups at a
  time. Per kept value it extracts the 4-bit position, gathers ``x[row, g*M + pos]`` (x is tiny and stays in L1)
  and does one FMA -- no mask expansion, no cross-lane shuffles. The accumulator keeps the tile shape and is reduced
  once at the end, so the K loop is pure loads + FMAs.
* ``_nm16_dot_kernel`` (prefill, larger M): decodes a [BN, BK] tile of W to dense in registers once (compare each
  kept value's position against the 16 columns of its group), then feeds ``tl.dot`` so the tile is reused by all BM
  rows of x on the tensor cores. The dense weight never touches global memory.

Both fuse the structured outliers (k per (row, block of B columns): gather x, FMA -- or, in the dot kernel, add them
into the decoded tile), the per-row scale (N:M part only), shift and bias into the same pass.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vllm_nm16 import envs
from vllm_nm16.kernels.configs import pick_config
from vllm_nm16.kernels.layout import lut_for
from vllm_nm16.kernels.triton_decode import _POS_MODE_OF_DTYPE, _decode_tile_816, _group_words, _positions

def _interpreted() -> bool:
    # Under TRITON_INTERPRET=1 (CPU tests) tl.dot on bf16 operands returns garbage (Triton 3.9): upcast there.
    return envs.TRITON_INTERPRET


@triton.jit
def _gemv_outliers(x_ptr, ov_ptr, oi_ptr, offs_o, offs_n_ld, offs_m_ld, stride_xm, KO, OB: tl.constexpr,
                   OK: tl.constexpr):
    """[BM, BN, BO] products of the outlier entries ``offs_o`` of rows ``offs_n_ld`` with their x columns: k
    outliers per (row, block of OB columns), so entry e of a row sits in block e // OK."""
    o_ok = offs_o < KO
    o_off = offs_n_ld[:, None] * KO + offs_o[None, :]
    ov = tl.load(ov_ptr + o_off, mask=o_ok[None, :], other=0.0).to(tl.float32)
    oi = tl.load(oi_ptr + o_off, mask=o_ok[None, :], other=0).to(tl.int32) & 0xFFFF
    ocol = (offs_o[None, :] // OK) * OB + oi
    xo = tl.load(x_ptr + offs_m_ld[:, None, None] * stride_xm + ocol[None, :, :],
                 mask=o_ok[None, None, :], other=0.0).to(tl.float32)
    return xo * ov[None, :, :]


@triton.jit
def _epilogue(acc, y_ptr, scale_ptr, shift_ptr, bias_ptr, offs_m, offs_n, offs_n_ld, M, N, stride_ym,
              APPLY_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_BIAS: tl.constexpr):
    if APPLY_SCALE:
        acc = acc * tl.load(scale_ptr + offs_n_ld)[None, :]
    if HAS_SHIFT:
        acc = acc + tl.load(shift_ptr + offs_n_ld)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n_ld)[None, :].to(tl.float32)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _gemv_tile(pid_n, pid_m, x_ptr, wv_ptr, wm_ptr, lut_ptr, ov_ptr, oi_ptr, scale_ptr, shift_ptr, bias_ptr, y_ptr,
               M, N, K, stride_xm, stride_ym,
               NK: tl.constexpr, MG: tl.constexpr, POS_MODE: tl.constexpr,
               OB: tl.constexpr, OK: tl.constexpr,
               HAS_OUT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
               HAS_BIAS: tl.constexpr, EVEN_G: tl.constexpr, OUT_IN_LOOP: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr, BO: tl.constexpr):
    """One [BM rows of x] x [BN output rows] tile of the decode kernel, all of K."""
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = pid_m * BM + tl.arange(0, BM)
    # Clamp instead of masking: out-of-range rows re-read a valid row (never stored), so the hot loads carry no mask.
    offs_n_ld = tl.minimum(offs_n, N - 1)
    offs_m_ld = tl.minimum(offs_m, M - 1)
    G = K // MG
    offs_i = tl.arange(0, NK)
    x_rows = x_ptr + offs_m_ld[:, None, None, None] * stride_xm  # [BM, 1, 1, 1]
    w_rows = wv_ptr + offs_n_ld[:, None, None] * (G * NK)       # [BN, 1, 1]

    acc = tl.zeros((BM, BN, BG, NK), dtype=tl.float32)
    if HAS_OUT:
        KO = (K // OB) * OK
        acc_o = tl.zeros((BM, BN, BO), dtype=tl.float32)
    for g0 in range(0, G, BG):
        offs_g = g0 + tl.arange(0, BG)
        if EVEN_G:
            g_ok = offs_g >= 0  # all true, folded away
        else:
            g_ok = offs_g < G
        pos = _positions(wm_ptr, lut_ptr, offs_n_ld, offs_g, g_ok, G, NK, POS_MODE)
        w = tl.load(w_rows + offs_g[None, :, None] * NK + offs_i[None, None, :],
                    mask=g_ok[None, :, None], other=0.0).to(tl.float32)
        if MG == 16:
            col = (offs_g[None, :, None] * 16) | pos             # one LOP3 instead of an add
        else:
            col = offs_g[None, :, None] * MG + pos               # [BN, BG, NK] column of x
        xg = tl.load(x_rows + col[None, :, :, :], mask=g_ok[None, None, :, None], other=0.0).to(tl.float32)
        acc += xg * w[None, :, :, :]
        if HAS_OUT and OUT_IN_LOOP:
            # This K step covers whole outlier blocks: their BO = (BG*MG/OB)*OK outliers ride along, so their
            # loads overlap the main ones instead of forming a serial tail after the loop.
            offs_o = (g0 // (OB // MG)) * OK + tl.arange(0, BO)
            acc_o += _gemv_outliers(x_ptr, ov_ptr, oi_ptr, offs_o, offs_n_ld, offs_m_ld, stride_xm, KO, OB, OK)
    out = tl.sum(tl.sum(acc, axis=3), axis=2)                   # [BM, BN]

    if HAS_OUT:
        if not OUT_IN_LOOP:
            for o0 in range(0, KO, BO):
                offs_o = o0 + tl.arange(0, BO)
                acc_o += _gemv_outliers(x_ptr, ov_ptr, oi_ptr, offs_o, offs_n_ld, offs_m_ld, stride_xm, KO, OB, OK)
        if HAS_SCALE:  # scale multiplies the N:M part only
            out = out * tl.load(scale_ptr + offs_n_ld)[None, :]
        out = out + tl.sum(acc_o, axis=2)
        _epilogue(out, y_ptr, scale_ptr, shift_ptr, bias_ptr, offs_m, offs_n, offs_n_ld, M, N, stride_ym,
                  False, HAS_SHIFT, HAS_BIAS)
    else:
        _epilogue(out, y_ptr, scale_ptr, shift_ptr, bias_ptr, offs_m, offs_n, offs_n_ld, M, N, stride_ym,
                  HAS_SCALE, HAS_SHIFT, HAS_BIAS)


@triton.jit
def _nm16_gemv_kernel(x_ptr, wv_ptr, wm_ptr, lut_ptr, ov_ptr, oi_ptr, scale_ptr, shift_ptr, bias_ptr, y_ptr,
                      M, N, K, stride_xm, stride_ym,
                      NK: tl.constexpr, MG: tl.constexpr, POS_MODE: tl.constexpr,
                      OB: tl.constexpr, OK: tl.constexpr,
                      HAS_OUT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                      HAS_BIAS: tl.constexpr, EVEN_G: tl.constexpr, OUT_IN_LOOP: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr, BO: tl.constexpr,
                      PERSISTENT: tl.constexpr):
    # PERSISTENT: a grid of a few programs per SM walks the row tiles (fewer, longer-lived programs: no tail of
    # thousands of tiny CTAs); otherwise one program per tile (a walk of one step).
    first = tl.program_id(0)
    if PERSISTENT:
        end = tl.cdiv(N, BN)
        stride = tl.num_programs(0)
    else:
        end = first + 1
        stride = 1
    for pid_n in range(first, end, stride):
        _gemv_tile(pid_n, tl.program_id(1), x_ptr, wv_ptr, wm_ptr, lut_ptr, ov_ptr, oi_ptr, scale_ptr, shift_ptr,
                   bias_ptr, y_ptr, M, N, K, stride_xm, stride_ym, NK, MG, POS_MODE, OB, OK, HAS_OUT, HAS_SCALE,
                   HAS_SHIFT, HAS_BIAS, EVEN_G, OUT_IN_LOOP, BM, BN, BG, BO)


@triton.jit
def _nm16_dot_kernel(x_ptr, wv_ptr, wm_ptr, lut_ptr, ov_ptr, oi_ptr, scale_ptr, shift_ptr, bias_ptr, y_ptr,
                     M, N, K, stride_xm, stride_ym,
                     NK: tl.constexpr, MG: tl.constexpr, POS_MODE: tl.constexpr,
                     OB: tl.constexpr, OK: tl.constexpr,
                     HAS_OUT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                     HAS_BIAS: tl.constexpr, EVEN_G: tl.constexpr, DOT_FP32: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr, BO: tl.constexpr,
                     GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, G_PER_SPLIT: tl.constexpr, ws_ptr,
                     OUT_MERGE: tl.constexpr, OKP: tl.constexpr, xt_ptr, OUT_XT: tl.constexpr):
    # Computes the transposed tile acc[BN, BM] = W_tile @ x_tile.T: the decoded weight is the MMA's A operand
    # (the side that may come from registers), x the B operand, and a small M becomes the MMA's narrow N side
    # (n = 16 is a legal wgmma/mma shape) instead of padding it up to 64 rows.
    BK: tl.constexpr = BG * MG
    # Grouped launch order: GROUP_M consecutive programs share one W tile column, so it is decoded from L2-hot bytes.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsize
    pid_n = (pid % width) // gsize

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m_ld = tl.minimum(offs_m, M - 1)
    offs_n_ld = tl.minimum(offs_n, N - 1)
    G = K // MG
    offs_i = tl.arange(0, NK)
    offs_j = tl.arange(0, MG)
    offs_k = tl.arange(0, BK)
    w_rows = wv_ptr + offs_n_ld[:, None, None] * (G * NK)
    # Split-K (small M on narrow layers): program_id(1) takes groups [g_start, g_end); G_PER_SPLIT is a multiple
    # of BG and of the outlier block, so each split also owns whole outlier blocks.
    ks = tl.program_id(1)
    g_start = ks * G_PER_SPLIT
    g_end = tl.minimum(G, g_start + G_PER_SPLIT)

    if HAS_OUT:
        KO = (K // OB) * OK
    if HAS_OUT and OUT_MERGE:
        offs_t = tl.arange(0, OKP)
        t_ok = offs_t < OK
        if HAS_SCALE:
            scale_n = tl.load(scale_ptr + offs_n_ld)

    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for g0 in range(g_start, g_end, BG):
        offs_g = g0 + tl.arange(0, BG)
        if EVEN_G:
            g_ok = offs_g >= 0
        else:
            g_ok = offs_g < g_end
        v = tl.load(w_rows + offs_g[None, :, None] * NK + offs_i[None, None, :], mask=g_ok[None, :, None],
                    other=0.0)
        if NK == 8 and MG == 16 and POS_MODE != 2:
            word = _group_words(wm_ptr, lut_ptr, offs_n_ld, offs_g, g_ok, G, POS_MODE)
            dense = _decode_tile_816(word, v, BN, BG)
        else:
            # Generic N:M: dense[n, g, j] = the kept value whose position is j (at most one matches), else 0.
            pos = _positions(wm_ptr, lut_ptr, offs_n_ld, offs_g, g_ok, G, NK, POS_MODE)
            hit = pos[:, :, :, None] == offs_j[None, None, None, :]
            dense = tl.sum(tl.where(hit, v.to(tl.float32)[:, :, :, None], 0.0), axis=2).to(v.dtype)
            dense = tl.reshape(dense, (BN, BK))
        if HAS_OUT and OUT_MERGE:
            # Large BM: fold this K step's outliers into the decoded tile (cost independent of BM) instead of
            # gathering x per outlier and row after the loop (cost proportional to BM). The tile lies inside one
            # outlier block (launcher: OB % BK == 0). Scale multiplies the N:M part only, so it goes in here too.
            tile = dense.to(tl.float32)
            if HAS_SCALE:
                tile = tile * scale_n[:, None]
            c0 = g0 * MG
            blk = c0 // OB
            o_off = offs_n_ld[:, None] * KO + blk * OK + offs_t[None, :]
            ov = tl.load(ov_ptr + o_off, mask=t_ok[None, :], other=0.0).to(tl.float32)
            oi = tl.load(oi_ptr + o_off, mask=t_ok[None, :], other=0).to(tl.int32) & 0xFFFF
            local = blk * OB + oi - c0                                          # [BN, OKP] column in the tile
            hit = (local[:, :, None] == offs_k[None, None, :]) & t_ok[None, :, None]
            tile += tl.sum(tl.where(hit, ov[:, :, None], 0.0), axis=1)
            dense = tile.to(v.dtype)
        cols = g0 * MG + offs_k
        xt = tl.load(x_ptr + offs_m_ld[:, None] * stride_xm + cols[None, :], mask=(cols < K)[None, :], other=0.0)
        if DOT_FP32:
            acc += tl.dot(dense.to(tl.float32), tl.trans(xt.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(dense.to(xt.dtype), tl.trans(xt))  # no-op unless the checkpoint dtype != x dtype

    if HAS_SCALE and not (HAS_OUT and OUT_MERGE):  # N:M part only, so before the outliers are added
        acc = acc * tl.load(scale_ptr + offs_n_ld)[:, None]
    if HAS_OUT and not OUT_MERGE:
        # Outliers after the main loop: gather x at each outlier's column for all BM rows (they are 1/64 of the
        # kept values at the default budget, so CUDA-core FMAs suffice for small BM).
        o_end = (g_end * MG // OB) * OK
        for o0 in range((g_start * MG // OB) * OK, o_end, BO):
            offs_o = o0 + tl.arange(0, BO)
            o_ok = offs_o < o_end
            o_off = offs_n_ld[:, None] * KO + offs_o[None, :]
            ov = tl.load(ov_ptr + o_off, mask=o_ok[None, :], other=0.0).to(tl.float32)
            oi = tl.load(oi_ptr + o_off, mask=o_ok[None, :], other=0).to(tl.int32) & 0xFFFF
            ocol = (offs_o[None, :] // OK) * OB + oi                              # [BN, BO]
            if OUT_XT:
                # x transposed ([K, M], made by the launcher): the BM values of one column are contiguous, so
                # the gather is a coalesced row read instead of BM loads K elements apart.
                xo = tl.load(xt_ptr + ocol[:, :, None] * M + offs_m_ld[None, None, :],
                             mask=o_ok[None, :, None], other=0.0).to(tl.float32)  # [BN, BO, BM]
            else:
                xo = tl.load(x_ptr + offs_m_ld[None, None, :] * stride_xm + ocol[:, :, None],
                             mask=o_ok[None, :, None], other=0.0).to(tl.float32)  # [BN, BO, BM]
            acc += tl.sum(xo * ov[:, :, None], axis=1)
    if SPLIT_K == 1:
        _epilogue(tl.trans(acc), y_ptr, scale_ptr, shift_ptr, bias_ptr, offs_m, offs_n, offs_n_ld, M, N,
                  stride_ym, False, HAS_SHIFT, HAS_BIAS)
    else:
        # fp32 partial sums to ws[ks]; _split_k_reduce adds them in a fixed order (deterministic, no atomics).
        ws_ptrs = ws_ptr + ks * M * N + offs_m[None, :] * N + offs_n[:, None]
        tl.store(ws_ptrs, acc, mask=(offs_m[None, :] < M) & (offs_n[:, None] < N))


@triton.jit
def _split_k_reduce(ws_ptr, shift_ptr, bias_ptr, y_ptr, M, N, stride_ym, SPLIT_K: tl.constexpr,
                    HAS_SHIFT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    acc = tl.load(ws_ptr + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(ws_ptr + s * M * N + offs, mask=ok, other=0.0)
    n = offs % N
    if HAS_SHIFT:
        acc += tl.load(shift_ptr + n, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + (offs // N) * stride_ym + n, acc.to(y_ptr.dtype.element_ty), mask=ok)


_SMS: dict = {}


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def nm16_linear(x2d, values, positions, outlier_values, outlier_index, scale, shift, bias, *, n, m, outlier_block,
                outliers_per_block, in_features, out_features, config=None, out=None):
    """See vllm_nm16.kernels.nm16_linear. ``config`` (a dict like configs.pick_config's) overrides the table."""
    M, K = x2d.shape
    N = out_features
    if K != in_features:
        raise ValueError(f"nm16_linear: x has {K} columns, the layer has in_features={in_features}")
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    pos_mode = _POS_MODE_OF_DTYPE[positions.dtype]
    has_out = bool(outliers_per_block)
    y = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device) if out is None else out
    if M == 0:
        return y
    lut = lut_for(x2d.device) if pos_mode == 0 else positions
    cfg = config or pick_config(N, K, M, n=n, m=m, outlier_block=outlier_block if has_out else None)
    dummy = y
    G = K // m
    common = dict(NK=n, MG=m, POS_MODE=pos_mode, OB=outlier_block if has_out else 1,
                  OK=outliers_per_block if has_out else 1, HAS_OUT=has_out, HAS_SCALE=scale is not None,
                  HAS_SHIFT=shift is not None, HAS_BIAS=bias is not None)
    args = (x2d, values, positions, lut, outlier_values if has_out else dummy, outlier_index if has_out else dummy,
            scale if scale is not None else dummy, shift if shift is not None else dummy,
            bias if bias is not None else dummy, y, M, N, K, x2d.stride(0), y.stride(0))
    if cfg["kernel"] == "dot":
        BM, BN, BG = cfg["BM"], cfg["BN"], cfg["BG"]
        BO = max(1, min(32, 4096 // (BN * BM)))
        split = max(1, cfg.get("SPLIT_K", 1))
        # Each split owns whole K steps and whole outlier blocks.
        unit = BG if not has_out else math.lcm(BG, outlier_block // m)
        g_per = triton.cdiv(triton.cdiv(G, split), unit) * unit
        split = triton.cdiv(G, g_per)
        ws = torch.empty((split, M, N), dtype=torch.float32, device=x2d.device) if split > 1 else y
        grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN), split)
        # Outliers: folding them into the decoded tile (out_merge) measured 4-6x slower than the post-loop gather
        # on the H100 (docs/KERNELS.md), so it is off unless a config asks for it; for BM >= 32 the gather reads
        # a transposed copy of x (one extra small copy kernel, coalesced gathers).
        out_merge = has_out and outlier_block % (BG * m) == 0 and cfg.get("out_merge", False)
        out_xt = has_out and not out_merge and BM >= 32
        xt = x2d.t().contiguous() if out_xt else x2d
        # fp32 activations (vLLM --dtype float32) get an exact fp32 dot, not TF32; the interpreter needs fp32 too.
        dot_fp32 = _interpreted() or x2d.dtype == torch.float32
        _nm16_dot_kernel[grid](*args, **common, EVEN_G=G % BG == 0 and G % g_per == 0, DOT_FP32=dot_fp32, BM=BM,
                               BN=BN, BG=BG, BO=BO, GROUP_M=cfg.get("GROUP_M", 8), SPLIT_K=split, G_PER_SPLIT=g_per,
                               ws_ptr=ws, OUT_MERGE=out_merge, OKP=_next_pow2(common["OK"]), xt_ptr=xt,
                               OUT_XT=out_xt, num_warps=cfg.get("num_warps", 4),
                               num_stages=cfg.get("num_stages", 3))
        if split > 1:
            block = 1024
            _split_k_reduce[(triton.cdiv(M * N, block),)](
                ws, shift if shift is not None else dummy, bias if bias is not None else dummy, y, M, N,
                y.stride(0), SPLIT_K=split, HAS_SHIFT=shift is not None, HAS_BIAS=bias is not None, BLOCK=block,
                num_warps=4)
    else:
        BM, BN, BG = cfg["BM"], cfg["BN"], cfg["BG"]
        tiles = triton.cdiv(N, BN)
        per_sm = cfg.get("persistent", 0)  # programs per SM, 0 = one program per tile
        if per_sm:
            tiles = min(tiles, per_sm * _num_sms(x2d.device))
        grid = (tiles, triton.cdiv(M, BM))
        step = BG * m
        out_in_loop = has_out and step % outlier_block == 0 and cfg.get("out_in_loop", True)
        BO = _next_pow2(step // outlier_block * outliers_per_block) if out_in_loop else cfg.get("BO", 16)
        _nm16_gemv_kernel[grid](*args, **common, EVEN_G=G % BG == 0, OUT_IN_LOOP=out_in_loop, BM=BM, BN=BN, BG=BG,
                                BO=BO, PERSISTENT=bool(per_sm), num_warps=cfg.get("num_warps", 4),
                                num_stages=cfg.get("num_stages", 2))
    return y
