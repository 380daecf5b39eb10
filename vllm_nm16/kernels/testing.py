"""Random packed layers for kernel tests and benchmarks (on-disk tensors, through format.pack)."""

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
