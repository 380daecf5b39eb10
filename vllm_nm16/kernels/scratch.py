"""Large-M path: decode the layer into a transient dense scratch with one memory-bound Triton pass, then cuBLAS.

Why: for M >= ~32 rows of x the fused tile-decode kernel (``_nm16_dot_kernel``) measured 0.16-0.65x cuBLAS bare and
0.02-0.17x with the default outliers on the H100 (benchmarks/results/kernels_h100.md, docs/KERNELS.md): decoding
in registers costs more instructions than the tensor cores leave free. At large M the weight is reused M times, so
decoding it once per call into a scratch buffer is cheap next to the GEMM: the pass reads the packed bytes
(0.5625 of dense) and writes one dense weight, then cuBLAS runs at dense speed.

What it costs and what it does not: no dense weight is *kept* -- the scratch lives only for the one call (the
caching allocator, or the CUDA-graph pool, reuses the same block for every layer), so the peak extra memory is one
dense copy of the largest layer (235 MB for Llama-3-8B's gate_up at bf16).

* ``_unpack_kernel``: each program decodes a [rows x cols] tile in registers (the dot kernel's decode: no gathers,
  no shared memory), merges the tile's structured outliers and the row scale, and writes the tile with full,
  contiguous row-segment stores. One pass, no zero fill: it reads the packed bytes once and writes the dense bytes
  once. (The first version scatter-stored each kept value into a zeroed buffer and added outliers in a second
  read-modify-write launch: ~0.2 TB/s on the H100.)
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from vllm_nm16.kernels.layout import lut_for
from vllm_nm16 import envs
from vllm_nm16.kernels.common import output_bias
from vllm_nm16.kernels.triton_decode import _POS_MODE_OF_DTYPE, _decode_tile_816, _group_words, _positions

# Dense bytes decoded per chunk (see scratch_linear); 0 = the whole layer at once. Chunks bound the scratch memory
# but cost time: on the H100, 4-32 MB chunks were never faster than one pass (0-190% slower, 8B shapes, M 16-4096)
# (benchmarks/results/raw/h100_lab/scratch_lab2_h100.json): small unpack grids, no measurable L2 reuse.
# NM16_SCRATCH_CHUNK_MB sets it.


@triton.jit
def _unpack_kernel(wv_ptr, wm_ptr, lut_ptr, scale_ptr, ov_ptr, oi_ptr, w_ptr, N, G, K,
                   NK: tl.constexpr, MG: tl.constexpr, POS_MODE: tl.constexpr, HAS_SCALE: tl.constexpr,
                   HAS_OUT: tl.constexpr, OB: tl.constexpr, OK: tl.constexpr,
                   BR: tl.constexpr, BG: tl.constexpr):
    """Dense rows [BR] x columns [BG*MG] of ``scale * W_nm + W_out``, decoded in registers, stored contiguously.

    The tile is decoded like the dot kernel's (8:16: the register-only split/select/join decode; other N:M: compare
    each kept value's position with the group's columns), so every store is a full, coalesced row segment and the
    scratch needs no zero fill. Outliers are merged into the tile before the store (the launcher makes the tile lie
    inside one outlier block), so no second read-modify-write pass over the scratch is needed."""
    BK: tl.constexpr = BG * MG
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    g = tl.program_id(1) * BG + tl.arange(0, BG)
    i = tl.arange(0, NK)
    r_ld = tl.minimum(r, N - 1)          # clamped rows re-read a valid row; their stores are masked
    g_ok = g < G
    r64 = r_ld.to(tl.int64)
    v = tl.load(wv_ptr + (r64[:, None, None] * G + g[None, :, None]) * NK + i[None, None, :],
                mask=g_ok[None, :, None], other=0.0)
    if HAS_SCALE:   # the format's scale multiplies the N:M part only: apply it to the values before decoding
        v = v.to(tl.float32) * tl.load(scale_ptr + r_ld)[:, None, None]
    v = v.to(w_ptr.dtype.element_ty)
    if NK == 8 and MG == 16 and POS_MODE != 2:
        dense = _decode_tile_816(_group_words(wm_ptr, lut_ptr, r_ld, g, g_ok, G, POS_MODE), v, BR, BG)
    else:
        pos = _positions(wm_ptr, lut_ptr, r_ld, g, g_ok, G, NK, POS_MODE)
        hit = pos[:, :, :, None] == tl.arange(0, MG)[None, None, None, :]
        dense = tl.sum(tl.where(hit, v.to(tl.float32)[:, :, :, None], 0.0), axis=2)
        dense = tl.reshape(dense, (BR, BK)).to(w_ptr.dtype.element_ty)
    c0 = tl.program_id(1) * BK
    k = tl.arange(0, BK)
    if HAS_OUT:
        # The tile's columns lie in outlier block c0 // OB (launcher: OB % BK == 0); add that block's OK outliers
        # of each row where their column falls inside the tile (one compare + select per outlier and element).
        blk = c0 // OB
        KO = (K // OB) * OK
        local_base = blk * OB - c0
        tile = dense.to(tl.float32)
        if OK <= 16:  # the usual budgets (4/256, 3/192): unrolled
            for t in tl.static_range(OK):
                tile = _add_outlier(tile, ov_ptr, oi_ptr, r64 * KO + blk * OK + t, local_base, k)
        else:  # a loop: unrolling thousands of slots (the format allows k < B) made the compile time out
            for t in range(OK):
                tile = _add_outlier(tile, ov_ptr, oi_ptr, r64 * KO + blk * OK + t, local_base, k)
        dense = tile.to(w_ptr.dtype.element_ty)
    cols = c0 + k
    tl.store(w_ptr + r.to(tl.int64)[:, None] * K + cols[None, :], dense,
             mask=(r < N)[:, None] & (cols < K)[None, :])


@triton.jit
def _add_outlier(tile, ov_ptr, oi_ptr, o_off, local_base, k):
    """One outlier slot of each row of ``tile``, added where its column falls inside the tile."""
    ov = tl.load(ov_ptr + o_off).to(tl.float32)
    col = local_base + (tl.load(oi_ptr + o_off).to(tl.int32) & 0xFFFF)
    return tl.where(col[:, None] == k[None, :], tile + ov[:, None], tile)


def _tile_groups(m: int, outlier_block: int | None, has_out: bool, want_cols: int) -> int:
    """Groups per tile: ``want_cols`` columns, a power of two, and (with outliers) a divisor of the outlier block so
    each tile lies inside one block."""
    cols = want_cols
    if has_out:
        cols = min(cols, outlier_block & -outlier_block)   # largest power of two dividing the block
    return max(1, cols // m)


def unpack_to_dense(values, positions, outlier_values, outlier_index, scale, *, n: int, m: int,
                    outlier_block: int | None, outliers_per_block: int, in_features: int, out_features: int,
                    dtype: torch.dtype, rows: int = 16, cols: int = 256, num_warps: int = 4,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's effective weight ``scale * W_nm + W_out`` as a dense [out, in] tensor of ``dtype``: ``out`` if
    given (tests poison it), else a fresh ``torch.empty`` buffer (every element is written). ``rows`` x ``cols``
    elements per program (cols capped to fit the outlier block): 16 x 256 with 4 warps was the best of 18 configs on
    all four Llama-3-8B shapes on the H100, 1.7-1.9 TB/s of read + write traffic
    (benchmarks/results/raw/h100_lab/scratch_lab1_h100.json)."""
    N, K = out_features, in_features
    G = K // m
    has_out = bool(outliers_per_block)
    BG = _tile_groups(m, outlier_block, has_out, cols)
    if BG * m < 16 or (has_out and outlier_block % (BG * m)):
        raise ValueError(f"nm16 scratch: no tile of >= 16 columns fits the outlier block {outlier_block} ({n}:{m})")
    w = torch.empty((N, K), dtype=dtype, device=values.device) if out is None else out
    pos_mode = _POS_MODE_OF_DTYPE[positions.dtype]
    lut = lut_for(values.device) if pos_mode == 0 else positions
    _unpack_kernel[(triton.cdiv(N, rows), triton.cdiv(G, BG))](
        values, positions, lut, scale if scale is not None else values, outlier_values if has_out else values,
        outlier_index if has_out else values, w, N, G, K,
        NK=n, MG=m, POS_MODE=pos_mode, HAS_SCALE=scale is not None, HAS_OUT=has_out,
        OB=outlier_block if has_out else 1, OK=outliers_per_block if has_out else 1, BR=rows, BG=BG,
        num_warps=num_warps)
    return w


