"""Gluon kernel for 8:16 at small M: decode straight into ``mma.m16n8k16`` A fragments (layout: fragment.py).

One CTA owns 16 output rows (one row block) and all of K; its ``WK`` warps split K between them (warp w takes K steps
w, w + WK, ...) and are reduced in shared memory at the end, so there is no workspace and no second launch. Per K step
(128 columns) each lane loads 2 x 16 B of kept values per row pair, one 8 B mask word and its x columns (2 x 16 B per
token row and tile, already in B-fragment order because K is permuted inside each 64-column tile), runs the PTX
stream decode (fragment.decode_asm) and issues the mma: the decoded words are the A registers (all layout
conversions are asserted trivial). The next step's loads are issued before the current step's decode (one-step
register prefetch), which the latency-bound loop needs.

Outliers (k per row and block of B columns) are exact: a CUDA-core pass after the main loop gathers x at their
columns into a second fp32 accumulator. The epilogue computes ``y = scale * acc + acc_outliers + shift + bias``.

The batched (3-D) mma puts the warps on the leading dimension: tensors are ``[WK, 16, ...]`` and warp w's slice is
its share of K. Tokens (M <= 16) are the mma N dimension: BM = 8 or 16.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from vllm_nm16.kernels import fragment as fr

MAX_M = 16


def _lg(v: int) -> int:
    return v.bit_length() - 1


def make_layouts(WK: int, BM: int):
    """The distributed layouts of the kernel (warps on dim 0, one 16-row block, 2 tiles per step)."""
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WK, 1, 1], instr_shape=[1, 16, 8])
    a_l = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    warp5 = [[1 << i, 0, 0, 0, 0] for i in range(_lg(WK))]
    # lane (g, t): t = lane % 4 owns group t, g = lane // 4 rows g and g + 8 (values) / token g (x)
    lane5 = [[0, 0, 0, 1, 0], [0, 0, 0, 2, 0], [0, 1, 0, 0, 0], [0, 2, 0, 0, 0], [0, 4, 0, 0, 0]]
    # values [WK, 16 rows, 2 tiles, 4 groups, 4 words]: registers = 4 words, row + 8, tile
    vl = gl.DistributedLinearLayout(reg_bases=[[0, 0, 0, 0, 1], [0, 0, 0, 0, 2], [0, 8, 0, 0, 0], [0, 0, 1, 0, 0]],
                                    lane_bases=lane5, warp_bases=warp5, block_bases=[], shape=[WK, 16, 2, 4, 4])
    # one value word / mask per group: [WK, 16, 2, 4] (vl without the word bits)
    gl4 = gl.DistributedLinearLayout(reg_bases=[[0, 8, 0, 0], [0, 0, 1, 0]], lane_bases=[b[:4] for b in lane5],
                                     warp_bases=[b[:4] for b in warp5], block_bases=[], shape=[WK, 16, 2, 4])
    # x [WK, BM tokens, 2 tiles, 4 groups, 8 words (16 columns)]
    xreg = [[0, 0, 0, 0, 1], [0, 0, 0, 0, 2], [0, 0, 0, 0, 4]] + ([[0, 8, 0, 0, 0]] if BM == 16 else []) + \
        [[0, 0, 1, 0, 0]]
    xl = gl.DistributedLinearLayout(reg_bases=xreg, lane_bases=lane5, warp_bases=warp5, block_bases=[],
                                    shape=[WK, BM, 2, 4, 8])
    # outliers [16 rows, OC slots, BM tokens]: tokens in registers
    ol = gl.BlockedLayout(size_per_thread=[1, 1, BM], threads_per_warp=[8, 4, 1], warps_per_cta=[1, WK, 1],
                          order=[2, 1, 0])
    return mma, a_l, b_l, vl, gl4, xl, ol


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
    return gl.load(x_ptr + col[:, :, None] + m_o * XS, mask=ok[:, :, None] & (m_o < M), other=0)


@gluon.jit
def _to_half(w, DT: gl.constexpr):
    lo = gl.cast((w & 0xFFFF).to(gl.int16), DT, bitcast=True)
    hi = gl.cast((w >> 16).to(gl.int16), DT, bitcast=True)
    return gl.join(lo, hi)


@gluon.jit
def _mma_step(acc, v, mk, xx, tab_cl, tab_kk, ASM: gl.constexpr, WK: gl.constexpr, BM: gl.constexpr,
              DT: gl.constexpr, gl4: gl.constexpr, a_l: gl.constexpr, b_l: gl.constexpr):
    """Decode one K step (2 tiles) of this warp's 16 rows into A fragments and multiply with its x columns."""
    v6 = gl.reshape(v, [WK, 16, 2, 4, 2, 2])
    va, vb = gl.split(v6)               # va = words (0, 2), vb = words (1, 3)
    v0, v2 = gl.split(va)
    v1, v3 = gl.split(vb)
    # mask word [WK, 16, 4] (tiles 0 and 1 in its low and high 16 bits) -> [WK, 16, 2, 4], this tile's bits low
    tile = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, gl4))))[None, None, :, None]
    m4 = gl.convert_layout(gl.expand_dims(mk, 2) >> (tile * 16), v0.type.layout, assert_trivial=True)
    o = gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r", [v0, v1, v2, v3, m4, gl.convert_layout(tab_cl, v0.type.layout, assert_trivial=True),
                                   gl.convert_layout(tab_kk, v0.type.layout, assert_trivial=True)],
                                  dtype=(gl.int32,) * 8, is_pure=True, pack=1)
    r = gl.join(gl.join(gl.join(o[0], o[1]), gl.join(o[2], o[3])), gl.join(gl.join(o[4], o[5]), gl.join(o[6], o[7])))
    d = _to_half(r, DT)                                        # [WK, 16, tile, T, H, S0, S1, E]
    d = gl.permute(d, [0, 1, 2, 6, 5, 4, 3, 7])                # [WK, 16, tile, S1, S0, H, T, E]
    a = gl.convert_layout(gl.reshape(d, [WK, 16, 128]), a_l, assert_trivial=True)
    xh = _to_half(xx, DT)                                      # [WK, BM, tile, T, 8 words, E]
    x8 = gl.reshape(xh, [WK, BM, 2, 4, 2, 2, 2, 2])            # word j = 4*s1 + 2*s0 + h -> [.., T, S1, S0, H, E]
    x8 = gl.permute(x8, [0, 1, 2, 4, 5, 6, 3, 7])              # [WK, BM, tile, S1, S0, H, T, E]
    b = gl.convert_layout(gl.permute(gl.reshape(x8, [WK, BM, 128]), [0, 2, 1]), b_l, assert_trivial=True)
    return mma_v2(a, b, acc)


