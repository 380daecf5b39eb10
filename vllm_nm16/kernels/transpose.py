"""x [M, K] -> xt [K, MP] (MP >= M, zero-padded): the outlier pass's copy of the activations (one Triton kernel).

The outlier pass (outliers.py) gathers, for each outlier, x at its column for every token of a block. From x those
are tokens K * 2 bytes apart (one 32-byte sector each); from xt they are contiguous, and with MP a whole number of
token blocks and the padding zeroed the gathers need no token mask, so they compile to vector loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _padded_transpose_kernel(x_ptr, xt_ptr, M, K, MP, BK: tl.constexpr, BMT: tl.constexpr):
    k = tl.program_id(0) * BK + tl.arange(0, BK)
    m = tl.program_id(1) * BMT + tl.arange(0, BMT)
    v = tl.load(x_ptr + m[None, :] * K + k[:, None], mask=(m[None, :] < M) & (k[:, None] < K), other=0)
    tl.store(xt_ptr + k[:, None] * MP + m[None, :], v, mask=(k[:, None] < K) & (m[None, :] < MP))


def padded_transpose(x2d: torch.Tensor, mp: int) -> torch.Tensor:
    """xt [K, mp] with xt[k, m] = x[m, k] for m < M and 0 for M <= m < mp (x contiguous [M, K], mp >= M)."""
    M, K = x2d.shape
    if mp < M or not x2d.is_contiguous():
        raise ValueError(f"padded_transpose: need contiguous x and mp >= M (got mp={mp}, M={M})")
    xt = torch.empty((K, mp), dtype=x2d.dtype, device=x2d.device)
    BK, BMT = 64, 32
    _padded_transpose_kernel[(triton.cdiv(K, BK), triton.cdiv(mp, BMT))](x2d, xt, M, K, mp, BK=BK, BMT=BMT)
    return xt
