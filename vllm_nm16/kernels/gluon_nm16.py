"""Gluon kernel for 8:16 at small M: decode straight into ``mma.m16n8k16`` A fragments (index math: fragment.py).

One CTA owns ``16 * WN`` output rows (WN warps along N, 16 rows each, sharing x through L1) and one block of BM
tokens (8, 16 or 32; grid dim 1 walks larger M); its ``WK`` warps along K split the K steps (warp w takes steps w,
w + WK, ...) and are summed once at the end in shared memory: no workspace, no second launch. Per K step (128
columns) a lane loads, straight from the on-disk tensors, 2 x 16 B of kept values per row (groups 2t and 2t+1 of
rows g and g+8), one int32 holding their two 16-bit masks, and 64 contiguous bytes of each of its token rows of x;
runs the PTX stream decode (fragment.decode_asm); and issues the mma -- the decoded words are the A registers (every
layout conversion is asserted trivial: K is permuted inside each 64-column tile in registers, identically for W and
x). The next step's loads are issued before the current step's decode (one-step register prefetch, unrolled by two).

Outliers (k per row and block of B columns) are exact, in a second fp32 accumulator on the CUDA cores: a stream
inside the main loop for BM = 8 (offsets one trip ahead, x gathered at a trip's start, used at its end), a pass after
it for larger BM. The epilogue computes ``y = scale * acc + acc_outliers + shift + bias``.

The batched (3-D) mma puts the K-split warps on the leading dimension: tensors are ``[WK, 16 * WN, ...]`` and slice
w is warp w's share of K. Tokens are the mma N dimension. Launch shapes by M class: :func:`pick_config`.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from vllm_nm16.kernels import fragment as fr
from vllm_nm16.kernels.outliers import outlier_product

MAX_M = 32


def _lg(v: int) -> int:
    return v.bit_length() - 1


def outlier_lanes(BM: int) -> int:
    """Lanes along the outlier slots of a chunk (the rest of the warp along rows; config key ``olanes``). 4 for every
    BM: fewer (smaller chunks, fewer registers at BM >= 16) measured slower on the H200 -- more chunks after the loop,
    each a dependent pair of loads (gate_up M = 16: 141.6 vs 102.8 us). (At BM = 16 with WK = 8, 2 lanes take the
    kernel from 159 to 126 registers -- two CTAs per SM instead of one -- and measured 1.05-1.21x slower at M = 16,
    raw/h200/olanes_variants.json.)"""
    return 4


def make_layouts(WK: int, WN: int, BM: int, olanes: int | None = None, OT: int | None = None):
    """The distributed layouts: warps [WK along K, WN along N], 16 rows per WN-warp, BM tokens, 2 tiles per step;
    ``olanes`` lanes along the outlier slots (default :func:`outlier_lanes`), ``OT`` tokens in the outlier stage
    (default BM; see :func:`outlier_tokens`)."""
    olanes = olanes or outlier_lanes(BM)
    OT = OT or BM
    R = 16 * WN
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WK, WN, 1], instr_shape=[1, 16, 8])
    a_l = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    warp_k = [[1 << i, 0, 0, 0, 0] for i in range(_lg(WK))]
    # lane (g, t): t = lane % 4 owns groups 2t, 2t+1 of the step, g = lane // 4 rows g and g + 8 (values) / token
    # rows g + 8i (x)
    lane5 = [[0, 0, 0, 1, 0], [0, 0, 0, 2, 0], [0, 1, 0, 0, 0], [0, 2, 0, 0, 0], [0, 4, 0, 0, 0]]
    # values [WK, R rows, 2 tiles, 4 lanes t, 4 words]: registers = 4 words, row + 8, tile
    # (warp id bits: the WN ones first, as in the mma layout's warp order)
    vl = gl.DistributedLinearLayout(reg_bases=[[0, 0, 0, 0, 1], [0, 0, 0, 0, 2], [0, 8, 0, 0, 0], [0, 0, 1, 0, 0]],
                                    lane_bases=lane5, warp_bases=[[0, 16 << i, 0, 0, 0] for i in range(_lg(WN))] + warp_k,
                                    block_bases=[], shape=[WK, R, 2, 4, 4])
    # one value word / mask per group: [WK, R, 2, 4] (vl without the word bits)
    gl4 = gl.DistributedLinearLayout(reg_bases=[[0, 8, 0, 0], [0, 0, 1, 0]], lane_bases=[b[:4] for b in lane5],
                                     warp_bases=[b[:4] for b in vl.warp_bases], block_bases=[], shape=[WK, R, 2, 4])
    # x [WK, BM tokens, 2 tiles, 4 lanes t, 8 words (16 columns)]; the WN warps of a K slice read the same x (L1)
    xreg = [[0, 0, 0, 0, 1], [0, 0, 0, 0, 2], [0, 0, 0, 0, 4]] + [[0, 8 << i, 0, 0, 0] for i in range(_lg(BM // 8))] \
        + [[0, 0, 1, 0, 0]]
    xl = gl.DistributedLinearLayout(reg_bases=xreg, lane_bases=lane5,
                                    warp_bases=[[0, 0, 0, 0, 0]] * _lg(WN) + warp_k, block_bases=[],
                                    shape=[WK, BM, 2, 4, 8])
    # outliers [R rows, OC slots, OT tokens]: tokens in registers; OC = olanes * WK slots per chunk (the gathered x
    # and the accumulator hold OC * OT / (2 * WK) values per thread)
    ol = gl.BlockedLayout(size_per_thread=[1, 1, OT], threads_per_warp=[32 // olanes, olanes, 1],
                          warps_per_cta=[WN, WK, 1], order=[2, 1, 0])
    return mma, a_l, b_l, vl, gl4, xl, ol


def outlier_tokens(M: int, BM: int) -> int:
    """Tokens the outlier stage computes (config key ``ot``): M rounded up to a power of two, at most BM. The mma
    needs BM >= 8 token columns, but an outlier's gathers and FMAs are per token: at M = 1 the other 7 were wasted
    work and registers."""
    return BM if M >= BM else min(BM, 1 << max(0, (M - 1).bit_length()))


@gluon.jit
def _widen(so, R: gl.constexpr, T: gl.constexpr):
    """[R, T] -> [R, 2T]: token j + T repeats token j (the epilogue stores tokens < M <= T only)."""
    return gl.reshape(gl.permute(gl.join(so, so), [0, 2, 1]), [R, 2 * T])


@gluon.jit
def _ar(n: gl.constexpr, dim: gl.constexpr, L: gl.constexpr):
    """arange(n) along ``dim`` of the rank-5 layout ``L``, expanded to rank 5."""
    if dim == 0:
        r = gl.arange(0, n, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, L)))))
        return r[:, None, None, None, None]
    elif dim == 1:
        r = gl.arange(0, n, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, L)))))
        return r[None, :, None, None, None]
    elif dim == 2:
        r = gl.arange(0, n, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, gl.SliceLayout(4, L)))))
        return r[None, None, :, None, None]
    elif dim == 3:
        r = gl.arange(0, n, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(4, L)))))
        return r[None, None, None, :, None]
    else:
        r = gl.arange(0, n, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L)))))
        return r[None, None, None, None, :]


@gluon.jit
def _load_step(wv_ptr, wm_ptr, xw_ptr, v_off, m_off, x_off, col_v, col_m, col_x, x_row_ok, i, K,
               WK: gl.constexpr, EVEN_K: gl.constexpr, EVEN_X: gl.constexpr):
    """The loads of this warp's K step ``i * WK + w`` (``col_*``: first column of each loaded element at i = 0)."""
    c0 = i * (WK * 128)
    if EVEN_K:
        v = gl.load(wv_ptr + (v_off + i * (32 * WK)))
        mk = gl.load(wm_ptr + (m_off + i * (4 * WK)))
    else:
        v = gl.load(wv_ptr + (v_off + i * (32 * WK)), mask=(col_v + c0) < K, other=0)
        mk = gl.load(wm_ptr + (m_off + i * (4 * WK)), mask=(col_m + c0) < K, other=0)
    if EVEN_X:
        xx = gl.load(xw_ptr + (x_off + i * (64 * WK)))
    else:
        xx = gl.load(xw_ptr + (x_off + i * (64 * WK)), mask=x_row_ok & ((col_x + c0) < K), other=0)
    return v, mk, xx


