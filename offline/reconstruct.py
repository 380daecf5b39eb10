"""Block-wise reconstruction: after a decoder block is pruned (its masks fixed), fine-tune what the nm16 format stores
for it so that the block's output matches the dense block's output on the calibration activations.

Trainable, per compressed linear layer (everything else in the block is frozen):

* the kept N:M values, at the kept positions only (pruned positions, and kept slots that hold an outlier, stay exactly
  zero: the weight is ``values * mask`` in the forward, so those entries never get a gradient);
* the outlier values at their fixed positions (``outliers * outlier_mask``);
* the variance-correction scale [out] and the mean shift [out], where the layer has them.

The layer computes ``x (diag(scale) W_nm + W_out)^T + bias + shift``, as the packed layer is served
(:meth:`vllm_nm16.format.UnpackedLayer.effective_weight`).

Loss: the mean squared error between the block's output and the target (the dense block applied to the same inputs,
which come through the already-compressed earlier blocks, as in SparseGPT's sequential pipeline), divided by the mean
square of the dense block's update ``target - input`` over the calibration set (a constant: the loss reads as "error
relative to what the block adds to the residual stream", about 1 at the start of a badly pruned block). Adam in fp32,
one calibration window per step, windows visited in an order drawn from ``seed`` (reshuffled every pass).

The result is rounded to the storage dtypes (values and outliers in the model's 16-bit dtype, scale/shift in fp32) and
measured on the whole calibration set; if it is not better than the starting point the starting point is kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch


@dataclass
class SparseLinearParts:
    """What one compressed linear layer stores, as dense fp32 tensors [out, in] (zeros off their masks)."""

    values: torch.Tensor                   # N:M kept values (zero off ``mask``)
    mask: torch.Tensor                     # bool: positions ``values`` may occupy (kept and not an outlier)
    outliers: torch.Tensor | None = None   # outlier values (zero off ``outlier_mask``)
    outlier_mask: torch.Tensor | None = None
    scale: torch.Tensor | None = None      # [out]
    shift: torch.Tensor | None = None      # [out]

    def effective_weight(self) -> torch.Tensor:
        w = self.values * self.mask
        if self.scale is not None:
            w = w * self.scale[:, None]
        if self.outliers is not None:
            w = w + self.outliers * self.outlier_mask
        return w


@dataclass
class ReconstructResult:
    layers: dict[str, SparseLinearParts]   # the parts to store (the inputs, unchanged, when not ``applied``)
    rel_error_before: float                # block output error on the calibration set / mean square of the update
    rel_error_after: float                 # the same for the returned parts (after rounding)
    rel_error_optimised: float             # the same for the optimised parts, whether applied or not
    applied: bool
    seconds: float


class _Reparam(torch.nn.Module):
    """Stands in for one nn.Linear during the optimisation: its weight is computed from the trainable parts."""

    def __init__(self, parts: SparseLinearParts, bias: torch.Tensor | None):
        super().__init__()
        self.parts = parts
        self.bias = bias

    def forward(self, x):
        y = torch.nn.functional.linear(x, self.parts.effective_weight(), self.bias)
        if self.parts.shift is not None:
            y = y + self.parts.shift
        return y


def _windows(inputs: list[torch.Tensor]) -> list[tuple[int, int]]:
    return [(c, r) for c, x in enumerate(inputs) for r in range(x.shape[0])]


def _window_kwargs(kwargs: dict, chunk_batch: int, r: int) -> dict:
    """The block's keyword arguments for one window: a per-sample attention mask is sliced to that sample."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() >= 1 and mask.shape[0] == chunk_batch and chunk_batch > 1:
        return {**kwargs, "attention_mask": mask[r:r + 1]}
    return kwargs


def _detached(v):
    if isinstance(v, torch.Tensor):
        return v.detach()
    if isinstance(v, tuple):
        return tuple(_detached(t) for t in v)
    return v


def _block_out(block, x, kwargs):
    y = block(x, **kwargs)
    return y[0] if isinstance(y, tuple) else y


@torch.no_grad()
def _rel_error(block, inputs, targets, kwargs, denom: float) -> float:
    num, count = 0.0, 0
    for x, t in zip(inputs, targets):
        num += float((_block_out(block, x, kwargs) - t).double().pow(2).sum())
        count += t.numel()
    return num / count / denom


