"""Valid random nm16 layers for vLLM's dummy weight loading (``load_format="dummy"``, ``--load-format dummy``).

With dummy loading vLLM reads no files: it fills float parameters with small uniform noise and leaves integer ones as
created (our masks start at 0, i.e. popcount 0), so a packed layer would fail validation. Instead, each nm16 layer
fills its own (per tensor-parallel rank) parameters with a random layer that satisfies every invariant of the format:
exactly N kept bits per group of M, values ~ N(0, 1/fan_in) in the parameter dtype, k strictly increasing in-range
outlier offsets per block with values ~ N(0, 9/fan_in), scales in [1, 1.2) and shifts ~ N(0, 0.01). Everything is made
by ``format.nm_keep_topk`` / ``format.outlier_positions_topk`` / ``format.pack`` on the parameters' device with a
generator seeded from the layer prefix (and TP rank), in row chunks so no [out, in] float tensor of a whole large
layer is ever held. Speed benchmarks only care about shapes and a realistic mask/offset distribution; the weights mean
nothing.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch

from vllm_nm16 import format as fmt

CHUNK_ELEMENTS = 1 << 24  # rows per chunk * in_features: bounds the temporaries (~30 bytes each) to ~0.5 GB


def layer_seed(prefix: str, rank: int = 0) -> int:
    """Deterministic 63-bit seed of one layer (prefix) on one tensor-parallel rank."""
    return int.from_bytes(hashlib.sha256(f"nm16-dummy|{prefix}|{rank}".encode()).digest()[:8], "little") >> 1


def random_rows(spec: fmt.NM16Spec, rows: int, in_features: int, *, value_dtype: torch.dtype,
                generator: torch.Generator, device: torch.device | str = "cpu",
                fan_in: int | None = None) -> dict[str, torch.Tensor]:
    """A valid random packed layer of ``rows`` output rows (suffix -> tensor, as ``format.pack`` returns it).
    ``value_dtype`` must be bf16/fp16 (the checkpoint dtypes); ``fan_in`` (default in_features) sets the value std."""
    std = (fan_in or in_features) ** -0.5
    kw = dict(device=device, generator=generator)
    w = (torch.randn(rows, in_features, **kw) * std).to(value_dtype)
    keep = fmt.nm_keep_topk(torch.rand(rows, in_features, **kw), spec.n, spec.m)
    extra: dict[str, torch.Tensor] = {}
    if spec.has_outliers:
        extra["outlier_mask"] = fmt.outlier_positions_topk(torch.rand(rows, in_features, **kw),
                                                           spec.outliers_per_block, spec.outlier_block)
        extra["outliers"] = (torch.randn(rows, in_features, **kw) * (3 * std)).to(value_dtype)
    if spec.has_scale:
        extra["scale"] = 1.0 + 0.2 * torch.rand(rows, **kw)
    if spec.has_shift:
        extra["shift"] = 0.1 * torch.randn(rows, **kw)
    return fmt.pack(w, keep, spec, name="dummy", **extra)


def fill_random(params: Mapping[str, torch.Tensor], spec: fmt.NM16Spec, in_features: int, *, seed: int,
                fan_in: int | None = None, chunk_elements: int = CHUNK_ELEMENTS) -> torch.dtype:
    """Overwrite a layer's packed tensors (suffix -> tensor of ``format.expected_tensors`` shapes; value tensors in
    any float dtype, e.g. fp32 on CPU) in place with a valid random layer. Returns the dtype the values were drawn in
    (the parameter dtype if bf16/fp16, else bf16: values are then bf16-representable, like a cast checkpoint)."""
    values = params[fmt.VALUES]
    out_features, device = values.shape[0], values.device
    value_dtype = values.dtype if values.dtype in fmt.VALUE_DTYPES else torch.bfloat16
    expected = fmt.expected_tensors(spec, out_features, in_features, value_dtype)
    if set(params) != set(expected):
        raise fmt.NM16FormatError(f"nm16: dummy fill: tensors {sorted(params)} != expected {sorted(expected)}")
    for suffix, (shape, _) in expected.items():
        if tuple(params[suffix].shape) != shape:
            raise fmt.NM16FormatError(f"nm16: dummy fill: {suffix} shape {tuple(params[suffix].shape)} != {shape}")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    step = max(1, chunk_elements // in_features)
    with torch.no_grad():
        for r0 in range(0, out_features, step):
            r1 = min(out_features, r0 + step)
            part = random_rows(spec, r1 - r0, in_features, value_dtype=value_dtype, generator=gen, device=device,
                               fan_in=fan_in)
            for suffix, t in part.items():
                params[suffix][r0:r1].copy_(t)
    return value_dtype
