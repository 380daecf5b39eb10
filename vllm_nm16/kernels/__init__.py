"""nm16 GPU kernels (Triton): the plugin's CUDA path.

Importing this package is cheap and needs neither CUDA nor Triton: the Triton module is imported on first use.

* :func:`repack` -- once per layer (``process_weights_after_loading``): on-disk tensors -> the kernels' layout.
* :func:`nm16_linear` -- ``y = scale * (x @ W_nm.T) + x @ W_out.T + shift + bias`` for x [M, K] bf16/fp16, fp32
  accumulation; the decode (gemv, M <= 2), tile-decode + ``tl.dot`` (M 3..16) or decode-to-scratch + cuBLAS (M >= 17,
  scratch.py) path is picked from ``x.shape[0]`` (a Python int), so
  it is CUDA-graph and torch.compile safe (no host syncs, no data-dependent shapes, output from ``torch.empty``).
* :func:`reference_linear` -- the same function in float64 through ``format.unpack`` (tests, benchmarks).
"""

from __future__ import annotations

import torch

from vllm_nm16.kernels.layout import POS_BYTE, POS_LUT16, POS_NIBBLE32, repack

__all__ = ["repack", "nm16_linear", "reference_linear", "POS_LUT16", "POS_NIBBLE32", "POS_BYTE"]


def nm16_linear(x2d: torch.Tensor, wv: torch.Tensor, wm: torch.Tensor, ov: torch.Tensor | None,
                oi: torch.Tensor | None, scale: torch.Tensor | None, shift: torch.Tensor | None,
                bias: torch.Tensor | None, *, n: int, m: int, outlier_block: int | None, outliers_per_block: int,
                in_features: int, out_features: int, config: dict | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """[M, in_features] x -> [M, out_features] in x's dtype. ``wv, wm, ov, oi`` come from :func:`repack`;
    scale/shift fp32 [out] or None, bias [out] in x's dtype or None. ``config`` overrides the tuned launch config
    and ``out`` (contiguous [M, out_features]) is written instead of a fresh tensor (tests poison it)."""
    from vllm_nm16.kernels.triton_nm16 import nm16_linear as _impl  # noqa: PLC0415  (lazy: Triton import)

    return _impl(x2d, wv, wm, ov, oi, scale, shift, bias, n=n, m=m, outlier_block=outlier_block,
                 outliers_per_block=outliers_per_block, in_features=in_features, out_features=out_features,
                 config=config, out=out)


def reference_linear(x2d: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                     outlier_values: torch.Tensor | None, outlier_index: torch.Tensor | None,
                     scale: torch.Tensor | None, shift: torch.Tensor | None, bias: torch.Tensor | None, *,
                     n: int, m: int, outlier_block: int | None, outliers_per_block: int) -> torch.Tensor:
    """float64 [M, out] from the ON-DISK tensors (not the repacked ones): the ground truth for tests."""
    from vllm_nm16 import format as fmt  # noqa: PLC0415

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
