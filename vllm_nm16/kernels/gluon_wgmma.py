"""Gluon kernel for 8:16 at medium M (17..128 tokens; any M runs): the fragment decode of gluon_nm16.py feeding
``wgmma``.

Why a second kernel: the mma_v2 kernel keeps x in registers (the B operand), which at 32+ tokens costs 64+ registers
per warp and re-decodes W for every 32-token block. ``wgmma`` reads B from shared memory once per warpgroup, so one
CTA decodes each W element once for up to ``BM`` = 128 tokens.

One CTA = ``NW`` warps (1 or 2 warpgroups) = ``16 * NW`` output rows, one block of ``BM`` tokens (the wgmma N).
Per K step (128 columns):

* W: each lane loads, straight from the on-disk tensors, 2 x 16 B of kept values per row (groups 2t, 2t+1 of rows g
  and g+8 of its warp) and one int32 of masks; the PTX stream decode (fragment.decode_asm) turns them into the A
  registers of the step (K permuted inside each 64-column tile, exactly as in gluon_nm16.py: every conversion is
  ``assert_trivial``).
* x: the CTA's threads load the x tile [BM, 128] (16-byte vectors, coalesced), permute K in registers the same way,
  and store it into one of three shared-memory buffers (NVMMA-swizzled), one step ahead of its use.
* ``warpgroup_mma(A from registers, x tile from shared memory)``, asynchronous: the tensor cores multiply step i
  while the warps decode step i + 1. Three x buffers make one CTA barrier per step enough: buffer (i + 1) % 3 was
  last read by the wgmma of step i - 2, which every warpgroup waited for before the previous step's barrier.

That is the register-staged loop. The default where K is a multiple of 128 (config ``tma``, :func:`use_tma`) is the
TMA ring (:func:`_main_loop_tma`): the launcher permutes x once into the fragments' K order (fragment.permute_x), and
per K step one thread asks the TMA unit for the x tile and the CTA's packed W values and masks, 1-3 steps ahead, into
a ring of 2-4 stages in shared memory (one mbarrier per stage; rows past M arrive as zeros). The warps read their W
words back in the decode's register layout, decode and issue the wgmma; nothing prefetched sits in registers (389
SASS per step, 79-176 registers against 126-255), so two CTAs share an SM with 1-3 steps of loads in flight each.

Split-K across CTAs (grid dim 2, ``SPLIT``): each CTA takes a contiguous range of K steps, so a layer with few 64-row
tiles still fills the chip; the CTAs of a tile meet in an fp32 workspace and the last one to finish (a per-tile
counter) sums the partials in a fixed order, writes y and resets the counter.

Outliers (k per row and block of OB columns) are exact in fp32 on the CUDA cores: either as their own pass first
(config ``PRE``, the default but on small layers at M <= 32: outliers.py, added in the epilogue) or after the main
loop, per K split, in chunks of 16 tokens (the scaled main result waits in shared memory); epilogue
``y = scale * acc + outliers + shift + bias``. The dispatcher (kernels.choose_config) sends M 17..128 here, 17..256
on layers without outliers (H200 measurements there).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_init, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from vllm_nm16.kernels import fragment as fr
from vllm_nm16.kernels.gluon_nm16 import (_ASM, _can_run, _epilogue, _l2_prefetch, _table, _to_half, _x_at,
                                           launch_inputs, outlier_pass)

TB = gl.constexpr(16)  # tokens per chunk of the outlier pass
_DP_DEC_REGS = gl.constexpr(152)  # registers of a dp decoder warp (setmaxnreg)


def _lg(v: int) -> int:
    return v.bit_length() - 1


def make_layouts(NW: int, BM: int):
    """acc (wgmma), A operand, W values [R, 2 tiles, 4 lanes t, 4 words], masks [R, 2, 4], x words [BM, 2, 4, 8],
    outlier pass [R, OC, TB], the x buffers' shared layout, the split-K fix-up [R, BM]."""
    R = 16 * NW
    acc = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, BM, 16])
    a_l = gl.DotOperandLayout(operand_index=0, parent=acc, k_width=2)
    warps = [[16 << i, 0, 0, 0] for i in range(_lg(NW))]
    lane5 = [[0, 0, 1, 0], [0, 0, 2, 0], [1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]]
    vl = gl.DistributedLinearLayout(reg_bases=[[0, 0, 0, 1], [0, 0, 0, 2], [8, 0, 0, 0], [0, 1, 0, 0]],
                                    lane_bases=lane5, warp_bases=warps, block_bases=[], shape=[R, 2, 4, 4])
    gl4 = gl.DistributedLinearLayout(reg_bases=[[8, 0, 0], [0, 1, 0]], lane_bases=[b[:3] for b in lane5],
                                     warp_bases=[b[:3] for b in warps], block_bases=[], shape=[R, 2, 4])
    # x words: 4 consecutive words (16 B) per register quad; 16 lanes cover one token row's 64 words of the step
    # (word offset 16 t + 8 tile + j), lane bit 4 and the warps walk tokens, the rest of the tokens in registers.
    tok_lane_warp = 2 * NW
    xreg = [[0, 0, 0, 1], [0, 0, 0, 2]] + [[tok_lane_warp << i, 0, 0, 0] for i in range(_lg(BM // tok_lane_warp))]
    xl = gl.DistributedLinearLayout(reg_bases=xreg,
                                    lane_bases=[[0, 0, 0, 4], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 2, 0], [1, 0, 0, 0]],
                                    warp_bases=[[2 << i, 0, 0, 0] for i in range(_lg(NW))], block_bases=[],
                                    shape=[BM, 2, 4, 8])
    ol = gl.BlockedLayout(size_per_thread=[1, 1, TB], threads_per_warp=[16, 2, 1], warps_per_cta=[NW, 1, 1],
                          order=[2, 1, 0])
    xs = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    # split-K fix-up: partials [R rows, BM tokens] fp32, rows contiguous in the workspace and in y
    fl = gl.BlockedLayout(size_per_thread=[4, 1], threads_per_warp=[16, 2], warps_per_cta=[1, NW], order=[0, 1])
    return acc, a_l, vl, gl4, xl, ol, xs, fl


def make_tma_layouts(NW: int):
    """The TMA path's views of one stage of W in shared memory, as each thread reads it back: values [R, 32 words]
    (word c = 8 t + 4 tile + q of the step: the register/lane bits of ``vl`` flattened) and masks [R, 4 words] (word
    t: the lane bits of ``gl4``); and the two tiles' shared layouts (128-byte swizzle for the values: the 8 rows g
    of a quarter warp read distinct 16-byte chunks; none for the 16-byte mask rows)."""
    R = 16 * NW
    warps = [[16 << i, 0] for i in range(_lg(NW))]
    vl2 = gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 2], [8, 0], [0, 4]],
                                     lane_bases=[[0, 8], [0, 16], [1, 0], [2, 0], [4, 0]], warp_bases=warps,
                                     block_bases=[], shape=[R, 32])
    ml2 = gl.DistributedLinearLayout(reg_bases=[[8, 0]], lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
                                     warp_bases=warps, block_bases=[], shape=[R, 4])
    wv_s = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
    wm_s = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    return vl2, ml2, wv_s, wm_s


