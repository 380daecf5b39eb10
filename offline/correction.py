"""Variance correction (and the optional mean shift) after pruning a layer.

Pruning removes half the terms of every output's dot product, which shrinks the output variance. On the calibration
inputs x (as they arrive through the already-compressed earlier layers) we compute a scale s so that

    Var(s * x W_nm^T + x W_out^T) = Var(x W^T)          (W: dense weight, W_nm: N:M part, W_out: outliers)

per output channel ("channel") or with one s shared by all outputs of the layer ("tensor"; matching the summed
variances). With outliers the condition is a quadratic in s (the N:M and outlier outputs covary); we take its positive
root. All variances come from the input covariance C = E[x x^T] - E[x] E[x]^T: Var(x w^T) = w C w^T.
s is clamped to [0.5, 2] (a guard for nearly-dead channels; real values stay close to 1).

The mean shift (optional variant, off by default) adds ``E[x] (W - W_eff)^T`` to every output so the output mean is also
preserved; it is stored as ``weight_shift``.
"""

from __future__ import annotations

import torch

SCALE_MIN, SCALE_MAX = 0.5, 2.0


def covariance(H: torch.Tensor, xsum: torch.Tensor, count: int) -> torch.Tensor:
    mean = xsum / count
    return H / count - torch.outer(mean, mean)


def _quad_forms(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Row-wise a_i C b_i^T: the matrix product in float32 (the cost), the row sums in float64."""
    return ((A.float() @ C.float()) * B.float()).sum(dim=1, dtype=torch.float64)


def variance_scale(W: torch.Tensor, W_nm: torch.Tensor, W_out: torch.Tensor | None, C: torch.Tensor,
                   mode: str) -> torch.Tensor | None:
    """Per-row scale [out] (None for mode 'none')."""
    if mode == "none":
        return None
    if mode not in ("channel", "tensor"):
        raise ValueError(f"variance correction must be channel|tensor|none, got {mode!r}")
    W, W_nm = W.double(), W_nm.double()
    C = C.double()
    v_dense = _quad_forms(W, W, C)
    a = _quad_forms(W_nm, W_nm, C)
    if W_out is not None:
        W_out = W_out.double()
        b = 2 * _quad_forms(W_nm, W_out, C)
        c = _quad_forms(W_out, W_out, C) - v_dense
    else:
        b = torch.zeros_like(a)
        c = -v_dense
    if mode == "tensor":
        a, b, c = a.sum(0, keepdim=True), b.sum(0, keepdim=True), c.sum(0, keepdim=True)
    disc = (b * b - 4 * a * c).clamp_min(0)
    s = (-b + disc.sqrt()) / (2 * a).clamp_min(1e-30)
    s = torch.where(a > 1e-20, s, torch.ones_like(s)).clamp(SCALE_MIN, SCALE_MAX)
    if mode == "tensor":
        s = s.expand(W.shape[0])
    return s.float().contiguous()


def mean_shift(W: torch.Tensor, W_eff: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """[out]: E[x] (W - W_eff)^T, restoring the dense output mean."""
    return ((W.double() - W_eff.double()) @ mean.double()).float()


def relative_error(W: torch.Tensor, W_eff: torch.Tensor, H: torch.Tensor, bias_diff: torch.Tensor | None = None,
                   xsum: torch.Tensor | None = None, count: int | None = None) -> float:
    """||X (W_eff - W)^T + shift||^2 / ||X W^T||^2 over the calibration tokens, from H = X^T X (exact, no X kept)."""
    D = (W_eff.double() - W.double())
    Hd = H.double()
    num = float(_quad_forms(D, D, Hd).sum())
    if bias_diff is not None:
        bd = bias_diff.double()
        num += float(2 * (D @ xsum.double() * bd).sum() + count * (bd * bd).sum())
    den = float(_quad_forms(W.double(), W.double(), Hd).sum())
    return num / max(den, 1e-30)