@gluon.jit
def _l2_prefetch(wv_ptr, pf_off, step, WK: gl.constexpr):
    """Ask L2 for this warp's kept values of its K step ``step`` (each lane one 128-byte line of rows g and g + 8:
    two prefetch instructions per lane, no registers held): a hint, it changes no result."""
    ptrs = wv_ptr + (pf_off + step * (32 * WK))
    gl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _out_load(ov_ptr, oi_ptr, r_o, c_o, c, NO, OC: gl.constexpr):
    """Outlier values and in-block offsets of chunk ``c`` (slots c*OC.. of each of the 16 rows; 0 past NO)."""
    slot = c * OC + c_o
    ok = (slot + r_o * 0) < NO
    return gl.load(ov_ptr + r_o * NO + slot, mask=ok, other=0), gl.load(oi_ptr + r_o * NO + slot, mask=ok, other=0)


@gluon.jit
def _out_gather(x_ptr, oi, r_o, c_o, m_o, c, M, NO, XS: gl.constexpr, OB: gl.constexpr, OK: gl.constexpr,
                OC: gl.constexpr):
    """x at the columns of chunk ``c``'s outliers: [16, OC, BM] (slot o of a row is in block o // OK)."""
    slot = c * OC + c_o
    ok = (slot + r_o * 0) < NO
    col = (slot // OK) * OB + (oi.to(gl.int32) & 0xFFFF)
    return _x_at(x_ptr, col, m_o, ok, M, XS)


@gluon.jit
def _x_at(x_ptr, col, m_o, ok, M, XS: gl.constexpr):
    """x [M, XS] at columns ``col`` [R, OC] for tokens ``m_o`` [1, 1, T], 0 where not ``ok``. (Gathering from a
    zero-padded transpose instead, tokens contiguous, measured slower here on the H200: 8B gate_up M = 8 78.1 vs
    63.6 us, M = 64 (wgmma) 170.7 vs 150.1 us; the transpose serves outliers.py.)"""
    return gl.load(x_ptr + col[:, :, None] + m_o * XS, mask=ok[:, :, None] & (m_o < M), other=0)


@gluon.jit
def _to_half(w, DT: gl.constexpr):
    lo = gl.cast((w & 0xFFFF).to(gl.int16), DT, bitcast=True)
    hi = gl.cast((w >> 16).to(gl.int16), DT, bitcast=True)
    return gl.join(lo, hi)


@gluon.jit
def _mma_step(acc, v, mk, xx, tab_cl, tab_kk, ASM: gl.constexpr, WK: gl.constexpr, R: gl.constexpr,
              BM: gl.constexpr, DT: gl.constexpr, gl4: gl.constexpr, a_l: gl.constexpr, b_l: gl.constexpr):
    """Decode one K step (2 tiles) of this warp's 16 rows into A fragments and multiply with its x columns."""
    v6 = gl.reshape(v, [WK, R, 2, 4, 2, 2])
    va, vb = gl.split(v6)               # va = words (0, 2), vb = words (1, 3)
    v0, v2 = gl.split(va)
    v1, v3 = gl.split(vb)
    # mask word [WK, R, 4] (tiles 0 and 1 in its low and high 16 bits) -> [WK, 16, 2, 4], this tile's bits low
    tile = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, gl4))))[None, None, :, None]
    m4 = gl.convert_layout(gl.expand_dims(mk, 2) >> (tile * 16), v0.type.layout, assert_trivial=True)
    o = gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r", [v0, v1, v2, v3, m4, gl.convert_layout(tab_cl, v0.type.layout, assert_trivial=True),
                                   gl.convert_layout(tab_kk, v0.type.layout, assert_trivial=True)],
                                  dtype=(gl.int32,) * 8, is_pure=True, pack=1)
    r = gl.join(gl.join(gl.join(o[0], o[1]), gl.join(o[2], o[3])), gl.join(gl.join(o[4], o[5]), gl.join(o[6], o[7])))
    d = _to_half(r, DT)                                        # [WK, 16, tile, T, H, S0, S1, E]
    d = gl.permute(d, [0, 1, 2, 6, 5, 4, 3, 7])                # [WK, 16, tile, S1, S0, H, T, E]
    a = gl.convert_layout(gl.reshape(d, [WK, R, 128]), a_l, assert_trivial=True)
    xh = _to_half(xx, DT)                                      # [WK, BM, tile, T, 8 words, E]
    x8 = gl.reshape(xh, [WK, BM, 2, 4, 2, 2, 2, 2])            # word j = 4*s1 + 2*s0 + h -> [.., T, S1, S0, H, E]
    x8 = gl.permute(x8, [0, 1, 2, 4, 5, 6, 3, 7])              # [WK, BM, tile, S1, S0, H, T, E]
    b = gl.convert_layout(gl.permute(gl.reshape(x8, [WK, BM, 128]), [0, 2, 1]), b_l, assert_trivial=True)
    return mma_v2(a, b, acc)