def _rounded(parts: SparseLinearParts, value_dtype: torch.dtype) -> SparseLinearParts:
    """The parts as they will be stored: values/outliers in ``value_dtype``, exact zeros off their masks."""
    vals = (parts.values.detach() * parts.mask).to(value_dtype).float()
    outl = None
    if parts.outliers is not None:
        outl = (parts.outliers.detach() * parts.outlier_mask).to(value_dtype).float()
    return replace(parts, values=vals, outliers=outl,
                   scale=None if parts.scale is None else parts.scale.detach().float().clone(),
                   shift=None if parts.shift is None else parts.shift.detach().float().clone())


def reconstruct_block(block: torch.nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor],
                      layers: dict[str, SparseLinearParts], *, steps: int, lr: float, seed: int,
                      kwargs: dict | None = None, value_dtype: torch.dtype = torch.bfloat16,
                      progress: bool = False, desc: str = "reconstruct") -> ReconstructResult:
    """Optimise ``layers`` (submodule name in ``block`` -> its parts) so that ``block(inputs[i])`` matches
    ``targets[i]``. ``inputs``/``targets``: lists of fp32 chunks [batch, seq, hidden] on the block's device; ``kwargs``:
    the keyword arguments of the block's forward. The block is left as it was (its linears are swapped for
    reparametrised stand-ins only during the call); the caller installs the returned parts."""
    from tqdm.auto import tqdm

    t0 = time.time()
    # Inputs are data: no graph that produced them is differentiated through.
    inputs, targets = [x.detach() for x in inputs], [t.detach() for t in targets]
    kwargs = {k: _detached(v) for k, v in (kwargs or {}).items()}
    with torch.no_grad():
        denom = sum(float((t - x).double().pow(2).sum()) for x, t in zip(inputs, targets))
        denom = max(denom / sum(t.numel() for t in targets), 1e-30)
    start = {n: _rounded(p, value_dtype) for n, p in layers.items()}

    train = {n: SparseLinearParts(
        values=p.values.clone().requires_grad_(True), mask=p.mask,
        outliers=None if p.outliers is None else p.outliers.clone().requires_grad_(True),
        outlier_mask=p.outlier_mask,
        scale=None if p.scale is None else p.scale.clone().requires_grad_(True),
        shift=None if p.shift is None else p.shift.clone().requires_grad_(True)) for n, p in start.items()}
    params = [t for p in train.values() for t in (p.values, p.outliers, p.scale, p.shift) if t is not None]

    originals = {n: block.get_submodule(n) for n in layers}
    frozen = [(p, p.requires_grad) for p in block.parameters()]
    was_training = block.training

    def swap(modules: dict[str, torch.nn.Module]) -> None:
        for n, mod in modules.items():
            parent, _, child = n.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, mod)

    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        block.eval()
        swap({n: _Reparam(train[n], originals[n].bias) for n in layers})
        err_before = _rel_error(block, inputs, targets, kwargs, denom)
        windows = _windows(inputs)
        gen = torch.Generator().manual_seed(seed)
        order: list[int] = []
        opt = torch.optim.Adam(params, lr=lr)
        bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, unit="step")
        with torch.enable_grad():
            for step in bar:
                if not order:
                    order = torch.randperm(len(windows), generator=gen).tolist()
                c, r = windows[order.pop()]
                x, t = inputs[c][r:r + 1], targets[c][r:r + 1]
                y = _block_out(block, x, _window_kwargs(kwargs, inputs[c].shape[0], r))
                loss = (y - t).pow(2).mean() / denom
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if progress and (step % 10 == 0 or step == steps - 1):
                    bar.set_postfix(loss=f"{float(loss):.4f}")
        result = {n: _rounded(p, value_dtype) for n, p in train.items()}
        for n in layers:   # evaluate the rounded parts, as they will be stored
            train[n].values, train[n].outliers = result[n].values, result[n].outliers
            train[n].scale, train[n].shift = result[n].scale, result[n].shift
        err_after = _rel_error(block, inputs, targets, kwargs, denom)
    finally:
        swap(originals)
        for p, req in frozen:
            p.requires_grad_(req)
        block.train(was_training)
    applied = err_after < err_before
    return ReconstructResult(result if applied else start, err_before, err_after if applied else err_before,
                             err_after, applied, time.time() - t0)