@gluon.jit
def nm16_fragment_kernel(x_ptr, xw_ptr, wv_ptr, wm_ptr, tab_ptr, ov_ptr, oi_ptr, scale_ptr, shift_ptr, bias_ptr, y_ptr,
                         M, N, K, S, stride_ym, NO, XS: gl.constexpr,
                         ASM: gl.constexpr, DT: gl.constexpr, WK: gl.constexpr,
                         BM: gl.constexpr, EVEN_K: gl.constexpr, EVEN_X: gl.constexpr,
                         HAS_OUT: gl.constexpr, OB: gl.constexpr, OK: gl.constexpr, OC: gl.constexpr,
                         HAS_SCALE: gl.constexpr, HAS_SHIFT: gl.constexpr, HAS_BIAS: gl.constexpr,
                         mma: gl.constexpr, a_l: gl.constexpr, b_l: gl.constexpr, vl: gl.constexpr,
                         gl4: gl.constexpr, xl: gl.constexpr, ol: gl.constexpr):
    rb = gl.program_id(0)
    ml: gl.constexpr = gl.SliceLayout(2, gl4)
    # Warp w handles K steps w, w + WK, ... of 128 columns; lane (g, t) holds groups 2t, 2t+1 of the step (tiles
    # b = 0, 1) for rows g and g + 8 of the block, and the same 32 columns of its token row(s) of x.
    # values as int32 pairs, row-major [N, K/4]: row * K/4 + step * 32 + group * 4 + word
    w_v = _ar(WK, 0, vl)
    row_v = rb * 16 + _ar(16, 1, vl)
    grp_v = _ar(4, 3, vl) * 2 + _ar(2, 2, vl)
    v_off = row_v * (K // 4) + w_v * 32 + grp_v * 4 + _ar(4, 4, vl)
    col_v = w_v * 128 + grp_v * 16 + row_v * 0
    # masks as int32 (the int16 masks of groups 2t, 2t+1), row-major [N, K/32]: row * K/32 + step * 4 + t
    w_m = gl.arange(0, WK, layout=gl.SliceLayout(1, gl.SliceLayout(2, ml)))[:, None, None]
    row_m = rb * 16 + gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, ml)))[None, :, None]
    t_m = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, ml)))[None, None, :]
    m_off = row_m * (K // 32) + w_m * 4 + t_m
    col_m = w_m * 128 + t_m * 32 + row_m * 0
    # x as int32 words: row m * sxw + step * 64 + group * 8 + word
    m_x = _ar(BM, 1, xl)
    w_x = _ar(WK, 0, xl)
    cw_x = w_x * 64 + (_ar(4, 3, xl) * 2 + _ar(2, 2, xl)) * 8 + _ar(8, 4, xl)
    x_off = m_x * (XS // 2) + cw_x
    col_x = cw_x * 2 + m_x * 0
    x_row_ok = m_x < M
    acc = gl.full([WK, 16, BM], 0.0, gl.float32, layout=mma)
    n_iter = (S + WK - 1) // WK
    # The decode's table words, per thread (a thread-varying 0 offset the compiler cannot fold: a uniform load
    # lands in uniform registers, which ptxas then copies into a regular register before every prmt).
    lane0 = gl.convert_layout(gl.reshape(col_v, [WK, 16, 2, 4]) >> 30, gl4)
    tab_cl = gl.load(tab_ptr + lane0)
    tab_kk = gl.load(tab_ptr + 1 + lane0)
    if HAS_OUT:
        # Outliers ride along the main loop as their own stream (chunk c = OC slots of each row per loop trip,
        # offsets loaded one trip ahead, x gathered at the start of a trip and used at its end), so their memory
        # latency hides behind the decode instead of trailing it. Chunks the loop does not reach run after it.
        r_o = rb * 16 + gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(2, ol)))[:, None]
        c_o = gl.arange(0, OC, layout=gl.SliceLayout(0, gl.SliceLayout(2, ol)))[None, :]
        m_o = gl.arange(0, BM, layout=gl.SliceLayout(0, gl.SliceLayout(1, ol)))[None, None, :]
        acc_o = gl.full([16, OC, BM], 0.0, gl.float32, layout=ol)
        ov_a, oi_a = _out_load(ov_ptr, oi_ptr, r_o, c_o, 0, NO, OC)
    # One step of register prefetch, unrolled by two so that the two buffers swap roles without register moves.
    va, ma, xa = _load_step(wv_ptr, wm_ptr, xw_ptr, v_off, m_off, x_off, col_v, col_m, col_x, x_row_ok, 0, K,
                            WK, EVEN_K, EVEN_X)
    for i in range(0, n_iter - 1, 2):
        vb, mb, xb = _load_step(wv_ptr, wm_ptr, xw_ptr, v_off, m_off, x_off, col_v, col_m, col_x, x_row_ok, i + 1,
                                K, WK, EVEN_K, EVEN_X)
        if HAS_OUT:
            xg = _out_gather(x_ptr, oi_a, r_o, c_o, m_o, i // 2, M, NO, XS, OB, OK, OC)
            ov_b, oi_b = _out_load(ov_ptr, oi_ptr, r_o, c_o, i // 2 + 1, NO, OC)
        acc = _mma_step(acc, va, ma, xa, tab_cl, tab_kk, ASM, WK, BM, DT, gl4, a_l, b_l)
        # (past the end on the last even trip: re-read the last step instead of masking, and drop it)
        va, ma, xa = _load_step(wv_ptr, wm_ptr, xw_ptr, v_off, m_off, x_off, col_v, col_m, col_x, x_row_ok,
                                gl.minimum(i + 2, n_iter - 1), K, WK, EVEN_K, EVEN_X)
        acc = _mma_step(acc, vb, mb, xb, tab_cl, tab_kk, ASM, WK, BM, DT, gl4, a_l, b_l)
        if HAS_OUT:
            acc_o += ov_a.to(gl.float32)[:, :, None] * xg.to(gl.float32)
            ov_a = ov_b
            oi_a = oi_b
    if n_iter % 2 == 1:
        acc = _mma_step(acc, va, ma, xa, tab_cl, tab_kk, ASM, WK, BM, DT, gl4, a_l, b_l)
    res = gl.sum(acc, axis=0)                                   # [16, BM]: the warps' shares of K
    el: gl.constexpr = res.type.layout
    rows = rb * 16 + gl.arange(0, 16, layout=gl.SliceLayout(1, el))
    toks = gl.arange(0, BM, layout=gl.SliceLayout(0, el))
    if HAS_SCALE:
        res = res * gl.load(scale_ptr + rows)[:, None]
    if HAS_OUT:
        for c in range(n_iter // 2, (NO + OC - 1) // OC):
            ov_c, oi_c = _out_load(ov_ptr, oi_ptr, r_o, c_o, c, NO, OC)
            xg = _out_gather(x_ptr, oi_c, r_o, c_o, m_o, c, M, NO, XS, OB, OK, OC)
            acc_o += ov_c.to(gl.float32)[:, :, None] * xg.to(gl.float32)
        res = res + gl.convert_layout(gl.sum(acc_o, axis=1), el)
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


def layouts(WK: int, BM: int):
    key = (WK, BM)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = make_layouts(WK, BM)
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


def pick_warps(steps: int, rows: int) -> int:
    """Warps per CTA = the K split (one CTA per 16 output rows): enough warps on the chip to keep the loads in
    flight (about 12+ per SM on 132 SMs), whole K steps per warp where possible (then the loop needs no masks)."""
    blocks = rows // 16
    for wk in (4, 8, 16):
        if steps % wk == 0 and steps // wk >= 2 and blocks * wk >= 132 * 12:
            return wk
    for wk in (16, 8, 4):
        if steps % wk == 0 and steps // wk >= 2:
            return wk
    return 4 if steps >= 8 else 2 if steps >= 2 else 1


def can_implement(M: int, N: int, K: int, n: int, m: int, x: torch.Tensor, wv: torch.Tensor,
                  wm: torch.Tensor) -> tuple[bool, str]:
    if (n, m) != (8, 16):
        return False, f"{n}:{m} (8:16 only)"
    if M > MAX_M:
        return False, f"M={M} > {MAX_M}"
    if x.dtype not in (torch.bfloat16, torch.float16) or wv.dtype != x.dtype:
        return False, f"activations {x.dtype} / values {wv.dtype} (bf16 or fp16, equal)"
    if wm.dtype != torch.int16:
        return False, "mask not in the on-disk int16 layout"
    if N % 16 or K % 32:
        return False, f"N={N} (multiple of 16) / K={K} (multiple of 32)"
    if not x.is_cuda or torch.cuda.get_device_capability(x.device) < (8, 0):
        return False, "needs an sm_80+ CUDA GPU (mma.sync)"
    return True, ""


def fragment_linear(x2d: torch.Tensor, wv: torch.Tensor, wm: torch.Tensor, ov, oi, scale, shift, bias, *,
                    outlier_block: int, outliers_per_block: int, in_features: int, out_features: int,
                    warps: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``y = scale * (x @ W_nm.T) + x @ W_out.T + shift + bias`` for x [M <= 16, K] bf16/fp16 (fp32 accumulation),
    on the on-disk tensors: values [N, K/2] (x's dtype), int16 mask [N, K/16], outliers as on disk."""
    M, K = x2d.shape
    N = out_features
    if not x2d.is_contiguous() or x2d.data_ptr() % 16:
        # contiguous x: its row stride (K) is a compile-time constant (immediate offsets in the outlier gathers)
        x2d = x2d.contiguous() if x2d.data_ptr() % 16 == 0 or not x2d.is_contiguous() else x2d.clone()
    y = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device) if out is None else out
    if M == 0:
        return y
    S = -(-K // fr.STEP_COLS)
    BM = 8 if M <= 8 else 16
    WK = warps or pick_warps(S, N)
    has_out = bool(outliers_per_block)
    DT = gl.bfloat16 if x2d.dtype == torch.bfloat16 else gl.float16
    dummy = y
    NO = (in_features // outlier_block) * outliers_per_block if has_out else 0
    even_k = K % fr.STEP_COLS == 0 and S % WK == 0
    nm16_fragment_kernel[(N // 16,)](
        x2d, x2d.view(torch.int32), wv.view(torch.int32), wm.view(torch.int32), _table(x2d.device),
        ov if has_out else dummy, oi if has_out else dummy,
        scale if scale is not None else dummy, shift if shift is not None else dummy,
        bias if bias is not None else dummy, y,
        M, N, K, S, y.stride(0), NO, x2d.stride(0),
        _ASM, DT, WK, BM, even_k, even_k and M == BM,
        has_out, outlier_block if has_out else 1, outliers_per_block if has_out else 1, 4 * WK,
        scale is not None, shift is not None, bias is not None,
        *layouts(WK, BM), num_warps=WK)
    return y
