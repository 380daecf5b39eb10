"""The nm16 packed checkpoint format, version 1: the one spec shared by the offline writer and the vLLM loader.

A linear layer ``y = x @ W.T`` with ``W`` of shape ``[out, in]`` is stored as N:M sparse along ``in``: every output row is
cut into groups of ``M`` consecutive input columns (``G = in / M`` groups per row) and exactly ``N`` positions of each
group are *kept* (a kept weight may be zero). Optionally a small, fixed budget of *outlier* weights per (row, block of
``B`` input columns) is kept in a side tensor, and a per-output-row *scale* (variance correction) and *shift* are applied.

The function the layer computes (``scale``/``shift`` default to 1/0 when absent)::

    y = scale * (x @ W_nm.T) + x @ W_out.T + shift (+ the layer's own bias)

i.e. the effective dense weight is ``W_eff = diag(scale) @ W_nm + W_out`` (scale multiplies the N:M part only: variance
correction rescales what pruning shrank; outliers are exact original weights and are not rescaled).

Tensors of a layer whose module name is ``PREFIX`` (e.g. ``model.layers.0.self_attn.q_proj``), in safetensors shards:

==========================  =====================  ==========================  =============================================
name                        shape                  dtype                       meaning
==========================  =====================  ==========================  =============================================
``PREFIX.weight_values``    ``[out, in*N/M]``      bf16 or fp16 (model dtype)  kept weights, per group in increasing column
                                                                               order; group ``g`` of a row is the slice
                                                                               ``[g*N, (g+1)*N)``
``PREFIX.weight_mask``      ``[out, in/M]``        int8 (M=4, 8), int16 (M=16), bit ``j`` set <=> column ``g*M + j`` is kept;
                                                   int32 (M=32)                exactly N bits set. The integer is *signed*
                                                                               two's complement of the same width: for
                                                                               M=16, a mask with bit 15 set is stored as a
                                                                               negative int16 (read it as ``v & 0xFFFF``).
                                                                               For M=4 only bits 0..3 may be set.
``PREFIX.outlier_values``   ``[out, in/B*k]``      model dtype                 k outliers per (row, block); block ``b`` of a
                                                                               row is the slice ``[b*k, (b+1)*k)``
``PREFIX.outlier_index``    ``[out, in/B*k]``      uint8 if B <= 256,          column offset of each outlier inside its
                                                   else int16                  block, strictly increasing within a block
                                                                               (so distinct), in ``[0, B)``
``PREFIX.weight_scale``     ``[out]``              float32                     variance-correction scale (has_scale)
``PREFIX.weight_shift``     ``[out]``              float32                     additive output shift (has_shift)
==========================  =====================  ==========================  =============================================

Why these choices: every tensor is row-major in ``out`` so column-parallel and fused (QKV, gate/up) layers shard by rows
with vLLM's stock parameter classes; along ``in`` every tensor is a whole number of groups/blocks per rank as long as
``in / tp`` is a multiple of ``M`` and ``B``, so row-parallel layers shard too. Masks are signed because safetensors and
torch have no usable uint16/uint32 tensor ops; the bit pattern is what matters. A bitmask (1 bit per weight) costs 1.4%
more than the paper's ``ceil(log2 C(M, N))``-bit code but decodes with a few bit operations; :func:`layer_bytes`
reports both accountings.

``config.json`` of the checkpoint carries ``quantization_config`` (see :class:`NM16Spec`)::

    {"quant_method": "nm16", "format_version": 1, "n": 8, "m": 16, "outlier_block": 256 | null,
     "outliers_per_block": 4 | 0, "has_scale": true, "has_shift": false, "ignore": ["lm_head", ...],
     "recipe": {...free-form record of how it was made...}}

Layers listed in ``ignore`` (module names as in the Hugging Face checkpoint) keep a dense ``PREFIX.weight``.
Embeddings and ``lm_head`` are always dense.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

QUANT_METHOD = "nm16"
FORMAT_VERSION = 1
SUPPORTED_M = (4, 8, 16, 32)
VALUE_DTYPES = (torch.bfloat16, torch.float16)
SCALE_DTYPE = torch.float32

# Tensor-name suffixes of one packed layer.
VALUES = "weight_values"
MASK = "weight_mask"
OUTLIER_VALUES = "outlier_values"
OUTLIER_INDEX = "outlier_index"
SCALE = "weight_scale"
SHIFT = "weight_shift"


class NM16FormatError(ValueError):
    """A checkpoint, config or tensor violates the nm16 format; the message names the layer/tensor/field."""


def _fail(where: str, msg: str) -> None:
    raise NM16FormatError(f"nm16: {where}: {msg}")


def mask_dtype(m: int) -> torch.dtype:
    """Signed integer dtype holding M mask bits (int8 for M <= 8)."""
    return {4: torch.int8, 8: torch.int8, 16: torch.int16, 32: torch.int32}[m]


def index_dtype(block: int) -> torch.dtype:
    """Smallest dtype holding a column offset inside an outlier block."""
    return torch.uint8 if block <= 256 else torch.int16


@dataclass(frozen=True)
class NM16Spec:
    """The ``quantization_config`` of an nm16 checkpoint (validated on construction)."""

    n: int = 8
    m: int = 16
    outlier_block: int | None = None
    outliers_per_block: int = 0
    has_scale: bool = False
    has_shift: bool = False
    ignore: tuple[str, ...] = ()
    recipe: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        where = "quantization_config"
        for name in ("n", "m", "outliers_per_block"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                _fail(where, f"field '{name}' must be an integer, got {v!r}")
        if self.m not in SUPPORTED_M:
            _fail(where, f"field 'm' must be one of {SUPPORTED_M}, got {self.m}")
        if not 0 < self.n < self.m:
            _fail(where, f"field 'n' must satisfy 0 < n < m={self.m}, got {self.n}")
        if self.outlier_block is None:
            if self.outliers_per_block != 0:
                _fail(where, "field 'outliers_per_block' must be 0 when 'outlier_block' is null")
        else:
            b = self.outlier_block
            if isinstance(b, bool) or not isinstance(b, int) or b <= 0 or b % self.m or b > 32768:
                _fail(where, f"field 'outlier_block' must be a positive multiple of m={self.m} "
                             f"(at most 32768) or null, got {b!r}")
            if not 0 < self.outliers_per_block <= b:
                _fail(where, f"field 'outliers_per_block' must be in 1..{b} when 'outlier_block' is set, "
                             f"got {self.outliers_per_block}")
        for name in ("has_scale", "has_shift"):
            if not isinstance(getattr(self, name), bool):
                _fail(where, f"field '{name}' must be true or false, got {getattr(self, name)!r}")
        if not all(isinstance(s, str) for s in self.ignore):
            _fail(where, "field 'ignore' must be a list of module names")

    @property
    def has_outliers(self) -> bool:
        return self.outlier_block is not None

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    def k_multiple(self) -> int:
        """in_features (per tensor-parallel rank) must be a multiple of this."""
        return self.outlier_block if self.has_outliers else self.m

    def to_config(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": FORMAT_VERSION,
            "n": self.n,
            "m": self.m,
            "outlier_block": self.outlier_block,
            "outliers_per_block": self.outliers_per_block,
            "has_scale": self.has_scale,
            "has_shift": self.has_shift,
            "ignore": list(self.ignore),
            "recipe": dict(self.recipe),
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "NM16Spec":
        where = "quantization_config"
        if not isinstance(cfg, Mapping):
            _fail(where, f"must be a JSON object, got {type(cfg).__name__}")
        if cfg.get("quant_method") != QUANT_METHOD:
            _fail(where, f"field 'quant_method' must be '{QUANT_METHOD}', got {cfg.get('quant_method')!r}")
        if cfg.get("format_version") != FORMAT_VERSION:
            _fail(where, f"field 'format_version' {cfg.get('format_version')!r} is not supported "
                         f"(this vllm_nm16 reads version {FORMAT_VERSION})")
        known = {"quant_method", "format_version", "n", "m", "outlier_block", "outliers_per_block",
                 "has_scale", "has_shift", "ignore", "recipe"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            _fail(where, f"unknown field(s) {unknown}")
        for req in ("n", "m"):
            if req not in cfg:
                _fail(where, f"missing field '{req}'")
        ignore = cfg.get("ignore", [])
        if not isinstance(ignore, list):
            _fail(where, "field 'ignore' must be a list of module names")
        return cls(n=cfg["n"], m=cfg["m"], outlier_block=cfg.get("outlier_block"),
                   outliers_per_block=cfg.get("outliers_per_block", 0), has_scale=cfg.get("has_scale", False),
                   has_shift=cfg.get("has_shift", False), ignore=tuple(ignore), recipe=cfg.get("recipe", {}) or {})


# ----------------------------------------------------------------------------------------------------------- shapes
def expected_tensors(spec: NM16Spec, out_features: int, in_features: int,
                     value_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name suffix -> (shape, dtype) of every tensor a packed layer must have, and no others."""
    check_in_features(spec, in_features, "layer")
    out = {
        VALUES: ((out_features, in_features * spec.n // spec.m), value_dtype),
        MASK: ((out_features, in_features // spec.m), mask_dtype(spec.m)),
    }
    if spec.has_outliers:
        width = in_features // spec.outlier_block * spec.outliers_per_block
        out[OUTLIER_VALUES] = ((out_features, width), value_dtype)
        out[OUTLIER_INDEX] = ((out_features, width), index_dtype(spec.outlier_block))
    if spec.has_scale:
        out[SCALE] = ((out_features,), SCALE_DTYPE)
    if spec.has_shift:
        out[SHIFT] = ((out_features,), SCALE_DTYPE)
    return out


def check_in_features(spec: NM16Spec, in_features: int, where: str) -> None:
    k = spec.k_multiple()
    if in_features <= 0 or in_features % k:
        what = f"the outlier block {spec.outlier_block}" if spec.has_outliers else f"M={spec.m}"
        _fail(where, f"in_features={in_features} is not a multiple of {what}; such a layer must stay dense "
                     f"(list it in 'ignore')")


# -------------------------------------------------------------------------------------------------------- bit masks
def _bit_weights(m: int, device: torch.device | None = None) -> torch.Tensor:
    return torch.tensor([1 << j for j in range(m)], dtype=torch.int64, device=device)


def encode_mask(keep: torch.Tensor, m: int) -> torch.Tensor:
    """bool [out, in] -> signed int [out, in/M] bit patterns (bit j <=> column g*M+j)."""
    out_f, in_f = keep.shape
    bits = (keep.reshape(out_f, in_f // m, m).to(torch.int64) * _bit_weights(m, keep.device)).sum(-1)
    width = torch.iinfo(mask_dtype(m)).bits
    bits = torch.where(bits >= (1 << (width - 1)), bits - (1 << width), bits)  # two's complement reinterpretation
    return bits.to(mask_dtype(m))


_BYTE_LUTS: dict[tuple[int, str], torch.Tensor] = {}


def _byte_lut(bits: int, device: torch.device) -> torch.Tensor:
    """bool [256, bits]: entry b holds the low ``bits`` bits of b, least significant first (cached per device)."""
    key = (bits, str(device))
    lut = _BYTE_LUTS.get(key)
    if lut is None:
        b = torch.arange(256, dtype=torch.int32, device=device)
        lut = ((b.unsqueeze(1) >> torch.arange(bits, dtype=torch.int32, device=device)) & 1).bool()
        _BYTE_LUTS[key] = lut
    return lut


def decode_mask(mask: torch.Tensor, m: int) -> torch.Tensor:
    """signed int [out, G] -> bool [out, G*M], through a byte lookup table (no [out, G, M] int64 intermediate)."""
    # Little-endian bytes of an int8/16/32 group: byte i holds columns 8i..8i+7 of the group (M = 4: one int8 holding
    # 4 bits, so only the low 4 bits of its byte are columns).
    lut = _byte_lut(4 if m == 4 else 8, mask.device)
    return lut[mask.contiguous().view(torch.uint8).long()].reshape(mask.shape[0], -1)


def kept_positions(mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """signed int mask [out, G] -> int64 [out, G, N]: the column (0..M-1) of each kept value inside its group, in
    increasing order -- the order of the values."""
    out_f, groups = mask.shape
    keep = decode_mask(mask, m).view(out_f, groups, m)
    # Stable sort puts the kept columns first, in increasing column order.
    return torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :n]


def popcount(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Number of set bits in each mask group, counting only the M low bits; bits above M are reported separately by
    :func:`validate_layer`."""
    bits = mask.to(torch.int64) & ((1 << m) - 1)
    return ((bits.unsqueeze(-1) >> torch.arange(m, device=mask.device)) & 1).sum(-1)


# ------------------------------------------------------------------------------------------------------ pack/unpack
def nm_keep_topk(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """bool [out, in]: the N highest-scoring positions of every group of M (ties broken by lower column)."""
    out_f, in_f = score.shape
    s = score.reshape(out_f, in_f // m, m).to(torch.float32)
    idx = torch.topk(s, n, dim=-1, sorted=False).indices
    keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
    return keep.reshape(out_f, in_f)


def outlier_positions_topk(score: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """bool [out, in]: the k highest-scoring positions of every (row, block of B columns)."""
    out_f, in_f = score.shape
    s = score.reshape(out_f, in_f // block, block).to(torch.float32)
    idx = torch.topk(s, k, dim=-1, sorted=False).indices
    return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True).reshape(out_f, in_f)


def pack(weight_nm: torch.Tensor, keep: torch.Tensor, spec: NM16Spec, *, outliers: torch.Tensor | None = None,
         outlier_mask: torch.Tensor | None = None, scale: torch.Tensor | None = None,
         shift: torch.Tensor | None = None, name: str = "layer") -> dict[str, torch.Tensor]:
    """Pack one layer. Returns suffix -> tensor (see the module docstring).

    weight_nm: [out, in] bf16/fp16, the N:M part (values outside ``keep`` are ignored).
    keep: bool [out, in] with exactly N True per group of M.
    outliers / outlier_mask: [out, in] values and bool positions, exactly k per (row, block) (spec.has_outliers).
    scale / shift: [out] (spec.has_scale / spec.has_shift).
    The result passes :func:`validate_layer`; a wrong input raises NM16FormatError naming ``name``.
    """
    if weight_nm.dtype not in VALUE_DTYPES:
        _fail(name, f"weight dtype {weight_nm.dtype} is not bf16/fp16")
    out_f, in_f = weight_nm.shape
    check_in_features(spec, in_f, name)
    if keep.shape != weight_nm.shape or keep.dtype != torch.bool:
        _fail(name, f"keep must be a bool tensor of shape {tuple(weight_nm.shape)}")
    per_group = keep.reshape(out_f, in_f // spec.m, spec.m).sum(-1)
    if not bool((per_group == spec.n).all()):
        _fail(name, f"keep mask must hold exactly {spec.n} of every {spec.m} columns")
    tensors = {
        VALUES: weight_nm[keep].reshape(out_f, in_f * spec.n // spec.m).contiguous(),
        MASK: encode_mask(keep, spec.m),
    }
    if spec.has_outliers:
        if outliers is None or outlier_mask is None:
            _fail(name, "the spec has outliers but none were given")
        b, k = spec.outlier_block, spec.outliers_per_block
        pos = outlier_mask.reshape(out_f, in_f // b, b)
        if not bool((pos.sum(-1) == k).all()):
            _fail(name, f"outlier mask must hold exactly {k} of every {b} columns")
        # Stable sort puts the k chosen offsets first, in increasing column order.
        order = torch.sort((~pos).to(torch.int8), dim=-1, stable=True).indices[..., :k]
        vals = torch.gather(outliers.to(weight_nm.dtype).reshape(out_f, in_f // b, b), -1, order)
        tensors[OUTLIER_VALUES] = vals.reshape(out_f, -1).contiguous()
        tensors[OUTLIER_INDEX] = order.reshape(out_f, -1).to(index_dtype(b)).contiguous()
    elif outliers is not None:
        _fail(name, "outliers given but the spec has no outlier budget")
    for suffix, flag, vec in ((SCALE, spec.has_scale, scale), (SHIFT, spec.has_shift, shift)):
        if flag:
            if vec is None or vec.shape != (out_f,):
                _fail(name, f"{suffix} of shape ({out_f},) is required by the spec")
            tensors[suffix] = vec.to(SCALE_DTYPE).contiguous()
        elif vec is not None:
            _fail(name, f"{suffix} given but the spec does not declare it")
    return tensors


@dataclass
class UnpackedLayer:
    """The parts of a packed layer as dense tensors (float32 unless noted)."""

    weight_nm: torch.Tensor           # [out, in], zeros outside the mask, value dtype
    keep: torch.Tensor                # bool [out, in]
    outliers: torch.Tensor | None     # [out, in], zeros off the outlier positions, value dtype
    scale: torch.Tensor | None        # [out] float32
    shift: torch.Tensor | None        # [out] float32

    def effective_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_eff = diag(scale) @ W_nm + W_out, computed in float32 then cast."""
        w = self.weight_nm.to(torch.float32)
        if self.scale is not None:
            w = w * self.scale.to(torch.float32)[:, None]
        if self.outliers is not None:
            w = w + self.outliers.to(torch.float32)
        return w.to(dtype)


def unpack(tensors: Mapping[str, torch.Tensor], spec: NM16Spec, in_features: int | None = None) -> UnpackedLayer:
    """Inverse of :func:`pack` (call :func:`validate_layer` first for untrusted input)."""
    values, mask = tensors[VALUES], tensors[MASK]
    out_f = values.shape[0]
    in_f = in_features if in_features is not None else mask.shape[1] * spec.m
    keep = decode_mask(mask, spec.m)
    w = torch.zeros((out_f, in_f), dtype=values.dtype, device=values.device)
    w[keep] = values.reshape(-1)
    outl = None
    if spec.has_outliers:
        b, k = spec.outlier_block, spec.outliers_per_block
        idx = tensors[OUTLIER_INDEX].to(torch.int64).reshape(out_f, in_f // b, k)
        outl = torch.zeros((out_f, in_f // b, b), dtype=values.dtype, device=values.device)
        outl.scatter_(-1, idx, tensors[OUTLIER_VALUES].reshape(out_f, in_f // b, k))
        outl = outl.reshape(out_f, in_f)
    return UnpackedLayer(weight_nm=w, keep=keep, outliers=outl,
                         scale=tensors.get(SCALE) if spec.has_scale else None,
                         shift=tensors.get(SHIFT) if spec.has_shift else None)


# --------------------------------------------------------------------------------------------------------- validate
def validate_layer(tensors: Mapping[str, torch.Tensor], spec: NM16Spec, *, name: str, out_features: int,
                   in_features: int, value_dtype: torch.dtype | None = None, check_values: bool = True) -> None:
    """Check every invariant of one packed layer; raise NM16FormatError naming the layer and tensor.

    Checks: no missing or extra tensors, exact shapes and dtypes, popcount exactly N per mask group and no bit set at or
    above M, outlier offsets in [0, B) and strictly increasing per block, finite values/outliers/scales/shifts.
    ``check_values=False`` skips the data checks (shape/dtype only).
    """
    check_in_features(spec, in_features, name)
    if value_dtype is None:
        v = tensors.get(VALUES)
        value_dtype = v.dtype if v is not None else torch.bfloat16
    if value_dtype not in VALUE_DTYPES:
        _fail(f"{name}.{VALUES}", f"dtype {value_dtype} is not bf16/fp16")
    expected = expected_tensors(spec, out_features, in_features, value_dtype)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        _fail(name, f"missing tensor(s) {', '.join(f'{name}.{s}' for s in missing)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        _fail(name, f"unexpected tensor(s) {', '.join(f'{name}.{s}' for s in extra)} for spec {spec.pattern}, "
                    f"outliers={spec.has_outliers}, scale={spec.has_scale}, shift={spec.has_shift}")
    for suffix, (shape, dtype) in expected.items():
        t = tensors[suffix]
        if tuple(t.shape) != shape:
            _fail(f"{name}.{suffix}", f"shape {tuple(t.shape)} != expected {shape}")
        if t.dtype != dtype:
            _fail(f"{name}.{suffix}", f"dtype {t.dtype} != expected {dtype}")
    if not check_values:
        return
    mask = tensors[MASK]
    if spec.m < torch.iinfo(mask.dtype).bits:
        high = (mask.to(torch.int64) & ~((1 << spec.m) - 1)) != 0
        if bool(high.any()):
            r, g = (int(i) for i in high.nonzero()[0])
            _fail(f"{name}.{MASK}", f"bits above M={spec.m} set (row {r}, group {g})")
    bad = popcount(mask, spec.m) != spec.n
    if bool(bad.any()):
        r, g = (int(i) for i in bad.nonzero()[0])
        _fail(f"{name}.{MASK}", f"popcount {int(popcount(mask[r:r+1, g:g+1], spec.m))} != N={spec.n} "
                                f"(row {r}, group {g}; {int(bad.sum())} bad group(s))")
    finite_checks = [VALUES] + ([OUTLIER_VALUES] if spec.has_outliers else []) + \
        ([SCALE] if spec.has_scale else []) + ([SHIFT] if spec.has_shift else [])
    for suffix in finite_checks:
        t = tensors[suffix]
        nonfinite = ~torch.isfinite(t)
        if bool(nonfinite.any()):
            where = tuple(int(i) for i in nonfinite.nonzero()[0])
            _fail(f"{name}.{suffix}", f"{int(nonfinite.sum())} non-finite value(s) (NaN/Inf), first at {where}")
    if spec.has_outliers:
        b, k = spec.outlier_block, spec.outliers_per_block
        idx = tensors[OUTLIER_INDEX].to(torch.int64)
        out_of_range = (idx < 0) | (idx >= b)
        if bool(out_of_range.any()):
            r, c = (int(i) for i in out_of_range.nonzero()[0])
            _fail(f"{name}.{OUTLIER_INDEX}", f"offset {int(idx[r, c])} out of range [0, {b}) at ({r}, {c})")
        if k > 1:
            per_block = idx.reshape(out_features, in_features // b, k)
            not_increasing = per_block[..., 1:] <= per_block[..., :-1]
            if bool(not_increasing.any()):
                r, blk, _ = (int(i) for i in not_increasing.nonzero()[0])
                _fail(f"{name}.{OUTLIER_INDEX}", f"offsets not strictly increasing in row {r}, block {blk}")


def split_layer_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group a flat state dict's nm16 tensors by layer prefix: {prefix: {suffix: tensor}}."""
    suffixes = (VALUES, MASK, OUTLIER_VALUES, OUTLIER_INDEX, SCALE, SHIFT)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        prefix, _, suffix = key.rpartition(".")
        if suffix in suffixes:
            layers.setdefault(prefix, {})[suffix] = t
    return layers


# ---------------------------------------------------------------------------------------------------------- config
def read_spec(model_dir: str | Path) -> NM16Spec:
    """Parse ``quantization_config`` from a checkpoint folder's config.json."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        _fail(str(model_dir), "no config.json")
    cfg = json.loads(path.read_text())
    if "quantization_config" not in cfg:
        _fail(str(path), "no 'quantization_config' (not an nm16 checkpoint)")
    return NM16Spec.from_config(cfg["quantization_config"])


# ----------------------------------------------------------------------------------------------- bytes accounting
def metadata_bits_per_group(n: int, m: int, accounting: str = "bitmask") -> int:
    """Bits of position metadata per group of M: 'bitmask' = M, 'combinatorial' = ceil(log2 C(M, N))."""
    if accounting == "bitmask":
        return m
    if accounting == "combinatorial":
        return math.ceil(math.log2(math.comb(m, n)))
    raise ValueError(f"unknown accounting {accounting!r} (bitmask|combinatorial)")


def layer_bytes(spec: NM16Spec, out_features: int, in_features: int, value_bytes: int = 2,
                accounting: str = "bitmask") -> dict[str, float]:
    """Bytes of one packed layer vs its dense weight.

    Returns dense, values, metadata, outliers (values + indices), scale_shift, total, ratio (= total / dense) and
    bits_per_weight (= 8 * total / (out * in)).
    """
    groups = out_features * in_features // spec.m
    dense = out_features * in_features * value_bytes
    values = groups * spec.n * value_bytes
    metadata = groups * metadata_bits_per_group(spec.n, spec.m, accounting) / 8
    outliers = 0.0
    if spec.has_outliers:
        count = out_features * in_features // spec.outlier_block * spec.outliers_per_block
        outliers = count * (value_bytes + torch.tensor([], dtype=index_dtype(spec.outlier_block)).element_size())
    vec = out_features * 4 * (int(spec.has_scale) + int(spec.has_shift))
    total = values + metadata + outliers + vec
    return {"dense": float(dense), "values": float(values), "metadata": float(metadata), "outliers": float(outliers),
            "scale_shift": float(vec), "total": float(total), "ratio": total / dense,
            "bits_per_weight": 8 * total / (out_features * in_features)}
