"""Pruning scorers as plain functions (Wanda-repo style): magnitude, Wanda and SparseGPT.

Every function takes a float32 weight ``W`` [out, in] and returns ``(W_pruned, keep)`` where ``keep`` is the bool mask
of the pruning pattern (for N:M: exactly N per group of M consecutive input columns of every row) and ``W_pruned`` is
zero outside ``keep`` and outside ``protect``.

``protect`` (optional bool [out, in]) marks outlier positions taken out before pruning: they are never pruned and never
count towards the N of a group (the N kept weights of a group are chosen among the other M - #protected positions), and
SparseGPT keeps updating them like any kept weight (their final values are stored in the outlier side tensor). When a
group holds more than M - N protected positions (e.g. 3 outliers in one group of a 2:4 pattern), ``keep`` still holds
exactly N: the slots it cannot fill with unprotected positions are protected ones (the caller stores a zero there and
the outlier in the side tensor), so ``keep`` is always a valid N:M mask, whatever the method.

Patterns: ``Pattern(n, m)`` for N:M, ``Pattern.unstructured(0.5)`` for unstructured sparsity (magnitude: per layer;
Wanda: per output row, as in the Wanda paper; SparseGPT: its adaptive mask per block of columns).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG = float("-inf")


@dataclass(frozen=True)
class Pattern:
    n: int = 8
    m: int | None = 16          # None: unstructured
    sparsity: float = 0.5       # only for unstructured

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        t = text.strip().lower()
        if t == "unstructured":
            return cls(n=0, m=None, sparsity=0.5)
        try:
            n, m = (int(v) for v in t.split(":"))
        except ValueError:
            raise ValueError(f"pattern must be N:M (e.g. 8:16) or 'unstructured', got {text!r}") from None
        if m not in (4, 8, 16, 32) or not 0 < n < m:
            raise ValueError(f"pattern {text!r}: M must be 4, 8, 16 or 32 and 0 < N < M")
        return cls(n=n, m=m)

    @property
    def structured(self) -> bool:
        return self.m is not None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"unstructured{int(self.sparsity * 100)}"


def nm_keep(score: torch.Tensor, n: int, m: int, protect: torch.Tensor | None = None) -> torch.Tensor:
    """bool [out, in]: the N highest scores of every group of M, exactly N per group; a protected position is chosen
    only where fewer than N unprotected ones are left (it then pads the group, see the module docstring)."""
    s = score.to(torch.float32)
    if protect is not None:
        s = s.masked_fill(protect, NEG)
    out_f, in_f = s.shape
    idx = torch.topk(s.reshape(out_f, in_f // m, m), n, dim=-1, sorted=False).indices
    keep = torch.zeros((out_f, in_f // m, m), dtype=torch.bool, device=s.device).scatter_(-1, idx, True)
    return keep.reshape(out_f, in_f)


def unstructured_keep(score: torch.Tensor, sparsity: float, per_row: bool,
                      protect: torch.Tensor | None = None) -> torch.Tensor:
    """bool [out, in]: keep the (1 - sparsity) highest scores per row or per layer; protected positions are kept and
    count towards the kept fraction."""
    s = score.to(torch.float32)
    if protect is not None:
        s = s.masked_fill(protect, float("inf"))
    if per_row:
        k = int(round(s.shape[1] * (1 - sparsity)))
        idx = torch.topk(s, k, dim=1, sorted=False).indices
        keep = torch.zeros_like(s, dtype=torch.bool).scatter_(1, idx, True)
    else:
        k = int(round(s.numel() * (1 - sparsity)))
        idx = torch.topk(s.reshape(-1), k, sorted=False).indices
        keep = torch.zeros(s.numel(), dtype=torch.bool, device=s.device)
        keep[idx] = True
        keep = keep.reshape(s.shape)
    if protect is not None:
        keep &= ~protect
    return keep


def _apply(W: torch.Tensor, keep: torch.Tensor, protect: torch.Tensor | None) -> torch.Tensor:
    live = keep if protect is None else (keep | protect)
    return W * live


def magnitude_prune(W: torch.Tensor, pattern: Pattern, protect: torch.Tensor | None = None):
    score = W.abs()
    if pattern.structured:
        keep = nm_keep(score, pattern.n, pattern.m, protect)
    else:
        keep = unstructured_keep(score, pattern.sparsity, per_row=False, protect=protect)
    return _apply(W, keep, protect), keep


def wanda_scores(W: torch.Tensor, col_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (col_norm: [in], the L2 norm of input feature j over the calibration tokens)."""
    return W.abs() * col_norm.to(W.dtype)[None, :]


