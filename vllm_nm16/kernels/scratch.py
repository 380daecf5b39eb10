"""Large-M path: decode the layer into a transient dense scratch with one memory-bound Triton pass, then cuBLAS.

Why: for M >= ~32 rows of x the fused tile-decode kernel (``_nm16_dot_kernel``) measured 0.16-0.65x cuBLAS bare and
0.02-0.17x with the default outliers on the H100 (benchmarks/results/kernels_h100.md, docs/KERNELS.md): decoding
in registers costs more instructions than the tensor cores leave free. At large M the weight is reused M times, so
decoding it once per call into a scratch buffer is cheap next to the GEMM: the pass reads the packed bytes
(0.5625 of dense) and writes one dense weight, then cuBLAS runs at dense speed.

What it costs and what it does not: no dense weight is *kept* -- the scratch lives only for the one call (the
caching allocator, or the CUDA-graph pool, reuses the same block for every layer), so the peak extra memory is one
dense copy of the largest layer (235 MB for Llama-3-8B's gate_up at bf16).

* ``_unpack_kernel``: each program owns BR rows x BG groups; per kept value it computes its column (the same
  position decode as the gemv kernel: LUT16 / NIBBLE32 / BYTE, see layout.py) and scatter-stores the value (times the
  row's scale, which the format applies to the N:M part only) into a zero-filled scratch.
* ``_add_outliers_kernel``: a second launch adds the structured outliers (k per (row, B-block); offsets inside a
  block are distinct, so no two lanes of one launch touch the same element; the launch boundary orders it after the
  scatter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vllm_nm16.kernels.layout import lut_for
from vllm_nm16.kernels.triton_nm16 import _POS_MODE_OF_DTYPE, _group_words


@triton.jit
def _unpack_kernel(wv_ptr, wm_ptr, lut_ptr, scale_ptr, w_ptr, N, G, K,
                   NK: tl.constexpr, MG: tl.constexpr, POS_MODE: tl.constexpr, HAS_SCALE: tl.constexpr,
                   BR: tl.constexpr, BG: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    g = tl.program_id(1) * BG + tl.arange(0, BG)
    i = tl.arange(0, NK)
    rmask = r < N
    g_ok = g < G
    m2 = rmask[:, None] & g_ok[None, :]
    m3 = m2[:, :, None]
    r64 = r.to(tl.int64)
    vidx = (r64[:, None, None] * G + g[None, :, None]) * NK + i[None, None, :]
    v = tl.load(wv_ptr + vidx, mask=m3, other=0.0)
    if POS_MODE < 2:     # 8:16: nibble word per group (bitmask through the byte LUT, or stored), as the GEMM kernels
        word = _group_words(wm_ptr, lut_ptr, tl.minimum(r, N - 1), g, g_ok, G, POS_MODE)
        pos = (word[:, :, None] >> (4 * i)[None, None, :]) & 15
    else:                # one uint8 position per kept value
        pos = tl.load(wm_ptr + vidx, mask=m3, other=0).to(tl.int32)
    if HAS_SCALE:
        s = tl.load(scale_ptr + r, mask=rmask, other=1.0)
        v = v.to(tl.float32) * s[:, None, None]
    col = g[None, :, None] * MG + pos
    tl.store(w_ptr + r64[:, None, None] * K + col, v.to(w_ptr.dtype.element_ty), mask=m3)


@triton.jit
def _add_outliers_kernel(ov_ptr, oi_ptr, w_ptr, N, NB, K,
                         OK: tl.constexpr, OKP: tl.constexpr, OB: tl.constexpr, BR: tl.constexpr,
                         BB: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    b = tl.program_id(1) * BB + tl.arange(0, BB)
    j = tl.arange(0, OKP)
    m3 = (r < N)[:, None, None] & (b < NB)[None, :, None] & (j < OK)[None, None, :]
    r64 = r.to(tl.int64)
    idx = (r64[:, None, None] * NB + b[None, :, None]) * OK + j[None, None, :]
    ov = tl.load(ov_ptr + idx, mask=m3, other=0.0).to(tl.float32)
    off = tl.load(oi_ptr + idx, mask=m3, other=0).to(tl.int32)
    addr = w_ptr + r64[:, None, None] * K + b[None, :, None] * OB + off
    cur = tl.load(addr, mask=m3, other=0.0).to(tl.float32)
    tl.store(addr, (cur + ov).to(w_ptr.dtype.element_ty), mask=m3)


def unpack_to_dense(wv, wm, ov, oi, scale, *, n: int, m: int, outlier_block: int | None, outliers_per_block: int,
                    in_features: int, out_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The layer's effective weight ``scale * W_nm + W_out`` as a fresh dense [out, in] tensor of ``dtype``."""
    N, K = out_features, in_features
    G = K // m
    w = torch.zeros((N, K), dtype=dtype, device=wv.device)
    pos_mode = _POS_MODE_OF_DTYPE[wm.dtype]
    lut = lut_for(wv.device) if pos_mode == 0 else wm
    BR, BG = 16, 32
    _unpack_kernel[(triton.cdiv(N, BR), triton.cdiv(G, BG))](
        wv, wm, lut, scale if scale is not None else wv, w, N, G, K, NK=n, MG=m, POS_MODE=pos_mode,
        HAS_SCALE=scale is not None, BR=BR, BG=BG, num_warps=4)
    if outliers_per_block:
        NB = K // outlier_block
        BB = 8
        _add_outliers_kernel[(triton.cdiv(N, BR), triton.cdiv(NB, BB))](
            ov, oi, w, N, NB, K, OK=outliers_per_block, OKP=triton.next_power_of_2(outliers_per_block),
            OB=outlier_block, BR=BR, BB=BB, num_warps=4)
    return w


def scratch_linear(x2d, wv, wm, ov, oi, scale, shift, bias, *, n, m, outlier_block, outliers_per_block, in_features,
                   out_features, out=None):
    w = unpack_to_dense(wv, wm, ov, oi, scale, n=n, m=m, outlier_block=outlier_block,
                        outliers_per_block=outliers_per_block, in_features=in_features, out_features=out_features,
                        dtype=x2d.dtype)
    b = None
    if shift is not None:
        b = shift.to(x2d.dtype)
    if bias is not None:
        b = bias.to(x2d.dtype) if b is None else b + bias.to(x2d.dtype)
    if out is None:
        return F.linear(x2d, w, b)
    torch.matmul(x2d, w.t(), out=out)
    if b is not None:
        out.add_(b)
    return out