@gluon.jit
def _ar4(n: gl.constexpr, dim: gl.constexpr, L: gl.constexpr):
    """arange(n) along ``dim`` of the rank-4 layout ``L``, expanded to rank 4."""
    if dim == 0:
        return gl.arange(0, n, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L))))[:, None, None, None]
    elif dim == 1:
        return gl.arange(0, n, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L))))[None, :, None, None]
    elif dim == 2:
        return gl.arange(0, n, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L))))[None, None, :, None]
    else:
        return gl.arange(0, n, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L))))[None, None, None, :]


@gluon.jit
def _load_w(wv_ptr, wm_ptr, v_off, m_off, col_v, col_m, i, K, EVEN_K: gl.constexpr):
    if EVEN_K:
        v = gl.load(wv_ptr + (v_off + i * 32))
        mk = gl.load(wm_ptr + (m_off + i * 4))
    else:
        v = gl.load(wv_ptr + (v_off + i * 32), mask=(col_v + i * 128) < K, other=0)
        mk = gl.load(wm_ptr + (m_off + i * 4), mask=(col_m + i * 128) < K, other=0)
    return v, mk


@gluon.jit
def _load_x(xw_ptr, x_off, col_x, x_row_ok, i, K, EVEN_X: gl.constexpr):
    if EVEN_X:
        return gl.load(xw_ptr + (x_off + i * 64))
    else:
        return gl.load(xw_ptr + (x_off + i * 64), mask=x_row_ok & ((col_x + i * 128) < K), other=0)


@gluon.jit
def _stage_x(buf, xx, BM: gl.constexpr, DT: gl.constexpr):
    """x words [BM, tile, T, 8] -> the step's K order (tile, S1, S0, H, T, E; word j = 4 S1 + 2 S0 + H), into smem."""
    xh = _to_half(xx, DT)                                   # [BM, tile, T, 8 words, E]
    x7 = gl.reshape(xh, [BM, 2, 4, 2, 2, 2, 2])
    x7 = gl.permute(x7, [0, 1, 3, 4, 5, 2, 6])              # [BM, tile, S1, S0, H, T, E]
    buf.store(gl.reshape(x7, [BM, 128]))


@gluon.jit
def _load_table(tab_ptr, K, R: gl.constexpr, gl4: gl.constexpr):
    """The decode's two table words in layout ``gl4``, loaded per thread through an offset that is 0 (N + K < 2**30,
    can_implement) but varies by thread as far as the compilers know: a uniform load lands in uniform registers,
    which ptxas then copies into a regular register before every prmt (+2 instructions per kept value)."""
    lane0 = (gl.arange(0, R, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl4)))[:, None, None] + K) >> 30
    lane0 = lane0 + gl.zeros([R, 2, 4], gl.int32, layout=gl4)
    return gl.load(tab_ptr + lane0), gl.load(tab_ptr + 1 + lane0)


@gluon.jit
def _decode(v, mk, tab_cl, tab_kk, ASM: gl.constexpr, R: gl.constexpr, DT: gl.constexpr, gl4: gl.constexpr,
            a_l: gl.constexpr):
    """One K step of this warp's 16 rows (2 tiles) -> the A operand [R, 128] (gluon_nm16._mma_step without WK)."""
    v5 = gl.reshape(v, [R, 2, 4, 2, 2])
    va, vb = gl.split(v5)               # va = words (0, 2), vb = words (1, 3)
    v0, v2 = gl.split(va)
    v1, v3 = gl.split(vb)
    tile = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl4)))[None, :, None]
    m4 = gl.convert_layout(gl.expand_dims(mk, 1) >> (tile * 16), v0.type.layout, assert_trivial=True)
    o = gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r",
                                  [v0, v1, v2, v3, m4, gl.convert_layout(tab_cl, v0.type.layout, assert_trivial=True),
                                   gl.convert_layout(tab_kk, v0.type.layout, assert_trivial=True)],
                                  dtype=(gl.int32,) * 8, is_pure=True, pack=1)
    r = gl.join(gl.join(gl.join(o[0], o[1]), gl.join(o[2], o[3])), gl.join(gl.join(o[4], o[5]), gl.join(o[6], o[7])))
    d = _to_half(r, DT)                                     # [R, tile, T, H, S0, S1, E]
    d = gl.permute(d, [0, 1, 5, 4, 3, 2, 6])                # [R, tile, S1, S0, H, T, E]
    return gl.convert_layout(gl.reshape(d, [R, 128]), a_l, assert_trivial=True)