class _Streams:
    """The two-stream schedule of ``scratch_linear(overlap=...)``: decodes on a side stream (one per device), GEMMs
    on the caller's stream; buffer b is decoded only after the GEMM that last read it, and multiplied only after its
    decode. The side stream first waits for the caller's stream (the inputs; under CUDA-graph capture this forks the
    capture onto it), and every decode is waited on by a later GEMM, so the call ends joined."""

    _side: dict = {}

    def __init__(self, device: torch.device):
        key = str(device)
        if key not in self._side:
            self._side[key] = torch.cuda.Stream(device=device)
        self.side, self.main = self._side[key], torch.cuda.current_stream(device)
        self.ready = [torch.cuda.Event(), torch.cuda.Event()]
        self.free = [torch.cuda.Event(), torch.cuda.Event()]
        self.side.wait_stream(self.main)

    @contextlib.contextmanager
    def decode(self, b: int, j: int):
        with torch.cuda.stream(self.side):
            if j >= 2:
                self.side.wait_event(self.free[b])
            yield
            self.ready[b].record(self.side)

    def before_gemm(self, b: int) -> None:
        self.main.wait_event(self.ready[b])

    def after_gemm(self, b: int) -> None:
        self.free[b].record(self.main)


def scratch_linear(x2d, values, positions, outlier_values, outlier_index, scale, shift, bias, *, n, m, outlier_block,
                   outliers_per_block, in_features, out_features, out=None, chunk_bytes: int | None = None,
                   overlap: int = 0):
    """``y = x @ W_eff.T + shift + bias`` by decoding W_eff into a scratch and calling cuBLAS; with ``chunk_bytes``
    > 0, that many bytes of dense weight (whole rows) at a time into one reused buffer (bounds the scratch memory;
    the hope that an L2-sized chunk would skip the HBM round trip did not pan out, see NM16_SCRATCH_CHUNK_MB).

    ``overlap`` = C > 1 (a variant under test): C chunks of rows through two buffers, chunk j + 1 decoded on a side
    stream while cuBLAS multiplies chunk j, so the memory-bound decode hides behind the compute-bound GEMM at large
    M (CUDA: events order the two streams, CUDA-graph capturable as a fork/join; elsewhere the same chunks in
    order)."""
    M = x2d.shape[0]
    N, K = out_features, in_features
    if chunk_bytes is None:
        chunk_bytes = int(envs.NM16_SCRATCH_CHUNK_MB * 2**20)
    if overlap > 1:
        rows = min(N, (-(-N // overlap) + 15) // 16 * 16)   # ceil(N / overlap), rounded up to 16 rows
    else:
        rows = N if not chunk_bytes else min(N, max(16, chunk_bytes // (K * x2d.element_size()) // 16 * 16))
    y = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device) if out is None else out
    bufs = [torch.empty((rows, K), dtype=x2d.dtype, device=x2d.device) for _ in range(2 if overlap > 1 else 1)]
    common = dict(n=n, m=m, outlier_block=outlier_block, outliers_per_block=outliers_per_block, in_features=K,
                  dtype=x2d.dtype)
    streams = _Streams(x2d.device) if overlap > 1 and x2d.is_cuda else None
    for j, r0 in enumerate(range(0, N, rows)):  # a Python loop over a static count: CUDA-graph safe
        r1 = min(N, r0 + rows)
        b = j % len(bufs)
        part = lambda t: None if t is None else t[r0:r1]  # noqa: E731  (all weight tensors are row-major by output)
        with streams.decode(b, j) if streams else contextlib.nullcontext():
            w = unpack_to_dense(values[r0:r1], positions[r0:r1], part(outlier_values), part(outlier_index),
                                part(scale), out_features=r1 - r0, out=bufs[b][: r1 - r0], **common)
        if streams:
            streams.before_gemm(b)
        torch.mm(x2d, w.t(), out=y[:, r0:r1])  # cuBLAS writes the column slice in place (ldc = N)
        if streams:
            streams.after_gemm(b)
    b = output_bias(shift, bias, y.dtype)
    if b is not None:
        y.add_(b)
    return y
