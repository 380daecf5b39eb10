"""Kernel test/benchmark helpers, outside the plugin runtime: random packed layers (on-disk tensors, through
format.pack) and the float64 reference of an nm16 linear layer."""

from __future__ import annotations

import torch

from vllm_nm16 import format as fmt


def random_layer(out_f: int, in_f: int, *, n: int = 8, m: int = 16, outlier_block: int | None = None,
                 outliers_per_block: int = 0, scale: bool = False, shift: bool = False,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A random packed layer (suffix -> tensor): N:M kept positions of random scores, N(0, 1/in) weights."""
    spec = fmt.NM16Spec(n=n, m=m, outlier_block=outlier_block if outliers_per_block else None,
                        outliers_per_block=outliers_per_block, has_scale=scale, has_shift=shift)
    kw = dict(device=device, generator=generator)
    w = (torch.randn(out_f, in_f, **kw) / in_f ** 0.5).to(dtype)
    keep = fmt.nm_keep_topk(torch.rand(out_f, in_f, **kw), n, m)
    extra = {}
    if spec.has_outliers:
        extra["outlier_mask"] = fmt.outlier_positions_topk(torch.rand(out_f, in_f, **kw), outliers_per_block,
                                                           outlier_block)
        extra["outliers"] = (torch.randn(out_f, in_f, **kw) * 3 / in_f ** 0.5).to(dtype)
    if scale:
        extra["scale"] = 1.0 + 0.2 * torch.rand(out_f, **kw)
    if shift:
        extra["shift"] = 0.1 * torch.randn(out_f, **kw)
    return fmt.pack(w, keep, spec, **extra)


def layer_args(t: dict[str, torch.Tensor]) -> tuple:
    """(values, mask, outlier_values, outlier_index, scale, shift) of a packed layer dict."""
    return (t[fmt.VALUES], t[fmt.MASK], t.get(fmt.OUTLIER_VALUES), t.get(fmt.OUTLIER_INDEX), t.get(fmt.SCALE),
            t.get(fmt.SHIFT))


def reference_linear(x2d: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                     outlier_values: torch.Tensor | None, outlier_index: torch.Tensor | None,
                     scale: torch.Tensor | None, shift: torch.Tensor | None, bias: torch.Tensor | None, *,
                     n: int, m: int, outlier_block: int | None, outliers_per_block: int) -> torch.Tensor:
    """float64 [M, out] from the ON-DISK tensors (not the repacked ones): the ground truth for tests."""
    spec = fmt.NM16Spec(n=n, m=m, outlier_block=outlier_block if outliers_per_block else None,
                        outliers_per_block=outliers_per_block, has_scale=scale is not None,
                        has_shift=shift is not None)
    tensors = {fmt.VALUES: values, fmt.MASK: mask}
    if outliers_per_block:
        tensors[fmt.OUTLIER_VALUES] = outlier_values
        tensors[fmt.OUTLIER_INDEX] = outlier_index
    if scale is not None:
        tensors[fmt.SCALE] = scale
    if shift is not None:
        tensors[fmt.SHIFT] = shift
    layer = fmt.unpack(tensors, spec, in_features=mask.shape[1] * m)
    y = x2d.double() @ layer.weight_nm.double().T
    if scale is not None:
        y = y * scale.double()
    if layer.outliers is not None:
        y = y + x2d.double() @ layer.outliers.double().T
    if shift is not None:
        y = y + shift.double()
    if bias is not None:
        y = y + bias.double()
    return y