# Arguments as nm16_fragment_kernel's (gluon_nm16.py), plus ws / cnt (the split-K workspace and tile counters).
# Compile-time constants: NW = warps (16 output rows each), BM = tokens per CTA (the wgmma N), SPLIT = CTAs per tile
# along K, HAS_PRE = the outlier product comes from outliers.py, OB / OK = outlier block / outliers per row and block;
# acc_l ... fl = the layouts of make_layouts.
@gluon.jit
def nm16_wgmma_kernel(x_ptr, xw_ptr, wv_ptr, wm_ptr, tab_ptr, ov_ptr, oi_ptr, scale_ptr, shift_ptr, bias_ptr,
                      pre_ptr, y_ptr, ws_ptr, cnt_ptr, xd, wvd, wmd, M, N, K, S, stride_ym, NO, XS: gl.constexpr,
                      ASM: gl.constexpr, DT: gl.constexpr, NW: gl.constexpr, BM: gl.constexpr, SPLIT: gl.constexpr,
                      EVEN_K: gl.constexpr, EVEN_X: gl.constexpr, HAS_OUT: gl.constexpr, HAS_PRE: gl.constexpr,
                      OB: gl.constexpr,
                      OK: gl.constexpr, HAS_SCALE: gl.constexpr, HAS_SHIFT: gl.constexpr, HAS_BIAS: gl.constexpr,
                      PF: gl.constexpr, XC: gl.constexpr, acc_l: gl.constexpr, a_l: gl.constexpr, vl: gl.constexpr,
                      gl4: gl.constexpr, xl: gl.constexpr, ol: gl.constexpr, xs_l: gl.constexpr, fl: gl.constexpr,
                      TMA: gl.constexpr, NS: gl.constexpr, vl2: gl.constexpr, ml2: gl.constexpr,
                      WS: gl.constexpr = False, DP: gl.constexpr = 0):
    R: gl.constexpr = 16 * NW
    rb = gl.program_id(0)
    m0 = gl.program_id(1) * BM
    # split-K across CTAs: this CTA's K steps [i0, i1) (SPLIT > 1: the CTAs of a tile meet in ws, see the end)
    sk = gl.program_id(2)
    i0 = (sk * S) // SPLIT
    i1 = ((sk + 1) * S) // SPLIT
    ml: gl.constexpr = gl.SliceLayout(1, gl4)
    # W offsets (int32 words): values row * K/4 + step * 32 + group * 4 + word; masks row * K/32 + step * 4 + t
    row_v = rb * R + _ar4(R, 0, vl)
    grp_v = _ar4(4, 2, vl) * 2 + _ar4(2, 1, vl)
    v_off = row_v * (K // 4) + grp_v * 4 + _ar4(4, 3, vl)
    col_v = grp_v * 16 + row_v * 0
    row_m = rb * R + gl.arange(0, R, layout=gl.SliceLayout(1, ml))[:, None]
    t_m = gl.arange(0, 4, layout=gl.SliceLayout(0, ml))[None, :]
    m_off = row_m * (K // 32) + t_m
    col_m = t_m * 32 + row_m * 0
    pf_off = row_m * (K // 4) + t_m * 8   # L2 prefetch PF steps ahead (PF > 0): a row's 128-byte line of values
    # x offsets (int32 words): token * XS/2 + step * 64 + t * 16 + tile * 8 + word
    # XC: token rows past M read row M - 1, never stored (see gluon_nm16, config key xc)
    m_x = m0 + _ar4(BM, 0, xl)
    cw_x = _ar4(4, 2, xl) * 16 + _ar4(2, 1, xl) * 8 + _ar4(8, 3, xl)
    if XC:
        x_off = gl.minimum(m_x, M - 1) * (XS // 2) + cw_x
    else:
        x_off = m_x * (XS // 2) + cw_x
    col_x = cw_x * 2 + m_x * 0
    x_row_ok = m_x < M
    tab_cl, tab_kk = _load_table(tab_ptr, K, R, gl4)

    if TMA:
        if DP > 0:
            acc = _main_loop_dp(xd, wvd, wmd, tab_ptr, K, i0, i1, m0, rb * R, ASM, R, BM, DT, NS, DP, acc_l, a_l,
                                vl, gl4, vl2, ml2, xs_l)
        elif WS:
            acc = _main_loop_ws(xd, wvd, wmd, tab_cl, tab_kk, i0, i1, m0, rb * R, ASM, R, BM, DT, NS, acc_l, a_l, vl,
                                gl4, vl2, ml2)
        else:
            acc = _main_loop_tma(xd, wvd, wmd, tab_cl, tab_kk, i0, i1, m0, rb * R, ASM, R, BM, DT, NS, acc_l, a_l, vl,
                                 gl4, vl2, ml2)
    else:
        xs = gl.allocate_shared_memory(DT, [3, BM, 128], xs_l)
        _stage_x(xs.index(0), _load_x(xw_ptr, x_off, col_x, x_row_ok, i0, K, EVEN_X), BM, DT)
        fence_async_shared()
        gl.thread_barrier()
        v, mk = _load_w(wv_ptr, wm_ptr, v_off, m_off, col_v, col_m, i0, K, EVEN_K)
        acc = warpgroup_mma_init(gl.zeros([R, BM], gl.float32, layout=acc_l))
        for i in range(i0, i1):
            # next step's W and x (past the end on the last trip: re-read the last step, unused)
            nxt = gl.minimum(i + 1, i1 - 1)
            if PF > 0:
                _l2_prefetch(wv_ptr, pf_off, gl.minimum(i + PF, i1 - 1), 1)
            vn, mkn = _load_w(wv_ptr, wm_ptr, v_off, m_off, col_v, col_m, nxt, K, EVEN_K)
            xn = _load_x(xw_ptr, x_off, col_x, x_row_ok, nxt, K, EVEN_X)
            a = _decode(v, mk, tab_cl, tab_kk, ASM, R, DT, gl4, a_l)
            acc = warpgroup_mma_wait(0, deps=[acc])
            acc = warpgroup_mma(a, xs.index((i - i0) % 3).permute((1, 0)), acc, is_async=True)
            _stage_x(xs.index((i - i0 + 1) % 3), xn, BM, DT)
            fence_async_shared()
            gl.thread_barrier()
            v = vn
            mk = mkn
        acc = warpgroup_mma_wait(0, deps=[acc])

    rows = rb * R + gl.arange(0, R, layout=gl.SliceLayout(1, acc_l))
    if HAS_SCALE:
        acc = acc * gl.load(scale_ptr + rows)[:, None]
    if HAS_OUT:
        # Outliers of this CTA's columns [i0 * 128, i1 * 128), per chunk of TB tokens (registers: TB per slot); the
        # scaled main result waits in shared memory.
        el: gl.constexpr = gl.SliceLayout(1, ol)
        res_s = gl.allocate_shared_memory(gl.float32, [R, BM], gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
        res_s.store(acc)
        gl.thread_barrier()
        OC: gl.constexpr = 2
        c_lo = i0 * 128
        c_hi = gl.minimum(i1 * 128, K)
        s_lo = (c_lo // OB) * OK
        s_hi = gl.minimum(((c_hi + OB - 1) // OB) * OK, NO)
        r_o = rb * R + gl.arange(0, R, layout=gl.SliceLayout(1, gl.SliceLayout(2, ol)))[:, None]
        c_o = gl.arange(0, OC, layout=gl.SliceLayout(0, gl.SliceLayout(2, ol)))[None, :]
        rows_e = rb * R + gl.arange(0, R, layout=gl.SliceLayout(1, el))
        n_chunks = (s_hi - s_lo + OC - 1) // OC
        for tb in gl.static_range(BM // TB):
            # software-pipelined: chunk c + 1's slots and x gathers are in flight while chunk c's FMAs run (each
            # gather is an L2 round trip; unpipelined they serialized: +100-160% at M = 64-128)
            m_o = m0 + tb * TB + gl.arange(0, TB, layout=gl.SliceLayout(0, gl.SliceLayout(1, ol)))[None, None, :]
            acc_o = gl.zeros([R, OC, TB], gl.float32, layout=ol)
            slot = s_lo + c_o + r_o * 0
            ov, xg = _out_chunk(x_ptr, ov_ptr, oi_ptr, r_o, m_o, slot, s_hi, c_lo, c_hi, M, NO, XS, OB, OK)
            for c in range(n_chunks):
                slot = slot + OC
                ov_n, xg_n = _out_chunk(x_ptr, ov_ptr, oi_ptr, r_o, m_o, slot, s_hi, c_lo, c_hi, M, NO, XS, OB,
                                        OK)
                acc_o += ov.to(gl.float32)[:, :, None] * xg.to(gl.float32)
                ov = ov_n
                xg = xg_n
            res = res_s.slice(tb * TB, TB, dim=1).load(el) + gl.sum(acc_o, axis=1)
            toks = m0 + tb * TB + gl.arange(0, TB, layout=gl.SliceLayout(0, el))
            if SPLIT == 1:
                _epilogue(res, rows_e, toks, y_ptr, shift_ptr, bias_ptr, pre_ptr, M, N, stride_ym, HAS_SHIFT,
                          HAS_BIAS, HAS_PRE)
            else:
                gl.store(ws_ptr + (sk * M + toks[None, :]) * N + rows_e[:, None], res,
                         mask=(toks[None, :] + rows_e[:, None] * 0) < M)
    else:
        toks = m0 + gl.arange(0, BM, layout=gl.SliceLayout(0, acc_l))
        if SPLIT == 1:
            _epilogue(acc, rows, toks, y_ptr, shift_ptr, bias_ptr, pre_ptr, M, N, stride_ym, HAS_SHIFT, HAS_BIAS,
                      HAS_PRE)
        else:
            gl.store(ws_ptr + (sk * M + toks[None, :]) * N + rows[:, None], acc,
                     mask=(toks[None, :] + rows[:, None] * 0) < M)
    if SPLIT > 1:
        # Serial fix-up: the last CTA of the tile to finish sums the SPLIT partials in a fixed order (deterministic)
        # and writes y; it then resets the tile's counter for the next call (no memset, CUDA-graph safe).
        gl.thread_barrier()
        tile = rb * gl.num_programs(1) + gl.program_id(1)
        done = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT - 1:
            rows_f = rb * R + gl.arange(0, R, layout=gl.SliceLayout(1, fl))
            toks_f = m0 + gl.arange(0, BM, layout=gl.SliceLayout(0, fl))
            off = toks_f[None, :] * N + rows_f[:, None]
            ok_f = (toks_f[None, :] + rows_f[:, None] * 0) < M
            tot = gl.zeros([R, BM], gl.float32, layout=fl)
            for q in gl.static_range(SPLIT):
                tot += gl.load(ws_ptr + q * M * N + off, mask=ok_f, other=0.0, cache_modifier=".cg")
            _epilogue(tot, rows_f, toks_f, y_ptr, shift_ptr, bias_ptr, pre_ptr, M, N, stride_ym, HAS_SHIFT, HAS_BIAS,
                      HAS_PRE)
            gl.store(cnt_ptr + tile, 0)


@gluon.jit
def _alloc_ring(xd, wvd, wmd, NS: gl.constexpr):
    """The ring's NS stages in shared memory, one TMA box each: x tiles, W values, W masks."""
    xs = gl.allocate_shared_memory(xd.dtype, [NS] + xd.block_type.shape, xd.layout)
    wvs = gl.allocate_shared_memory(wvd.dtype, [NS] + wvd.block_type.shape, wvd.layout)
    wms = gl.allocate_shared_memory(wmd.dtype, [NS] + wmd.block_type.shape, wmd.layout)
    return xs, wvs, wms


@gluon.jit
def _new_barriers(NS: gl.constexpr):
    bars = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    for q in gl.static_range(NS):
        mbarrier.init(bars.index(q), count=1)
    return bars


@gluon.jit
def _tma_stage(xd, wvd, wmd, xs, wvs, wms, bars, s, i, pred, m0, r0):
    """Ask the TMA unit for K step ``i`` into stage ``s``: the x tile [BM, 128] (rows past M read as zeros) and this
    CTA's W values [R, 32 words] and masks [R, 4 words]; ``bars[s]`` completes when all three boxes have landed."""
    bar = bars.index(s)
    mbarrier.expect(bar, xd.block_type.nbytes + wvd.block_type.nbytes + wmd.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(xd, [m0, i * 128], bar, xs.index(s), pred=pred)
    tma.async_copy_global_to_shared(wvd, [r0, i * 32], bar, wvs.index(s), pred=pred)
    tma.async_copy_global_to_shared(wmd, [r0, i * 4], bar, wms.index(s), pred=pred)


@gluon.jit
def _read_w(wvs, wms, s, R: gl.constexpr, vl: gl.constexpr, gl4: gl.constexpr, vl2: gl.constexpr,
            ml2: gl.constexpr):
    """Stage ``s``'s W values and masks back from shared memory, in the register layouts _decode takes."""
    v2 = wvs.index(s).load(vl2)                                   # [R, 32]: word 8 t + 4 tile + q
    v = gl.convert_layout(gl.permute(gl.reshape(v2, [R, 4, 2, 4]), [0, 2, 1, 3]), vl, assert_trivial=True)
    mk = gl.convert_layout(wms.index(s).load(ml2), gl.SliceLayout(1, gl4), assert_trivial=True)
    return v, mk


@gluon.jit
def _main_loop_tma(xd, wvd, wmd, tab_cl, tab_kk, i0, i1, m0, r0, ASM: gl.constexpr, R: gl.constexpr,
                   BM: gl.constexpr, DT: gl.constexpr, NS: gl.constexpr, acc_l: gl.constexpr, a_l: gl.constexpr,
                   vl: gl.constexpr, gl4: gl.constexpr, vl2: gl.constexpr, ml2: gl.constexpr):
    """K steps [i0, i1) with every operand brought by TMA into an NS-stage ring (x pre-permuted to the fragments' K
    order by the launcher): NS - 1 steps are in flight while a step is decoded from shared memory and multiplied, and
    no register holds a prefetched operand. Stage (j - 1) % NS is refilled once every warp has passed the wait for
    wgmma j - 1 (its last reader) -- the one CTA barrier of a step."""
    xs, wvs, wms = _alloc_ring(xd, wvd, wmd, NS)
    bars = _new_barriers(NS)
    fence_async_shared()
    for q in gl.static_range(NS - 1):
        _tma_stage(xd, wvd, wmd, xs, wvs, wms, bars, q, i0 + q, i0 + q < i1, m0, r0)
    acc = warpgroup_mma_init(gl.zeros([R, BM], gl.float32, layout=acc_l))
    for i in range(i0, i1):
        j = i - i0
        s = j % NS
        mbarrier.wait(bars.index(s), (j // NS) & 1)
        v, mk = _read_w(wvs, wms, s, R, vl, gl4, vl2, ml2)
        a = _decode(v, mk, tab_cl, tab_kk, ASM, R, DT, gl4, a_l)
        acc = warpgroup_mma_wait(0, deps=[acc])
        acc = warpgroup_mma(a, xs.index(s).permute((1, 0)), acc, is_async=True)
        gl.thread_barrier()
        _tma_stage(xd, wvd, wmd, xs, wvs, wms, bars, (j + NS - 1) % NS, i + NS - 1, i + NS - 1 < i1, m0, r0)
    acc = warpgroup_mma_wait(0, deps=[acc])
    for q in gl.static_range(NS):
        mbarrier.invalidate(bars.index(q))
    return acc


@gluon.jit
def _ws_loader(xd, wvd, wmd, xs, wvs, wms, ready, empty, i0, i1, m0, r0, NS: gl.constexpr):
    """Producer partition (one warp; the ws and dp loops): fills stage j % NS with K step i0 + j as soon as the
    consumers have released it (``empty``: they arrive once the wgmma that read it has completed); up to NS steps in
    flight."""
    for j in range(i1 - i0):
        s = j % NS
        mbarrier.wait(empty.index(s), ((j // NS) & 1) ^ 1)   # a fresh barrier counts as released (phase 1 done)
        _tma_stage(xd, wvd, wmd, xs, wvs, wms, ready, s, i0 + j, True, m0, r0)


@gluon.jit
def _ws_consumer(xs, wvs, wms, ready, empty, tab_cl, tab_kk, i0, i1, ASM: gl.constexpr, R: gl.constexpr,
                 BM: gl.constexpr, DT: gl.constexpr, NS: gl.constexpr, acc_l: gl.constexpr, a_l: gl.constexpr,
                 vl: gl.constexpr, gl4: gl.constexpr, vl2: gl.constexpr, ml2: gl.constexpr):
    """Default partition (the NW decode warps): wait for a stage, decode its W from shared memory, issue the wgmma;
    once wgmma j - 1 has completed, release its stage to the loader. No CTA barrier in the loop."""
    acc = warpgroup_mma_init(gl.zeros([R, BM], gl.float32, layout=acc_l))
    for j in range(i1 - i0):
        s = j % NS
        mbarrier.wait(ready.index(s), (j // NS) & 1)
        v, mk = _read_w(wvs, wms, s, R, vl, gl4, vl2, ml2)
        a = _decode(v, mk, tab_cl, tab_kk, ASM, R, DT, gl4, a_l)
        acc = warpgroup_mma_wait(0, deps=[acc])
        # stage (j - 1) % NS: its W was read in the previous trip, its x by wgmma j - 1 (completed): release it
        fence_async_shared()
        mbarrier.arrive(empty.index((j + NS - 1) % NS), count=1, pred=j > 0)
        acc = warpgroup_mma(a, xs.index(s).permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=[acc])
    return (acc,)   # a partition's results travel as a tuple


@gluon.jit
def _main_loop_ws(xd, wvd, wmd, tab_cl, tab_kk, i0, i1, m0, r0, ASM: gl.constexpr, R: gl.constexpr,
                  BM: gl.constexpr, DT: gl.constexpr, NS: gl.constexpr, acc_l: gl.constexpr, a_l: gl.constexpr,
                  vl: gl.constexpr, gl4: gl.constexpr, vl2: gl.constexpr, ml2: gl.constexpr):
    """The TMA ring with a warp-specialised loader (config ``ws``, refused by the launcher: wrong results on the H100
    in session 12, see wgmma_linear): one extra warp issues the TMA loads, gated by per-stage ``empty`` barriers,
    instead of the decode warps after a CTA barrier."""
    xs, wvs, wms = _alloc_ring(xd, wvd, wmd, NS)
    ready = _new_barriers(NS)
    empty = _new_barriers(NS)
    fence_async_shared()
    acc = gl.warp_specialize([
        (_ws_consumer, (xs, wvs, wms, ready, empty, tab_cl, tab_kk, i0, i1, ASM, R, BM, DT, NS, acc_l, a_l, vl, gl4,
                        vl2, ml2)),
        (_ws_loader, (xd, wvd, wmd, xs, wvs, wms, ready, empty, i0, i1, m0, r0, NS)),
    ], [1], [40])
    for q in gl.static_range(NS):   # every load has landed and been consumed: the barriers' memory may be reused
        mbarrier.invalidate(ready.index(q))
        mbarrier.invalidate(empty.index(q))
    return acc[0]


@gluon.jit
def _dp_decoder(wvs, wms, a_s, loaded, decoded, tab_ptr, K, i0, i1, q0, ASM: gl.constexpr, R: gl.constexpr,
                DT: gl.constexpr, NS: gl.constexpr, DP: gl.constexpr, a_l: gl.constexpr, vl: gl.constexpr,
                gl4: gl.constexpr, vl2: gl.constexpr, ml2: gl.constexpr):
    """dp decoder partition (one warpgroup; with DP of them, this one takes the steps j = q0 mod DP): wait for a
    stage's W, decode it in registers (the ring kernel's decode) and store the A tile [R, 128] into the stage's
    NVMMA-swizzled A buffer for the MMA warps' wgmma."""
    tab_cl, tab_kk = _load_table(tab_ptr, K, R, gl4)   # (loaded by the partition itself)
    for j in range(q0, i1 - i0, DP):
        s = j % NS
        mbarrier.wait(loaded.index(s), (j // NS) & 1)
        v, mk = _read_w(wvs, wms, s, R, vl, gl4, vl2, ml2)
        a = _decode(v, mk, tab_cl, tab_kk, ASM, R, DT, gl4, a_l)
        a_s.index(s).store(a)
        fence_async_shared()
        mbarrier.arrive(decoded.index(s))   # (after a barrier of this partition's threads: every store is done)


@gluon.jit
def _dp_mma(xs, a_s, loaded, decoded, free, i0, i1, R: gl.constexpr, BM: gl.constexpr, NS: gl.constexpr,
            acc_l: gl.constexpr):
    """dp default partition (the MMA warpgroup): wgmma of each stage's decoded A tile and x tile, one in flight;
    once wgmma j - 1 has completed, its stage goes back to the loader."""
    acc = gl.zeros([R, BM], gl.float32, layout=acc_l)   # (a plain tensor: the loop carries the waited value)
    for j in range(i1 - i0):
        s = j % NS
        ph = (j // NS) & 1
        mbarrier.wait(loaded.index(s), ph)    # the x tile (its TMA completion seen by these warps too)
        mbarrier.wait(decoded.index(s), ph)
        acc = warpgroup_mma(a_s.index(s), xs.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=[acc])
        mbarrier.arrive(free.index((j + NS - 1) % NS), pred=j > 0)
    acc = warpgroup_mma_wait(0, deps=[acc])
    return (acc,)


@gluon.jit
def _main_loop_dp(xd, wvd, wmd, tab_ptr, K, i0, i1, m0, r0, ASM: gl.constexpr, R: gl.constexpr, BM: gl.constexpr,
                  DT: gl.constexpr, NS: gl.constexpr, DP: gl.constexpr, acc_l: gl.constexpr, a_l: gl.constexpr,
                  vl: gl.constexpr, gl4: gl.constexpr, vl2: gl.constexpr, ml2: gl.constexpr, xs_l: gl.constexpr):
    """Decode-producer loop (config ``dp``, off: measured slower, see pick_config): DP decoder warpgroups turn the
    ring's packed W into A tiles in shared memory while the kernel's own warpgroup only issues wgmma (A and x from
    shared memory), so the decode's latency no longer sits between two wgmma; a loader warp keeps the ring full."""
    xs, wvs, wms = _alloc_ring(xd, wvd, wmd, NS)
    a_s = gl.allocate_shared_memory(DT, [NS, R, 128], xs_l)
    loaded = _new_barriers(NS)
    decoded = _new_barriers(NS)
    free = _new_barriers(NS)
    fence_async_shared()
    if DP == 1:
        acc = gl.warp_specialize([
            (_dp_mma, (xs, a_s, loaded, decoded, free, i0, i1, R, BM, NS, acc_l)),
            (_dp_decoder, (wvs, wms, a_s, loaded, decoded, tab_ptr, K, i0, i1, 0, ASM, R, DT, NS, DP, a_l, vl, gl4,
                           vl2, ml2)),
            (_ws_loader, (xd, wvd, wmd, xs, wvs, wms, loaded, free, i0, i1, m0, r0, NS)),
        ], [4, 1], [_DP_DEC_REGS, 40])
    else:
        acc = gl.warp_specialize([
            (_dp_mma, (xs, a_s, loaded, decoded, free, i0, i1, R, BM, NS, acc_l)),
            (_dp_decoder, (wvs, wms, a_s, loaded, decoded, tab_ptr, K, i0, i1, 0, ASM, R, DT, NS, DP, a_l, vl, gl4,
                           vl2, ml2)),
            (_dp_decoder, (wvs, wms, a_s, loaded, decoded, tab_ptr, K, i0, i1, 1, ASM, R, DT, NS, DP, a_l, vl, gl4,
                           vl2, ml2)),
            (_ws_loader, (xd, wvd, wmd, xs, wvs, wms, loaded, free, i0, i1, m0, r0, NS)),
        ], [4, 4, 1], [_DP_DEC_REGS, _DP_DEC_REGS, 40])
    for q in gl.static_range(NS):
        mbarrier.invalidate(loaded.index(q))
        mbarrier.invalidate(decoded.index(q))
        mbarrier.invalidate(free.index(q))
    return acc[0]


@gluon.jit
def _out_chunk(x_ptr, ov_ptr, oi_ptr, r_o, m_o, slot, s_hi, c_lo, c_hi, M, NO, XS: gl.constexpr,
               OB: gl.constexpr, OK: gl.constexpr):
    """One chunk of outlier slots [R, OC] (0 past s_hi or outside the CTA's columns) and x at their columns
    [R, OC, TB] (slot o of a row is in block o // OK)."""
    ov = gl.load(ov_ptr + r_o * NO + slot, mask=slot < s_hi, other=0)
    oi = gl.load(oi_ptr + r_o * NO + slot, mask=slot < s_hi, other=0)
    col = (slot // OK) * OB + (oi.to(gl.int32) & 0xFFFF)
    ok = (slot < s_hi) & (col >= c_lo) & (col < c_hi)
    return ov, _x_at(x_ptr, col, m_o, ok, M, XS)


# ------------------------------------------------------------------------------------------------------ launcher
_LAYOUTS: dict = {}
_COUNTERS: dict = {}


def _counters(device: torch.device) -> torch.Tensor:
    """The split-K tile counters on ``device``: zeros, made once before any CUDA-graph capture (prepare_device); every
    call leaves them at zero (the last CTA of a tile resets its counter)."""
    key = str(device)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def prepare_device(device: torch.device) -> None:
    _table(device)
    _counters(device)


def layouts(NW: int, BM: int):
    if (NW, BM) not in _LAYOUTS:
        _LAYOUTS[(NW, BM)] = make_layouts(NW, BM)
    return _LAYOUTS[(NW, BM)]


def tma_layouts(NW: int):
    if ("tma", NW) not in _LAYOUTS:
        _LAYOUTS[("tma", NW)] = make_tma_layouts(NW)
    return _LAYOUTS[("tma", NW)]


# CTAs the chip should have at once: 132 SMs x 2 (the launch shapes below hold ~150 registers per thread, 2-3
# CTAs of 4 warps per SM).
_CTAS_TO_FILL = 132 * 2
_SMALL_LAYER_WEIGHTS = 24 * 2**20  # below: a small layer (8B o 16.8M weights; 8B qkv 25.2M is not)
MAX_TILES = 1 << 16  # split-K counters per device (one per output tile of a call)


def pick_config(M: int, N: int, K: int, tma: bool | None = None, dp: int = 0, BM: int | None = None) -> dict:
    """Launch shape by M class: BM (tokens per CTA, the wgmma N) = the smallest of 32 / 64 / 128 that holds M (larger
    M: several token blocks); the loop -- ``tma`` (None: :func:`use_tma`; a caller may force either) -- and, for that
    loop, NW warps (16 rows each), SPLIT (CTAs per tile along K) and the ring's ``stages``.

    * TMA ring (H200, every Llama-3 8B / 70B shape, interleaved in one run: kernels_h200.json on 6147ef3): the
      register-staged loop took 1.05-1.46x the ring's time at M = 128, 1.01-1.26x at M = 64, 1.11-1.25x at M = 32 on
      the layers of >= 32M weights (bare 1.10-1.67x, 1.09-1.47x, 1.21-1.47x). Below 32M weights at M <= 32 the ring
      measured 1.03-1.14x the old loop's time (raw/h200/tma_variants.json: the permute of x is one more launch). 4
      warps: 8 measured 0.97-1.24x their time at M 64-256 (slower on 20 of 21 shapes x M). SPLIT: whole waves
      (:func:`wave_split`) -- ncu on 8B qkv M = 128 with the fill rule's SPLIT = 3: 288 CTAs on 264 slots, SMs active
      56% of the time.
    * Register-staged loop (K not a multiple of 128, small layers at M <= 32): H200 sweep
      (benchmarks/results/raw/h200/wg_bench_*.json): NW = 8 where that leaves ~200 tiles (8B gate_up M = 64 0.42x
      vs 0.35x cuBLAS with 4 warps); SPLIT so that tiles x SPLIT fill the chip (8B o M = 32: 0.33x cuBLAS with SPLIT
      = 1, 0.99x with 4).
    """
    BM = BM or (32 if M <= 32 else 64 if M <= 64 else 128)
    steps = -(-K // fr.STEP_COLS)
    blocks = -(-M // BM)
    if tma is None:
        tma = use_tma(BM, N, K)
    if tma and dp:
        # one CTA per SM (the ring's stages hold the decoded A tiles too)
        NW = 4
        stages = dp_stages(BM)
        split = wave_split((N // 64) * blocks, steps, _SMS)
    elif tma:
        NW = 4
        stages = tma_stages(NW, BM)
        # CTAs per SM: the shared memory the ring leaves; at BM 128 also the registers (176-244 per thread as the
        # H200 host compiles it, benchmarks/gpu/kernel_resources.py)
        per_sm = min(2 if BM == 128 else 8, _SMEM_PER_SM // (stages * _stage_bytes(NW, BM) + 2048))
        split = wave_split((N // (16 * NW)) * blocks, steps, _SMS * per_sm)
    else:
        # 8 warps (128-row tiles, x staged once for twice the rows) where that still leaves ~200 tiles
        NW = 8 if BM >= 64 and N % 128 == 0 and (N // 128) * blocks >= 200 else 4
        split = max(1, min(steps // 4, round(_CTAS_TO_FILL / ((N // (16 * NW)) * blocks))))
        stages = 0
    # Outliers as their own pass first (outliers.py), except on small layers at M <= 32, where the pass's fixed cost
    # (two more launches) outweighs it. H200, kernels_h200.json (same run, PRE vs in-kernel): M = 64 8B gate_up 102.3
    # vs 159.6 us, 8B o 24.4 vs 30.8 us; M = 32 8B qkv 32.4 vs 35.8 us, 8B o (16.8M weights) 22.7 vs 21.7 us.
    pre = M > 32 or N * K >= _SMALL_LAYER_WEIGHTS
    # pf: L2 prefetch of W that many K steps ahead (0 = off; a variant under test, see gluon_nm16._l2_prefetch)
    # xc: x loads without row masks when M is not a multiple of BM (rows past M re-read row M - 1; a variant under
    # test). (The launcher drops SPLIT past MAX_TILES.)
    # ws: the TMA ring's loads from a warp-specialised loader warp (_main_loop_ws; refused by the launcher: wrong
    # results on the H100 in session 12)
    # dp: decoder warpgroups (1 or 2) feeding an MMA warpgroup through shared memory (_main_loop_dp; correct on the
    # H100, 1.2-2.4x slower than main's choice at M 64-1024 except ~equal to the scratch path at M = 256: off)
    return {"BM": BM, "NW": NW, "SPLIT": split, "PRE": pre, "pf": 0, "xc": False, "tma": tma, "stages": stages,
            "ws": False, "dp": dp if tma else 0}


_SMS = 132                   # the H200's SMs
# dp: registers per thread at launch (one CTA per SM: 4 MMA + 4 per decoder + 4 loader warps share 64K)
_DP_MAXNREG = {1: 168, 2: 128}
_SMEM_PER_SM = 228 * 1024    # shared memory per SM (227 KB per block at most)
# Shared memory the TMA ring may take per CTA: two CTAs per SM, so that while one CTA decodes the other's loads are in
# flight.
_TMA_RING_BYTES = 110 * 1024
# Smallest layer (N * K weights) for which the TMA ring runs at BM = 32 (8B qkv 25.2M: 1.03x the register-staged
# loop's time, 8B gate_up 117M: 0.93x; tma_variants.json)
_TMA_MIN_WEIGHTS_BM32 = 32 * 2**20


def use_tma(BM: int, N: int, K: int) -> bool:
    """Whether the TMA ring runs by default: K a multiple of 128 (whole K steps), from BM = 64 on, or at BM = 32 on
    layers of >= _TMA_MIN_WEIGHTS_BM32 weights."""
    return K % fr.STEP_COLS == 0 and (BM >= 64 or N * K >= _TMA_MIN_WEIGHTS_BM32)


def _stage_bytes(NW: int, BM: int) -> int:
    """One K step in the ring: the x tile [BM, 128] (2 B each) and the CTA's W values + masks (36 words per row)."""
    return BM * 128 * 2 + 16 * NW * (32 + 4) * 4


def dp_stages(BM: int) -> int:
    """Ring stages of the dp loop (one CTA per SM): x tile, packed W and the decoded A tile [64, 128] per stage."""
    return max(2, min(4, (_SMEM_PER_SM - 8 * 1024) // (_stage_bytes(4, BM) + 64 * 128 * 2)))


def tma_stages(NW: int, BM: int) -> int:
    """K steps in the TMA ring (config ``stages`` 0): as many as fit _TMA_RING_BYTES, 2 to 4 (BM 32: 4 stages
    measured 0.94-1.00x the time of 6 on all 7 Llama-3 shapes, tma_variants.json)."""
    return max(2, min(4, _TMA_RING_BYTES // _stage_bytes(NW, BM)))


# K steps' worth of time a CTA spends before its first step (the ring's fill: a memory round trip)
_RING_FILL_STEPS = 3


def wave_split(tiles: int, steps: int, slots: int) -> int:
    """CTAs per tile along K: the SPLIT (1 .. steps // 8: >= 8 K steps per CTA keep the ring busy) whose CTAs run in
    the fewest step-times -- ceil(tiles * SPLIT / slots) waves of ceil(steps / SPLIT) + _RING_FILL_STEPS each -- the
    smallest SPLIT within 5% of the best (each more split adds a partial sum to the fix-up). Without the fill term,
    8B gate_up M = 64 / 128 took SPLIT 4: 108.7 / 177.2 us against 96.5 / 164.7 us with SPLIT 1 (H200)."""
    cost = {sp: -(-tiles * sp // slots) * (-(-steps // sp) + _RING_FILL_STEPS)
            for sp in range(1, max(1, steps // 8) + 1)}
    best = min(cost.values())
    return min(sp for sp, c in cost.items() if c <= best * 1.05)


def can_implement(M: int, N: int, K: int, n: int, m: int, x: torch.Tensor, values: torch.Tensor,
                  positions: torch.Tensor) -> tuple[bool, str]:
    """Whether the kernel can compute this call, and why not: the mma_v2 kernel's conditions (8:16, dtypes, int16
    masks, K % 32), plus sm_90 (wgmma), N % 64 (64-row tiles) and N + K < 2**30 (the table-offset trick)."""
    ok, why = _can_run(N, K, n, m, x, values, positions)
    if not ok:
        return ok, why
    if N % 64:
        return False, f"N={N} (multiple of 64)"
    if N + K >= 2**30:
        return False, f"N + K = {N + K} >= 2**30"
    if torch.cuda.get_device_capability(x.device)[0] != 9:
        return False, "needs an sm_90 GPU (wgmma)"
    return True, ""


def wgmma_linear(x2d: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, outlier_values, outlier_index,
                 scale, shift, bias, *, outlier_block: int, outliers_per_block: int, in_features: int,
                 out_features: int, config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``y = scale * (x @ W_nm.T) + x @ W_out.T + shift + bias`` (as gluon_nm16.fragment_linear) for any M; tuned
    for M 17..256."""
    M, K = x2d.shape
    N = out_features
    can = can_implement(M, N, K, 8, 16, x2d, values, positions)
    x2d, y = launch_inputs("wgmma", can, x2d, values, positions, N, out)
    if M == 0:
        return y
    cfg = pick_config(M, N, K, tma=(config or {}).get("tma"), dp=int((config or {}).get("dp") or 0),
                      BM=(config or {}).get("BM"))
    cfg.update({k: v for k, v in (config or {}).items() if k in cfg and v is not None})
    BM, NW = cfg["BM"], cfg["NW"]
    if NW not in (4, 8) or N % (16 * NW) or BM not in (8, 16, 32, 64, 128, 256):
        # (a CTA owns 16 * NW whole rows: N not a multiple would leave rows unwritten)
        raise ValueError(f"nm16 wgmma kernel: config NW={NW}, BM={BM} for N={N} (NW 4 or 8 with N a multiple of "
                         f"16 * NW; BM 8-256, a power of two)")
    use_tma = bool(cfg["tma"]) and K % fr.STEP_COLS == 0
    dp = int(cfg["dp"])
    if cfg["ws"]:
        # Session 12, H100: wrong results at BM 128 with 4 ring stages and in an fp16 split-K case with the outlier
        # pass (right at BM 64 / 4 stages, BM 128 / 2 stages, M 17): benchmarks/results/raw/h100_s12/
        # ws_narrowing_h100.txt. The loop stays for that debugging; no caller may run it until then.
        raise ValueError("nm16 wgmma kernel: config ws is disabled: it gave wrong results on the H100 (session 12, "
                         "benchmarks/results/raw/h100_s12/ws_narrowing_h100.txt)")
    if dp and not use_tma:
        raise ValueError(f"nm16 wgmma kernel: dp (decoder warpgroups) needs the TMA ring (tma and K % 128 == 0; "
                         f"K={K})")
    if dp and (dp not in (1, 2) or NW != 4 or BM * dp > 256):
        # (dp 2 at BM 256: 16 warps leave 128 registers per thread, the 64 x 256 wgmma's accumulator alone takes 128)
        raise ValueError(f"nm16 wgmma kernel: dp={dp} at BM={BM} (1 or 2 decoder warpgroups, with NW 4; 2 only up "
                         f"to BM 128)")
    S = -(-K // fr.STEP_COLS)
    split = max(1, min(cfg["SPLIT"], S))
    grid = (N // (16 * NW), -(-M // BM), split)
    if grid[0] * grid[1] > MAX_TILES:
        split, grid = 1, grid[:2] + (1,)
    has_out, pre = outlier_pass(bool(cfg["PRE"]), x2d, outlier_values, outlier_index, N, outlier_block,
                                outliers_per_block, in_features)
    DT = gl.bfloat16 if x2d.dtype == torch.bfloat16 else gl.float16
    NO = (in_features // outlier_block) * outliers_per_block if has_out else 0
    even_k = K % fr.STEP_COLS == 0
    xc = bool(cfg["xc"]) and M % BM != 0  # x loads without row masks (rows past M re-read row M - 1, never stored)
    ws = torch.empty((split, M, N), dtype=torch.float32, device=x2d.device) if split > 1 else y
    descs, NS, tma_l = (None, None, None), 0, (None, None)
    if use_tma:
        NS = int(cfg["stages"]) or (dp_stages(BM) if dp else tma_stages(NW, BM))
        if not 2 <= NS <= 8:
            raise ValueError(f"nm16 wgmma kernel: stages={NS} (2-8)")
        vl2, ml2, wv_s, wm_s = tma_layouts(NW)
        R = 16 * NW
        descs = (TensorDescriptor.from_tensor(fr.permute_x(x2d), [BM, fr.STEP_COLS], layouts(NW, BM)[6]),
                 TensorDescriptor.from_tensor(values.view(torch.int32), [R, 32], wv_s),
                 TensorDescriptor.from_tensor(positions.view(torch.int32), [R, 4], wm_s))
        tma_l = (vl2, ml2)
    nm16_wgmma_kernel[grid](
        x2d, x2d.view(torch.int32), values.view(torch.int32), positions.view(torch.int32), _table(x2d.device),
        outlier_values if has_out else y, outlier_index if has_out else y, scale if scale is not None else y,
        shift if shift is not None else y, bias if bias is not None else y, pre if pre is not None else y, y, ws,
        _counters(x2d.device), *descs, M, N, K, S, y.stride(0), NO, x2d.stride(0),
        _ASM, DT, NW, BM, split, even_k, even_k and (M % BM == 0 or xc),
        has_out, pre is not None, outlier_block if has_out else 1, outliers_per_block if has_out else 1,
        scale is not None, shift is not None, bias is not None, int(cfg["pf"]), xc,
        *layouts(NW, BM), use_tma, NS, *tma_l, bool(cfg["ws"]), dp, num_warps=NW,
        # ws: the kernel runs NW + 4 warps (the loader's warpgroup); 128 registers each at launch keeps two CTAs per
        # SM, and the decode warps take the loader's share back (setmaxnreg: up to 232)
        **({"maxnreg": 128} if cfg["ws"] else {"maxnreg": _DP_MAXNREG[dp]} if dp else {}))
    return y
