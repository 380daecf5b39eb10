"""The kernels' own weight layout, built once per layer from the on-disk tensors (see ``vllm_nm16/format.py``).

Why a layout of our own: the kernels never expand the mask bit by bit. For every kept value they need its column
inside its group ("position"), so the decode is ``x[g*M + pos] * value`` -- a shift, an AND and one gathered load of x.
Three ways to get the positions (``POS_*`` below):

* ``POS_LUT16`` (8:16 only, the default): keep the on-disk int16 bitmask (0.5625 of the dense bytes) and turn it into
  the 8 positions of a group -- 8 four-bit nibbles in one int32 -- with two lookups into a 512-entry table (one per
  mask byte). The low byte's entry holds its set-bit columns in the low nibbles, the high byte's entry holds its
  columns (+8) in the top nibbles, so for an exact 8-of-16 mask the two entries never overlap: ``lo | hi`` is the word.
* ``POS_NIBBLE32`` (8:16 only): store that int32 word per group on the device (0.625 of the dense bytes, 11% more
  than the bitmask) and skip the lookups.
* ``POS_BYTE`` (any N:M, 2:4/4:8/16:32): one uint8 position per kept value. More bytes, simplest decode.

Values and outliers stay exactly as on disk (row-major, groups in increasing column order): a warp reading 32
consecutive groups of one row already reads 512 contiguous bytes, so no interleaving is needed for coalescing.
"""

from __future__ import annotations

import torch

from vllm_nm16 import envs
from vllm_nm16 import format as fmt

POS_LUT16 = "lut16"
POS_NIBBLE32 = "nibble32"
POS_BYTE = "byte"
POS_MODES = (POS_LUT16, POS_NIBBLE32, POS_BYTE)

# The 8:16 position mode the plugin gets; NM16_POS_MODE overrides it (benchmarks compare the modes).

_LUT_CACHE: dict[torch.device, torch.Tensor] = {}


def byte_position_lut() -> torch.Tensor:
    """int32 [512]: entry b (low byte) / 256 + b (high byte) -> nibble-packed set-bit columns, see module doc."""
    lut = torch.zeros(512, dtype=torch.int64)
    for b in range(256):
        cols = [j for j in range(8) if b >> j & 1]
        lo = 0
        for i, c in enumerate(cols):
            lo |= c << (4 * i)
        hi = 0
        first = 8 - len(cols)  # the high byte's columns are the last popc(b) kept values of the group
        for i, c in enumerate(cols):
            hi |= (c + 8) << (4 * (first + i))
        lut[b] = lo
        lut[256 + b] = hi
    lut = torch.where(lut >= 2**31, lut - 2**32, lut)  # store the bit pattern as signed int32
    return lut.to(torch.int32)


def lut_for(device: torch.device) -> torch.Tensor:
    """The lookup table on ``device``, created once (before any CUDA-graph capture: repack() calls this)."""
    device = torch.device(device)
    lut = _LUT_CACHE.get(device)
    if lut is None:
        lut = byte_position_lut().to(device)
        _LUT_CACHE[device] = lut
    return lut


def repack(values: torch.Tensor, mask: torch.Tensor, outlier_values: torch.Tensor | None,
           outlier_index: torch.Tensor | None, *, n: int, m: int, outlier_block: int | None,
           outliers_per_block: int, pos_mode: str | None = None):
    """On-disk tensors of one (already sharded) layer -> ``(values, positions, outlier_values, outlier_index)`` for
    :func:`nm16_linear`.

    ``positions``' dtype tells the kernel which position mode it holds: int16 = POS_LUT16, int32 = POS_NIBBLE32,
    uint8 = POS_BYTE. Outliers stay as on disk (values in the model dtype, in-block offsets as uint8/int16).
    """
    if pos_mode is None:
        pos_mode = envs.NM16_POS_MODE if (n, m) == (8, 16) else POS_BYTE
    if pos_mode not in POS_MODES:
        raise ValueError(f"nm16 repack: unknown position mode {pos_mode!r} (one of {POS_MODES})")
    if pos_mode != POS_BYTE and (n, m) != (8, 16):
        raise ValueError(f"nm16 repack: position mode {pos_mode!r} is for 8:16 only, got {n}:{m}")
    out_f, groups = mask.shape
    if values.shape != (out_f, groups * n):
        raise ValueError(f"nm16 repack: weight_values shape {tuple(values.shape)} != ({out_f}, {groups * n})")
    values = values.contiguous()
    if pos_mode == POS_LUT16:
        if mask.dtype != torch.int16:
            raise ValueError(f"nm16 repack: 8:16 weight_mask must be int16, got {mask.dtype}")
        positions = mask.contiguous()
        lut_for(mask.device)
    else:
        pos = fmt.kept_positions(mask, n, m)
        if pos_mode == POS_NIBBLE32:
            word = (pos << (4 * torch.arange(n, device=pos.device))).sum(-1)
            positions = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32).contiguous()
        else:
            positions = pos.reshape(out_f, groups * n).to(torch.uint8).contiguous()
    if not outliers_per_block:
        return values, positions, None, None
    if outlier_values is None or outlier_index is None:
        raise ValueError("nm16 repack: outliers_per_block > 0 but outlier tensors are missing")
    return values, positions, outlier_values.contiguous(), outlier_index.contiguous()