def wanda_prune(W: torch.Tensor, col_norm: torch.Tensor, pattern: Pattern, protect: torch.Tensor | None = None):
    score = wanda_scores(W, col_norm)
    if pattern.structured:
        keep = nm_keep(score, pattern.n, pattern.m, protect)
    else:
        keep = unstructured_keep(score, pattern.sparsity, per_row=True, protect=protect)
    return _apply(W, keep, protect), keep


def damped_hessian(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(H + damp * I with dead inputs neutralized, dead bool [in]) as in the SparseGPT repo."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    return H, dead


def _inverse_cholesky_upper(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1; retries with more damping if H is numerically not positive definite."""
    damp = percdamp
    for _ in range(6):
        Hd, _ = damped_hessian(H, damp)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        damp = max(damp * 10, 1e-4)   # percdamp 0 retries with some damping too
    raise RuntimeError("SparseGPT: the calibration Hessian is not positive definite even with heavy damping")


def sparsegpt_hinv(H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """The upper Cholesky factor of the damped inverse Hessian SparseGPT works with (layers reading the same input,
    e.g. q/k/v, share it: compute it once)."""
    return _inverse_cholesky_upper(H.to(torch.float32), percdamp)


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, pattern: Pattern, protect: torch.Tensor | None = None, *,
                    blocksize: int = 128, percdamp: float = 0.01, hinv: torch.Tensor | None = None):
    """SparseGPT (Frantar & Alistarh 2023): choose the mask block by block and update the remaining weights with the
    optimal-brain-surgeon correction ``W[:, j:] -= err_i * Hinv[i, j:]`` (H = sum of x x^T over calibration tokens;
    ``hinv``: :func:`sparsegpt_hinv` of H, when already computed)."""
    W = W.clone().to(torch.float32)
    rows, cols = W.shape
    if pattern.structured and blocksize % pattern.m:
        raise ValueError(f"SparseGPT block size {blocksize} must be a multiple of M={pattern.m}")
    dead = torch.diag(H) == 0
    W[:, dead] = 0
    Hinv = hinv if hinv is not None else sparsegpt_hinv(H, percdamp)
    prune = torch.zeros_like(W, dtype=torch.bool)
    prot = protect if protect is not None else torch.zeros_like(W, dtype=torch.bool)
    keep_nm = torch.zeros_like(W, dtype=torch.bool) if pattern.structured else None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        P1 = prot[:, i1:i2]
        if pattern.structured:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            tmp = (W1 ** 2 / d1[None, :] ** 2).masked_fill(P1, float("inf"))
            thresh = torch.sort(tmp.flatten()).values[int(tmp.numel() * pattern.sparsity)]
            mask1 = tmp <= thresh
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if pattern.structured and i % pattern.m == 0:
                tmp = (W1[:, i:i + pattern.m] ** 2 / d1[None, i:i + pattern.m] ** 2)
                keep = nm_keep(tmp, pattern.n, pattern.m, P1[:, i:i + pattern.m])
                keep_nm[:, i1 + i:i1 + i + pattern.m] = keep
                mask1[:, i:i + pattern.m] = ~(keep | P1[:, i:i + pattern.m])
            q = w.masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        prune[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    # N:M: the selected mask itself (exactly N per group, padded with protected slots where a group has more than M - N
    # of them); deriving it as ~prune & ~protect would drop those pads and leave fewer than N.
    keep = keep_nm if pattern.structured else ~prune & ~prot
    return W.masked_fill(prune, 0.0), keep