@gluon.jit
def _outliers_post(acc_o, x_ptr, ov_ptr, oi_ptr, r_o, c_o, m_o, c_first, M, NO, XS: gl.constexpr, OB: gl.constexpr,
                   OK: gl.constexpr, OC: gl.constexpr):
    """Outlier chunks c_first.. after the main loop (the next chunk's offsets load while this one's x is gathered)."""
    n_chunks = (NO + OC - 1) // OC
    ov, oi = _out_load(ov_ptr, oi_ptr, r_o, c_o, c_first, NO, OC)
    for c in range(c_first, n_chunks):
        xg = _out_gather(x_ptr, oi, r_o, c_o, m_o, c, M, NO, XS, OB, OK, OC)
        ov_n, oi_n = _out_load(ov_ptr, oi_ptr, r_o, c_o, c + 1, NO, OC)
        acc_o += ov.to(gl.float32)[:, :, None] * xg.to(gl.float32)
        ov = ov_n
        oi = oi_n
    return acc_o


# Arguments (pointers end in _ptr): x and xw (the same activations as bf16/fp16 and as int32 words), wv / wm (kept
# values and their int16 bitmask, as int32 words), tab (the decode's two table words), ov / oi (outlier values and
# in-block offsets), scale / shift / bias, pre (the outlier product of outliers.py, or unused), y. Compile-time
# constants: XS = x's row stride, ASM = the decode's PTX, DT = the activation dtype, WK / WN = warps along K / N,
# BM = tokens per CTA, EVEN_K / EVEN_X = no masks needed on W / on x, HAS_* = which optional parts exist,
# OUT_IN_LOOP = outliers ride along the main loop (else after it), OB = outlier block (columns), OK = outliers per
# row and block, OC = outlier slots per chunk, PF = L2 prefetch distance (0 = off), OT = tokens of the outlier stage,
# XC = token rows past M read row M - 1 (no row masks); mma ... ol = the distributed layouts of make_layouts.
@gluon.jit
def nm16_fragment_kernel(x_ptr, xw_ptr, wv_ptr, wm_ptr, tab_ptr, ov_ptr, oi_ptr, scale_ptr, shift_ptr, bias_ptr,
                         pre_ptr, y_ptr, M, N, K, S, stride_ym, NO, XS: gl.constexpr,
                         ASM: gl.constexpr, DT: gl.constexpr, WK: gl.constexpr, WN: gl.constexpr,
                         BM: gl.constexpr, EVEN_K: gl.constexpr, EVEN_X: gl.constexpr,
                         HAS_OUT: gl.constexpr, OUT_IN_LOOP: gl.constexpr, HAS_PRE: gl.constexpr, OB: gl.constexpr,
                         OK: gl.constexpr, OC: gl.constexpr, HAS_SCALE: gl.constexpr, HAS_SHIFT: gl.constexpr,
                         HAS_BIAS: gl.constexpr, PF: gl.constexpr, OT: gl.constexpr, XC: gl.constexpr,
                         mma: gl.constexpr, a_l: gl.constexpr, b_l: gl.constexpr, vl: gl.constexpr,
                         gl4: gl.constexpr, xl: gl.constexpr, ol: gl.constexpr):
    R: gl.constexpr = 16 * WN
    rb = gl.program_id(0)
    m0 = gl.program_id(1) * BM
    ml: gl.constexpr = gl.SliceLayout(2, gl4)
    # Warp (wk, wn) handles rows 16*wn.. of the CTA's R and K steps wk, wk + WK, ... of 128 columns; lane (g, t)
    # holds groups 2t, 2t+1 of the step (tiles b = 0, 1) for rows g and g + 8, and the same 32 columns of its
    # token rows of x.
    # values as int32 pairs, row-major [N, K/4]: row * K/4 + step * 32 + group * 4 + word
    w_v = _ar(WK, 0, vl)
    row_v = rb * R + _ar(R, 1, vl)
    grp_v = _ar(4, 3, vl) * 2 + _ar(2, 2, vl)
    v_off = row_v * (K // 4) + w_v * 32 + grp_v * 4 + _ar(4, 4, vl)
    col_v = w_v * 128 + grp_v * 16 + row_v * 0
    # masks as int32 (the int16 masks of groups 2t, 2t+1), row-major [N, K/32]: row * K/32 + step * 4 + t
    w_m = gl.arange(0, WK, layout=gl.SliceLayout(1, gl.SliceLayout(2, ml)))[:, None, None]
    row_m = rb * R + gl.arange(0, R, layout=gl.SliceLayout(0, gl.SliceLayout(2, ml)))[None, :, None]
    t_m = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, ml)))[None, None, :]
    m_off = row_m * (K // 32) + w_m * 4 + t_m
    col_m = w_m * 128 + t_m * 32 + row_m * 0
    # L2 prefetch PF steps ahead (PF > 0): the step's 128-byte line of values of rows g and g + 8
    pf_off = row_m * (K // 4) + w_m * 32 + t_m * 8
    # x as int32 words: token m * XS/2 + step * 64 + group * 8 + word
    # XC: token rows past M read row M - 1 (valid memory; their results are never stored), so the loop needs no row
    # masks (EVEN_X) when M is not a multiple of BM (config key xc)
    m_x = m0 + _ar(BM, 1, xl)
    w_x = _ar(WK, 0, xl)
    cw_x = w_x * 64 + (_ar(4, 3, xl) * 2 + _ar(2, 2, xl)) * 8 + _ar(8, 4, xl)
    if XC:
        x_off = gl.minimum(m_x, M - 1) * (XS // 2) + cw_x
    else:
        x_off = m_x * (XS // 2) + cw_x
    col_x = cw_x * 2 + m_x * 0
    x_row_ok = m_x < M
    acc = gl.full([WK, R, BM], 0.0, gl.float32, layout=mma)
    n_iter = (S + WK - 1) // WK
    # The decode's table words, per thread (a thread-varying 0 offset the compiler cannot fold: a uniform load
    # lands in uniform registers, which ptxas then copies into a regular register before every prmt).
    # (from the lane's t alone, so a thread's four copies are one value: one register each, not four)
    t_l = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl4))))[None, None, None, :]
    lane0 = ((t_l + K) >> 30) + gl.zeros([WK, R, 2, 4], gl.int32, layout=gl4)
    tab_cl = gl.load(tab_ptr + lane0)
    tab_kk = gl.load(tab_ptr + 1 + lane0)
    if HAS_OUT:
        # Outliers: k per (row, block of OB columns), chunk c = OC slots of each row. With OUT_IN_LOOP they ride
        # along the main loop as their own stream (offsets one trip ahead, x gathered at the start of a trip and
        # used at its end), so their latency hides behind the decode; chunks the loop does not reach (and all of
        # them otherwise: large BM needs the registers in the loop) run after it.
        r_o = rb * R + gl.arange(0, R, layout=gl.SliceLayout(1, gl.SliceLayout(2, ol)))[:, None]
        c_o = gl.arange(0, OC, layout=gl.SliceLayout(0, gl.SliceLayout(2, ol)))[None, :]
        m_o = m0 + gl.arange(0, OT, layout=gl.SliceLayout(0, gl.SliceLayout(1, ol)))[None, None, :]
        acc_o = gl.full([R, OC, OT], 0.0, gl.float32, layout=ol)
        if OUT_IN_LOOP:
            ov_a, oi_a = _out_load(ov_ptr, oi_ptr, r_o, c_o, 0, NO, OC)
    # One step of register prefetch, unrolled by two so that the two buffers swap roles without register moves.
    va, ma, xa = _load_step(wv_ptr, wm_ptr, xw_ptr, v_off, m_off, x_off, col_v, col_m, col_x, x_row_ok, 0, K,
                            WK, EVEN_K, EVEN_X)
    for i in range(0, n_iter - 1, 2):
        if PF > 0:  # (clamped to the warp's last step; past K when K splits unevenly: a prefetch is only a hint)
            _l2_prefetch(wv_ptr, pf_off, gl.minimum(i + PF, n_iter - 1), WK)
            _l2_prefetch(wv_ptr, pf_off, gl.minimum(i + 1 + PF, n_iter - 1), WK)
        vb, mb, xb = _load_step(wv_ptr, wm_ptr, xw_ptr, v_off, m_off, x_off, col_v, col_m, col_x, x_row_ok, i + 1,
                                K, WK, EVEN_K, EVEN_X)
        if HAS_OUT:
            if OUT_IN_LOOP:
                xg = _out_gather(x_ptr, oi_a, r_o, c_o, m_o, i // 2, M, NO, XS, OB, OK, OC)
                ov_b, oi_b = _out_load(ov_ptr, oi_ptr, r_o, c_o, i // 2 + 1, NO, OC)
        acc = _mma_step(acc, va, ma, xa, tab_cl, tab_kk, ASM, WK, R, BM, DT, gl4, a_l, b_l)
        # (past the end on the last even trip: re-read the last step instead of masking, and drop it)
        va, ma, xa = _load_step(wv_ptr, wm_ptr, xw_ptr, v_off, m_off, x_off, col_v, col_m, col_x, x_row_ok,
                                gl.minimum(i + 2, n_iter - 1), K, WK, EVEN_K, EVEN_X)
        acc = _mma_step(acc, vb, mb, xb, tab_cl, tab_kk, ASM, WK, R, BM, DT, gl4, a_l, b_l)
        if HAS_OUT:
            if OUT_IN_LOOP:
                acc_o += ov_a.to(gl.float32)[:, :, None] * xg.to(gl.float32)
                ov_a = ov_b
                oi_a = oi_b
    if n_iter % 2 == 1:
        acc = _mma_step(acc, va, ma, xa, tab_cl, tab_kk, ASM, WK, R, BM, DT, gl4, a_l, b_l)
    res = gl.sum(acc, axis=0)                                   # [R, BM]: the K slices' shares
    el: gl.constexpr = res.type.layout
    rows = rb * R + gl.arange(0, R, layout=gl.SliceLayout(1, el))
    toks = m0 + gl.arange(0, BM, layout=gl.SliceLayout(0, el))
    if HAS_SCALE:
        res = res * gl.load(scale_ptr + rows)[:, None]
    if HAS_OUT:
        if OUT_IN_LOOP:
            for c in range(n_iter // 2, (NO + OC - 1) // OC):  # chunks the loop did not reach (rare)
                ov_c, oi_c = _out_load(ov_ptr, oi_ptr, r_o, c_o, c, NO, OC)
                xg = _out_gather(x_ptr, oi_c, r_o, c_o, m_o, c, M, NO, XS, OB, OK, OC)
                acc_o += ov_c.to(gl.float32)[:, :, None] * xg.to(gl.float32)
        else:
            acc_o = _outliers_post(acc_o, x_ptr, ov_ptr, oi_ptr, r_o, c_o, m_o, 0, M, NO, XS, OB, OK, OC)
        so = gl.sum(acc_o, axis=1)                              # [R, OT] -> [R, BM] (OT < BM: M <= OT)
        if BM // OT >= 2:
            so = _widen(so, R, OT)
        if BM // OT >= 4:
            so = _widen(so, R, 2 * OT)
        if BM // OT >= 8:
            so = _widen(so, R, 4 * OT)
        if BM // OT >= 16:
            so = _widen(so, R, 8 * OT)
        if BM // OT >= 32:
            so = _widen(so, R, 16 * OT)
        res = res + gl.convert_layout(so, el)
    _epilogue(res, rows, toks, y_ptr, shift_ptr, bias_ptr, pre_ptr, M, N, stride_ym, HAS_SHIFT, HAS_BIAS, HAS_PRE)


@gluon.jit
def _epilogue(res, rows, toks, y_ptr, shift_ptr, bias_ptr, pre_ptr, M, N, stride_ym, HAS_SHIFT: gl.constexpr,
              HAS_BIAS: gl.constexpr, HAS_PRE: gl.constexpr):
    """y[toks, rows] = res + pre + shift + bias (res: [rows, toks] fp32 with the scale in; pre: the outlier product
    of outliers.py, fp32 [M, N], when the kernel did not compute the outliers itself)."""
    if HAS_PRE:
        res = res + gl.load(pre_ptr + toks[None, :] * N + rows[:, None], mask=(toks[None, :] + rows[:, None] * 0) < M,
                            other=0.0)
    if HAS_SHIFT:
        res = res + gl.load(shift_ptr + rows)[:, None]
    if HAS_BIAS:
        res = res + gl.load(bias_ptr + rows)[:, None].to(gl.float32)
    ptr = y_ptr + toks[None, :] * stride_ym + rows[:, None]
    gl.store(ptr, res.to(y_ptr.dtype.element_ty), mask=(toks[None, :] + rows[:, None] * 0) < M)


# ------------------------------------------------------------------------------------------------------ launcher
_ASM = fr.decode_asm(0)
_LAYOUTS: dict = {}
_TABLES: dict = {}


def layouts(WK: int, WN: int, BM: int, olanes: int, OT: int):
    key = (WK, WN, BM, olanes, OT)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = make_layouts(WK, WN, BM, olanes, OT)
    return _LAYOUTS[key]


def _table(device: torch.device) -> torch.Tensor:
    """The decode's two table words on ``device`` (made once per device, before any CUDA-graph capture: the
    plugin calls :func:`prepare_device` from process_weights_after_loading)."""
    key = str(device)
    if key not in _TABLES:
        words = [w - (1 << 32) if w >= 1 << 31 else w for w in fr.ASM_TABLE_WORDS]
        _TABLES[key] = torch.tensor(words, dtype=torch.int32, device=device)
    return _TABLES[key]


def prepare_device(device: torch.device) -> None:
    _table(device)


# Warps the chip should have loading at once: ~12 per SM on the H200's 132 SMs (the memory latency the loop hides).
_WARPS_TO_FILL = 132 * 12


def _fill_warps(ctas: int, per_cta: int, max_wk: int) -> int:
    """The smallest K split (1, 2, 4, ...) that puts _WARPS_TO_FILL warps on the chip, else ``max_wk``: splitting K
    further only adds the CTA's cross-warp reduction."""
    return next((wk for wk in (1, 2, 4, 8) if wk <= max_wk and ctas * wk * per_cta >= _WARPS_TO_FILL), max_wk)


def pick_config(M: int, N: int, K: int, has_outliers: bool = True) -> dict:
    """Launch shape by M class, measured on the H200 (benchmarks/results/gluon_sweep_h200.json: 8B qkv, gate_up, down
    and 70B o at M = 1, 8, 16, 32, 64 with outliers + scale, defaults and variants; kernels_h200.json):

    * BM (tokens per CTA) 8 / 16 / 32 (M > 32: the dispatcher sends it to the scratch path, which measured no
      slower at M = 64).
    * BM = 8: WK = 4 warps split K (beat the fill rule's choice on every swept shape at M = 1 and 8, by 0-27%).
    * BM = 16: the fill rule (gate_up WK = 1: 77.9 us, against 147.8 us with WK = 8; down WK = 8: 46.8 us; 70B o WK
      = 4: 49.2 us), except where the 16-row blocks about fill one wave of 3 CTAs per SM (300-396 blocks, 8B qkv):
      WK = 4, 23.6 us against 33.4 us; and at most K / 1024 (8 K steps per warp): 8B o 18.2 vs 22.3 us with the fill
      rule's WK = 8 (raw/h200/m16_variants.json, where WK = 2 / 4, two 8-token blocks and the wgmma kernel at BM = 16
      measured no faster on the other six shapes).
    * BM = 32: WN = 4 warps along N share x through L1 with WK = 2 on layers up to 8192 x 8192 (8B qkv 44.9 vs
      54.5 us, 70B o 80.7 vs 90.2 us); else WN = 2 and the fill rule (gate_up WK = 1: 148 us; down WK = 4: 72.8 us).
    * Outliers inside the main loop for BM = 8; after it for larger BM (the in-loop stream's registers cut
      occupancy: 217 vs 156 registers at BM = 16; in-loop measured 3-15% slower there), for the first
      :func:`outlier_tokens` tokens only (M = 1, x rows masked as run: 895 instead of 975 SASS per loop trip, 128
      instead of 167 registers; sass_h200.json).
    * ``xc`` at BM = 8 on layers with outliers: no row masks on x when M is not a multiple of BM (token rows past M
      re-read row M - 1) -- the masked loop at M = 1 ran 895 SASS per trip and 128 registers, against 707 and 96
      (sass_h200.json). H200, every Llama-3 shape, two runs (kernels_h200.json on 6147ef3, and on e2a2ab2), xc / masked
      time with outliers + scale: M = 1 0.85-0.95, M = 2 0.84-1.11, M = 4 0.75-1.05 (geomean 0.91); bare 8:16 it was
      mixed (0.77-1.16: 8B down lost at every M), so bare layers keep the masks. Not timed at BM = 16 (M 9-15): off.
    K steps per warp stay whole where possible (then the loop has no masks).
    """
    steps = -(-K // fr.STEP_COLS)
    if M <= 8:
        BM, WN, WK = 8, 1, 4
    elif M <= 16:
        BM, WN = 16, 1
        WK = 4 if 300 <= N // 16 <= 396 else _fill_warps(N // 16, 1, 8)
        WK = min(WK, max(1, steps // 8))  # >= 8 K steps per warp: 8B o WK = 4 18.2 vs WK = 8 22.3 us
    else:
        BM = 32
        if N <= 8192 and K <= 8192 and N % 64 == 0:
            WN, WK = 4, 2
        else:
            WN = 2 if N % 32 == 0 else 1
            WK = _fill_warps(N // (16 * WN), WN, 8 // WN)
    fits = [wk for wk in (8, 4, 2, 1) if wk <= WK and steps % wk == 0 and steps >= 2 * wk]
    WK = fits[0] if fits and fits[0] * 2 >= WK else WK if steps >= 2 * WK else max(1, min(WK, steps // 2))
    WK = 1 << (WK.bit_length() - 1)  # a power of two: the CTA's warp count must be one (K // 1024 may be 3, 5, ...)
    return {"BM": BM, "WN": WN, "WK": WK, "out_in_loop": BM == 8, "pre": False, "olanes": outlier_lanes(BM),
            "maxnreg": None, "pf": 0, "ot": outlier_tokens(M, BM), "xc": BM == 8 and has_outliers}


def load_masks(M: int, K: int, cfg: dict) -> tuple[bool, bool, bool]:
    """(EVEN_K, EVEN_X, XC) of a launch with config ``cfg``: W needs no K masks when every warp's K steps are whole;
    x needs no masks either when M also fills the token blocks, or with ``xc`` (rows past M re-read row M - 1, never
    stored). One rule for the launcher and for sass_count's lookup of the loop that ran."""
    even_k = K % fr.STEP_COLS == 0 and (-(-K // fr.STEP_COLS)) % cfg["WK"] == 0
    xc = bool(cfg["xc"]) and M % cfg["BM"] != 0
    return even_k, even_k and (M % cfg["BM"] == 0 or xc), xc


def can_implement(M: int, N: int, K: int, n: int, m: int, x: torch.Tensor, values: torch.Tensor,
                  positions: torch.Tensor) -> tuple[bool, str]:
    """Whether the kernel can compute this call, and why not (the dispatcher's question; M > MAX_M is allowed when a
    caller forces the kernel: it then runs ceil(M / 32) token blocks)."""
    if M > MAX_M:
        return False, f"M={M} > {MAX_M}"
    return _can_run(N, K, n, m, x, values, positions)


def _can_run(N: int, K: int, n: int, m: int, x: torch.Tensor, values: torch.Tensor,
             positions: torch.Tensor) -> tuple[bool, str]:
    if (n, m) != (8, 16):
        return False, f"{n}:{m} (8:16 only)"
    if x.dtype not in (torch.bfloat16, torch.float16) or values.dtype != x.dtype:
        return False, f"activations {x.dtype} / values {values.dtype} (bf16 or fp16, equal)"
    if positions.dtype != torch.int16:
        return False, "mask not in the on-disk int16 layout"
    if N % 16 or K % 32:
        return False, f"N={N} (multiple of 16) / K={K} (multiple of 32)"
    if not x.is_cuda or torch.cuda.get_device_capability(x.device) < (8, 0):
        return False, "needs an sm_80+ CUDA GPU (mma.sync)"
    return True, ""


def launch_inputs(kernel: str, can: tuple[bool, str], x2d: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                  N: int, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The checks and inputs shared by the Gluon launchers: refuse (ValueError naming ``kernel`` and the reason) what
    ``can`` refuses or tensors that are not an 8:16 layer of N x K; x contiguous and 16-byte aligned (its row stride
    is a compile-time constant: immediate offsets in the outlier gathers); y = ``out`` or a fresh [M, N]."""
    M, K = x2d.shape
    ok, why = can
    if ok and (tuple(values.shape) != (N, K // 2) or tuple(positions.shape) != (N, K // 16)):
        ok, why = False, (f"values {tuple(values.shape)} / mask {tuple(positions.shape)} are not an 8:16 layer of "
                          f"{N} x {K}")
    if not ok:
        raise ValueError(f"nm16 {kernel} kernel: {why}")
    if not x2d.is_contiguous() or x2d.data_ptr() % 16:
        x2d = x2d.contiguous() if not x2d.is_contiguous() else x2d.clone()
    y = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device) if out is None else out
    return x2d, y


def outlier_pass(pre: bool, x2d: torch.Tensor, outlier_values, outlier_index, N: int, outlier_block: int,
                 outliers_per_block: int, in_features: int) -> tuple[bool, torch.Tensor | None]:
    """(whether the kernel computes the outliers itself, the outlier product it adds instead or None): with ``pre``
    (the launch config's choice) the outliers run first as their own pass (outliers.py) and the epilogue adds it."""
    if not outliers_per_block:
        return False, None
    if not pre:
        return True, None
    return False, outlier_product(x2d, outlier_values, outlier_index, N=N, outlier_block=outlier_block,
                                  outliers_per_block=outliers_per_block, in_features=in_features)


def fragment_linear(x2d: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, outlier_values, outlier_index,
                    scale, shift, bias, *, outlier_block: int, outliers_per_block: int, in_features: int,
                    out_features: int, config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``y = scale * (x @ W_nm.T) + x @ W_out.T + shift + bias`` for x [M <= 64, K] bf16/fp16 (fp32 accumulation),
    on the on-disk tensors: values [N, K/2] (x's dtype), int16 mask [N, K/16], outliers as on disk. ``config``
    overrides :func:`pick_config`'s keys (tests and the benchmark sweep)."""
    M, K = x2d.shape
    N = out_features
    x2d, y = launch_inputs("Gluon", _can_run(N, K, 8, 16, x2d, values, positions), x2d, values, positions, N, out)
    if M == 0:
        return y
    cfg = pick_config(M, N, K, has_outliers=bool(outliers_per_block))
    cfg.update({k: v for k, v in (config or {}).items() if k in cfg and v is not None})
    BM, WN, WK, OL = cfg["BM"], cfg["WN"], cfg["WK"], cfg["olanes"]
    maxnreg = cfg["maxnreg"]
    # outlier tokens: the config's ``ot`` (a forced BM keeps the default: all its tokens); every token < M is needed
    OT = BM if "BM" in (config or {}) and "ot" not in (config or {}) else cfg["ot"]
    if not (isinstance(OT, int) and 1 <= OT <= BM and OT & (OT - 1) == 0 and (M <= OT or OT == BM)):
        raise ValueError(f"nm16 Gluon kernel: ot={OT} (a power of two <= BM={BM}, >= M={M} unless = BM)")
    if (WK * WN > 32 or (WK * WN) & (WK * WN - 1) or BM not in (8, 16, 32) or OL not in (1, 2, 4, 8)
            or not (maxnreg is None or 32 <= maxnreg <= 255) or not 0 <= int(cfg["pf"]) <= 64):
        raise ValueError(f"nm16 Gluon kernel: config BM={BM}, WN={WN}, WK={WK}, olanes={OL}, maxnreg={maxnreg}, "
                         f"pf={cfg['pf']} (BM 8/16/32, WN * WK warps a power of two up to 32, olanes 1/2/4/8, "
                         "maxnreg None or 32-255, pf 0-64)")
    S = -(-K // fr.STEP_COLS)
    even_k, even_x, xc = load_masks(M, K, cfg)
    has_out, pre = outlier_pass(bool(cfg["pre"]), x2d, outlier_values, outlier_index, N, outlier_block,
                                outliers_per_block, in_features)
    DT = gl.bfloat16 if x2d.dtype == torch.bfloat16 else gl.float16
    dummy = y
    NO = (in_features // outlier_block) * outliers_per_block if has_out else 0
    grid = (N // (16 * WN), -(-M // BM))
    nm16_fragment_kernel[grid](
        x2d, x2d.view(torch.int32), values.view(torch.int32), positions.view(torch.int32), _table(x2d.device),
        outlier_values if has_out else dummy, outlier_index if has_out else dummy,
        scale if scale is not None else dummy, shift if shift is not None else dummy,
        bias if bias is not None else dummy, pre if pre is not None else dummy, y,
        M, N, K, S, y.stride(0), NO, x2d.stride(0),
        _ASM, DT, WK, WN, BM, even_k, even_x,
        has_out, bool(cfg["out_in_loop"]), pre is not None, outlier_block if has_out else 1,
        outliers_per_block if has_out else 1,
        OL * WK, scale is not None, shift is not None, bias is not None, int(cfg["pf"]), OT, xc,
        *layouts(WK, WN, BM, OL, OT), num_warps=WK * WN,
        # a register cap per thread (ptxas spills past it): None = the compiler's choice; a variant under test
        **({"maxnreg": maxnreg} if maxnreg else {}))
    return y
