"""Small torch-only pieces shared by the kernel paths and the PyTorch path (no Triton, no CUDA)."""

from __future__ import annotations

import torch


def output_bias(shift: torch.Tensor | None, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """shift + bias in the output dtype (either may be None): what the dense-GEMM paths (CPU and the GPU scratch
    path) add after the matmul."""
    b = None if shift is None else shift.to(dtype)
    if bias is not None:
        b = bias.to(dtype) if b is None else b + bias.to(dtype)
    return b
