"""The outlier product on its own: ``o = x @ W_out.T`` in fp32 [M, N] (one Triton kernel), added by the Gluon
kernels' epilogue (``HAS_PRE``) instead of being gathered inside them.

Why a separate pass: inside the fragment kernels the outliers were a latency chain (load a slot's offset, then
gather x at it, then FMA) run after the main loop by a CTA sized for the decode (~128 registers, 2-4 CTAs per SM):
at M = 64 it doubled the wgmma kernel's time (gate_up 150 vs 79 us bare, H200). Here the work gets its own launch
shape: small programs, many of them resident, so the gathers' latency hides behind other programs; x is read from its
transpose (tokens contiguous: one 32-byte sector holds 16 tokens of a column, against one token per sector in x).

Work per program: ``BR`` rows x ``BT`` tokens, every outlier slot of those rows, ``BS`` slots per trip (the next
trip's slot offsets load during this trip's gathers); no atomics (each output element is summed by one program in
slot order: deterministic). Plain Triton, so it also runs under ``TRITON_INTERPRET=1`` (the CPU tests check it there).
CUDA-graph safe: the transpose and ``o`` come from ``torch.empty``; the M class is a Python int.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_nm16.kernels.transpose import padded_transpose


@triton.jit
def _slots(ov_ptr, oi_ptr, rows, row_ok, s0, NO, OB: tl.constexpr, OK: tl.constexpr, BS: tl.constexpr):
    """Values [BR, BS] and absolute columns of slots s0.. of ``rows`` (value 0 past NO or N)."""
    slot = s0 + tl.arange(0, BS)
    ok = row_ok[:, None] & (slot[None, :] < NO)
    ov = tl.load(ov_ptr + rows[:, None] * NO + slot[None, :], mask=ok, other=0)
    oi = tl.load(oi_ptr + rows[:, None] * NO + slot[None, :], mask=ok, other=0)
    return ov, tl.where(ok, (slot[None, :] // OK) * OB + (oi.to(tl.int32) & 0xFFFF), 0)


@triton.jit
def _outlier_kernel(xt_ptr, ov_ptr, oi_ptr, o_ptr, N, NO, MP, M, OB: tl.constexpr, OK: tl.constexpr,
                    BR: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    toks = tl.program_id(1) * BT + tl.arange(0, BT)
    row_ok = rows < N
    acc = tl.zeros([BR, BT], dtype=tl.float32)
    # The next chunk's slots load while this chunk's x is gathered: one memory round trip per trip, not two (the
    # gather's addresses depend on the slot offsets). Past NO the slots are masked to 0 (and col to a valid column).
    ov, col = _slots(ov_ptr, oi_ptr, rows, row_ok, 0, NO, OB, OK, BS)
    for s0 in range(0, NO, BS):
        # xt is zero-padded to MP tokens (a whole number of BT blocks): no token mask, vector loads
        xg = tl.load(xt_ptr + col[:, :, None] * MP + toks[None, None, :])
        ov_n, col_n = _slots(ov_ptr, oi_ptr, rows, row_ok, s0 + BS, NO, OB, OK, BS)
        acc += tl.sum(ov.to(tl.float32)[:, :, None] * xg.to(tl.float32), axis=1)
        ov = ov_n
        col = col_n
    tl.store(o_ptr + toks[None, :] * N + rows[:, None], acc, mask=row_ok[:, None] & (toks[None, :] < M))


def pick_config(M: int) -> dict:
    """Launch shape by M class, from the H200 sweep (benchmarks/gpu/outlier_sweep.py, raw/h200/outlier_sweep.json:
    8B qkv, gate_up, down at M = 16, 32, 64, 128, 72 shapes each): BT = 32 tokens per program up to M = 32 (32 rows),
    64 above (16 rows); 16 slots per trip, 4 warps. Within 1.26x of each shape's best everywhere (geometric mean
    1.01-1.08x); 16-token programs measured 12-44x slower (not investigated: no M class needs them)."""
    if M <= 32:
        return {"BR": 32, "BS": 16, "BT": 32, "num_warps": 4}
    return {"BR": 16, "BS": 16, "BT": 64, "num_warps": 4}


def outlier_product(x2d: torch.Tensor, outlier_values: torch.Tensor, outlier_index: torch.Tensor, *, N: int,
                    outlier_block: int, outliers_per_block: int, in_features: int,
                    config: dict | None = None) -> torch.Tensor:
    """fp32 [M, N]: ``o[m, n] = sum_j outlier_values[n, j] * x[m, col(n, j)]`` with ``col = (j // k) * B +
    outlier_index[n, j]`` (the on-disk outlier layout: ``outliers_per_block`` = k slots per row and block of
    ``outlier_block`` = B columns)."""
    M, K = x2d.shape
    NO = (in_features // outlier_block) * outliers_per_block
    if tuple(outlier_values.shape) != (N, NO) or tuple(outlier_index.shape) != (N, NO):
        raise ValueError(f"outliers {tuple(outlier_values.shape)} / {tuple(outlier_index.shape)}: expected ({N}, {NO}) "
                         f"for {N} x {in_features} with {outliers_per_block} per {outlier_block} columns")
    cfg = pick_config(M)
    cfg.update(config or {})
    o = torch.empty((M, N), dtype=torch.float32, device=x2d.device)
    if M == 0:
        return o
    grid = (triton.cdiv(N, cfg["BR"]), triton.cdiv(M, cfg["BT"]))
    mp = grid[1] * cfg["BT"]
    _outlier_kernel[grid](padded_transpose(x2d.contiguous(), mp), outlier_values, outlier_index, o, N, NO, mp, M,
                          OB=outlier_block, OK=outliers_per_block, BR=cfg["BR"], BS=cfg["BS"], BT=cfg["BT"],
                          num_warps=cfg["num_warps"])
    return o
