"""Kernel backends of the nm16 linear method: which tensors a layer keeps and which code computes its output.

Modelled on vLLM's mixed-precision kernels (``MPLinearKernel``: ``can_implement`` / ``process_weights_after_loading``
/ ``apply_weights``). The linear method (linear.py) describes each layer of this rank by one :class:`LayerGeometry`,
asks :func:`choose_backend` for a backend, lets it turn the validated on-disk tensors into the tensors the layer keeps
(:meth:`Backend.process_weights`), and runs every forward through the one custom op ``torch.ops.nm16.linear``
(ops.py) with the backend's name as an argument: the op is opaque to torch.compile, and the name is a constant of
the traced graph, so nothing is read from the environment per call.

=========  ======================================================================================================
backend    what it runs
=========  ======================================================================================================
``gluon``  CUDA: the Gluon fragment kernels (8:16, bf16/fp16: kernels/gluon_nm16.py mma_v2, sm_80+, M <= 32;
           kernels/gluon_wgmma.py wgmma, sm_90, M 17..64, 128 without outliers) and the Triton kernels for
           everything else (other N:M, fp32, large M via decode-to-scratch + cuBLAS). All read the same resident
           tensors, so the per-call choice by M costs nothing.
``triton`` CUDA: the Triton kernels only (the pre-Gluon path; GPUs where Gluon cannot run, and A/B checks).
``torch``  any device: PyTorch, weights packed in memory, a dense weight rebuilt per call (correct, not fast; the
           CPU path and the reference the GPU checks compare the kernels with).
=========  ======================================================================================================

``VLLM_NM16_BACKEND`` (vllm_nm16/envs.py) = ``auto`` (default: ``gluon`` on CUDA, ``torch`` elsewhere) or a name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_nm16 import envs
from vllm_nm16 import format as fmt
from vllm_nm16 import ops


@dataclass(frozen=True)
class LayerGeometry:
    """One linear layer of this tensor-parallel rank, as the kernels see it."""

    n: int                     # kept per group
    m: int                     # group size
    in_features: int           # K of this rank
    out_features: int          # N of this rank (all fused shards)
    outlier_block: int         # B, 0 without outliers
    outliers_per_block: int    # k, 0 without outliers
    has_scale: bool
    has_shift: bool
    act_dtype: torch.dtype

    @classmethod
    def from_spec(cls, spec: fmt.NM16Spec, *, in_features: int, out_features: int,
                  act_dtype: torch.dtype) -> "LayerGeometry":
        return cls(n=spec.n, m=spec.m, in_features=in_features, out_features=out_features,
                   outlier_block=(spec.outlier_block or 0) if spec.has_outliers else 0,
                   outliers_per_block=spec.outliers_per_block if spec.has_outliers else 0,
                   has_scale=spec.has_scale, has_shift=spec.has_shift, act_dtype=act_dtype)


class Backend:
    """Base: ``name`` (the op's backend argument), :meth:`can_implement`, :meth:`process_weights`."""

    name = ""

    def can_implement(self, geom: LayerGeometry, device: torch.device) -> tuple[bool, str]:
        raise NotImplementedError

    def process_weights(self, geom: LayerGeometry, values: torch.Tensor, mask: torch.Tensor,
                        outlier_values: torch.Tensor | None, outlier_index: torch.Tensor | None,
                        scale: torch.Tensor | None, shift: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        """The tensors the layer keeps, keys ``values positions outlier_values outlier_index scale shift`` (None
        where a part is absent), in the order of the op's arguments."""
        raise NotImplementedError


class GPUKernels(Backend):
    """The CUDA kernels (Triton; with ``gluon`` also the Gluon fragment kernels at small and medium M)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def can_implement(self, geom, device):
        if device.type != "cuda":
            return False, f"backend {self.name!r} needs a CUDA device, the layer is on {device}"
        if self.name == "gluon" and torch.cuda.get_device_capability(device) < (8, 0):
            return False, "the Gluon kernel needs an sm_80+ GPU (mma.sync)"
        return True, ""

    def process_weights(self, geom, values, mask, outlier_values, outlier_index, scale, shift):
        from vllm_nm16 import kernels  # noqa: PLC0415  (no Triton import: repack is torch code)

        values, positions, outlier_values, outlier_index = kernels.repack(
            values, mask, outlier_values, outlier_index, n=geom.n, m=geom.m,
            outlier_block=geom.outlier_block or None, outliers_per_block=geom.outliers_per_block)
        if self.name == "gluon":
            kernels.prepare_device(values.device)  # small constant tables, before any CUDA-graph capture
        return {"values": values, "positions": positions, "outlier_values": outlier_values,
                "outlier_index": outlier_index,
                "scale": None if scale is None else scale.float().contiguous(),
                "shift": None if shift is None else shift.float().contiguous()}


class TorchPath(Backend):
    name = "torch"

    def can_implement(self, geom, device):
        return True, ""

    def process_weights(self, geom, values, mask, outlier_values, outlier_index, scale, shift):
        return ops.prepare_torch(values, mask, outlier_values, outlier_index, scale, shift, n=geom.n, m=geom.m,
                                 outlier_block=geom.outlier_block, outliers_per_block=geom.outliers_per_block,
                                 in_features=geom.in_features, act_dtype=geom.act_dtype)


BACKENDS: dict[str, Backend] = {b.name: b for b in (GPUKernels("gluon"), GPUKernels("triton"), TorchPath())}


def requested_backend(cuda: bool | None = None) -> str:
    """The backend name ``VLLM_NM16_BACKEND`` asks for on this machine (``auto`` resolved)."""
    name = envs.VLLM_NM16_BACKEND
    if name == "auto":
        cuda = torch.cuda.is_available() if cuda is None else cuda
        return "gluon" if cuda else "torch"
    if name not in BACKENDS:
        raise ValueError(f"VLLM_NM16_BACKEND={name!r}: expected auto or one of {', '.join(BACKENDS)}")
    return name


def choose_backend(geom: LayerGeometry, device: torch.device) -> Backend:
    """The backend for a layer on ``device``: the requested one (``auto``: gluon on CUDA, torch elsewhere), which must
    be able to run the layer; CPU layers always take the PyTorch path."""
    name = requested_backend(device.type == "cuda")
    if device.type != "cuda":
        name = "torch"
    elif envs.VLLM_NM16_BACKEND == "auto" and not BACKENDS["gluon"].can_implement(geom, device)[0]:
        name = "triton"  # e.g. a pre-Ampere GPU
    backend = BACKENDS[name]
    ok, why = backend.can_implement(geom, device)
    if not ok:
        raise ValueError(f"nm16: VLLM_NM16_BACKEND={envs.VLLM_NM16_BACKEND}: {why}")
    return backend
