"""The nm16 format: pack -> unpack round trips (property tests) and validate() rejects every corruption by name."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_nm16 import format as fmt
from vllm_nm16.format import NM16FormatError, NM16Spec

PATTERNS = [(n, m) for m in fmt.SUPPORTED_M for n in range(1, m)]


@st.composite
def layer_case(draw):
    n, m = draw(st.sampled_from(PATTERNS))
    with_outliers = draw(st.booleans())
    block = None
    k = 0
    if with_outliers:
        block = m * draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
        block = min(block, 512)
        k = draw(st.integers(1, min(block, 8)))
    groups = draw(st.integers(1, 4))
    in_f = (block or m) * groups
    out_f = draw(st.integers(1, 9))
    spec = NM16Spec(n=n, m=m, outlier_block=block, outliers_per_block=k, has_scale=draw(st.booleans()),
                    has_shift=draw(st.booleans()))
    dtype = draw(st.sampled_from(fmt.VALUE_DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    return spec, out_f, in_f, dtype, seed


def _random_layer(spec: NM16Spec, out_f: int, in_f: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    # Random (not magnitude) keep sets, so the test covers every bit pattern, zeros among kept weights included.
    keep = fmt.nm_keep_topk(torch.rand(out_f, in_f, generator=g), spec.n, spec.m)
    w[0, 0] = 0  # a kept weight may be zero
    kw = {}
    if spec.has_outliers:
        kw["outlier_mask"] = fmt.outlier_positions_topk(torch.rand(out_f, in_f, generator=g), spec.outliers_per_block,
                                                        spec.outlier_block)
        kw["outliers"] = torch.randn(out_f, in_f, generator=g).to(dtype)
    if spec.has_scale:
        kw["scale"] = torch.rand(out_f, generator=g) + 0.5
    if spec.has_shift:
        kw["shift"] = torch.randn(out_f, generator=g)
    return w, keep, kw


@settings(max_examples=200, deadline=None)
@given(layer_case())
def test_pack_unpack_round_trip(case):
    spec, out_f, in_f, dtype, seed = case
    w, keep, kw = _random_layer(spec, out_f, in_f, dtype, seed)
    tensors = fmt.pack(w, keep, spec, **kw)
    fmt.validate_layer(tensors, spec, name="layer", out_features=out_f, in_features=in_f)
    assert {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} == \
        {k: v for k, v in fmt.expected_tensors(spec, out_f, in_f, dtype).items()}
    u = fmt.unpack(tensors, spec, in_f)
    assert torch.equal(u.keep, keep)
    assert torch.equal(u.weight_nm, torch.where(keep, w, torch.zeros_like(w)))
    if spec.has_outliers:
        assert torch.equal(u.outliers, torch.where(kw["outlier_mask"], kw["outliers"], torch.zeros_like(w)))
    else:
        assert u.outliers is None
    expected = torch.where(keep, w, torch.zeros_like(w)).float()
    if spec.has_scale:
        assert torch.equal(u.scale, kw["scale"])
        expected = expected * kw["scale"][:, None]
    if spec.has_outliers:
        expected = expected + u.outliers.float()
    assert torch.equal(u.effective_weight(), expected)


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(PATTERNS), st.integers(0, 2**31 - 1))
def test_mask_encoding_matches_bit_definition(nm, seed):
    """bit j of group g set <=> column g*M + j kept; stored as signed two's complement of the dtype width."""
    n, m = nm
    keep = fmt.nm_keep_topk(torch.rand(3, 2 * m, generator=torch.Generator().manual_seed(seed)), n, m)
    mask = fmt.encode_mask(keep, m)
    assert mask.dtype == fmt.mask_dtype(m)
    for r in range(3):
        for g in range(2):
            value = int(mask[r, g]) & ((1 << m) - 1)
            cols = [j for j in range(m) if value >> j & 1]
            assert cols == [j for j in range(m) if keep[r, g * m + j]]
    assert torch.equal(fmt.decode_mask(mask, m), keep)


def test_high_bit_is_negative_int16():
    keep = torch.zeros(1, 16, dtype=torch.bool)
    keep[0, 8:] = True  # bits 8..15: 0xFF00 -> -256 as int16
    assert int(fmt.encode_mask(keep, 16)[0, 0]) == -256


def test_bytes_accounting():
    spec = NM16Spec()
    b = fmt.layer_bytes(spec, 4096, 4096)
    assert b["ratio"] == pytest.approx(0.5625)
    assert b["bits_per_weight"] == pytest.approx(9.0)
    c = fmt.layer_bytes(spec, 4096, 4096, accounting="combinatorial")
    assert c["metadata"] == 4096 * 4096 / 16 * 14 / 8  # ceil(log2 C(16, 8)) = 14 bits per group
    assert fmt.metadata_bits_per_group(2, 4, "combinatorial") == 3  # C(4,2)=6
    o = fmt.layer_bytes(NM16Spec(outlier_block=256, outliers_per_block=4, has_scale=True), 4096, 4096)
    per_weight_outlier = 4 / 256 * (2 + 1)  # bf16 value + uint8 index
    assert o["total"] == pytest.approx(b["total"] + 4096 * 4096 * per_weight_outlier + 4096 * 4)


# ---------------------------------------------------------------------------------------------- validate rejects
SPEC = NM16Spec(n=8, m=16, outlier_block=64, outliers_per_block=2, has_scale=True, has_shift=True)
OUT_F, IN_F = 4, 128


@pytest.fixture
def packed():
    w, keep, kw = _random_layer(SPEC, OUT_F, IN_F, torch.bfloat16, 0)
    return fmt.pack(w, keep, SPEC, **kw)


def _check(tensors, spec=SPEC, in_f=IN_F):
    fmt.validate_layer(tensors, spec, name="model.layers.0.mlp.up_proj", out_features=OUT_F, in_features=in_f)


def test_valid_layer_passes(packed):
    _check(packed)


def _corrupt_popcount(t):
    t[fmt.MASK][1, 3] = 0b0111  # three bits


def _corrupt_high_bits(t):
    spec4 = NM16Spec(n=2, m=4)
    keep = fmt.nm_keep_topk(torch.rand(OUT_F, IN_F), 2, 4)
    t.clear()
    t.update(fmt.pack(torch.randn(OUT_F, IN_F).bfloat16(), keep, spec4))
    t[fmt.MASK][0, 0] = t[fmt.MASK][0, 0] | 0b0100_0000  # a bit above M=4
    return spec4


CORRUPTIONS = {
    "missing tensor": (lambda t: t.pop(fmt.OUTLIER_INDEX), "missing tensor(s) model.layers.0.mlp.up_proj.outlier_index"),
    "extra tensor": (lambda t: t.__setitem__("weight", torch.zeros(OUT_F, IN_F)), "unexpected tensor(s)"),
    "wrong values shape": (lambda t: t.__setitem__(fmt.VALUES, t[fmt.VALUES][:, :-8].contiguous()),
                           "weight_values: shape (4, 56) != expected (4, 64)"),
    "wrong mask dtype": (lambda t: t.__setitem__(fmt.MASK, t[fmt.MASK].to(torch.int32)),
                         "weight_mask: dtype torch.int32 != expected torch.int16"),
    "wrong scale dtype": (lambda t: t.__setitem__(fmt.SCALE, t[fmt.SCALE].half()), "weight_scale: dtype"),
    "wrong outlier shape": (lambda t: t.__setitem__(fmt.OUTLIER_VALUES, t[fmt.OUTLIER_VALUES][:2]),
                            "outlier_values: shape"),
    "popcount": (_corrupt_popcount, "weight_mask: popcount 3 != N=8 (row 1, group 3"),
    "NaN value": (lambda t: t[fmt.VALUES].__setitem__((2, 5), float("nan")), "weight_values: 1 non-finite"),
    "Inf outlier": (lambda t: t[fmt.OUTLIER_VALUES].__setitem__((0, 1), float("inf")), "outlier_values: 1 non-finite"),
    "NaN scale": (lambda t: t[fmt.SCALE].__setitem__(3, float("nan")), "weight_scale: 1 non-finite"),
    "Inf shift": (lambda t: t[fmt.SHIFT].__setitem__(0, float("-inf")), "weight_shift: 1 non-finite"),
    "outlier index out of range": (lambda t: t[fmt.OUTLIER_INDEX].__setitem__((1, 1), 200),
                                   "outlier_index: offset 200 out of range [0, 64)"),
    "outlier index repeated": (lambda t: t[fmt.OUTLIER_INDEX].__setitem__((1, 1), t[fmt.OUTLIER_INDEX][1, 0]),
                               "outlier_index: offsets not strictly increasing in row 1, block 0"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_validate_rejects(packed, case):
    corrupt, message = CORRUPTIONS[case]
    corrupt(packed)
    with pytest.raises(NM16FormatError) as e:
        _check(packed)
    assert "model.layers.0.mlp.up_proj" in str(e.value)
    assert message in str(e.value)


def test_validate_rejects_bits_above_m():
    t: dict = {}
    spec4 = _corrupt_high_bits(t)
    with pytest.raises(NM16FormatError, match=r"up_proj.weight_mask: bits above M=4 set \(row 0, group 0\)"):
        _check(t, spec=spec4)


def test_validate_rejects_in_features_not_multiple(packed):
    with pytest.raises(NM16FormatError, match="in_features=120 is not a multiple of the outlier block 64"):
        _check(packed, in_f=120)
    with pytest.raises(NM16FormatError, match="in_features=24 is not a multiple of M=16"):
        fmt.validate_layer({}, NM16Spec(), name="x", out_features=1, in_features=24)


def test_pack_refuses_bad_keep():
    w = torch.randn(2, 32).bfloat16()
    keep = torch.zeros(2, 32, dtype=torch.bool)
    keep[:, :7] = True
    with pytest.raises(NM16FormatError, match="exactly 8 of every 16"):
        fmt.pack(w, keep, NM16Spec(), name="q")


# ------------------------------------------------------------------------------------------------- config parsing
GOOD = NM16Spec(outlier_block=256, outliers_per_block=4, has_scale=True, ignore=("lm_head",),
                recipe={"method": "sparsegpt"}).to_config()


def test_config_round_trip(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": GOOD}))
    spec = fmt.read_spec(tmp_path)
    assert spec == NM16Spec.from_config(GOOD)
    assert spec.recipe == {"method": "sparsegpt"} and spec.ignore == ("lm_head",)


@pytest.mark.parametrize("change, message", [
    ({"quant_method": "gptq"}, "field 'quant_method' must be 'nm16'"),
    ({"format_version": 2}, "field 'format_version' 2 is not supported"),
    ({"m": 12}, "field 'm' must be one of"),
    ({"n": 16}, "field 'n' must satisfy 0 < n < m=16"),
    ({"n": "8"}, "field 'n' must be an integer"),
    ({"outlier_block": 100}, "field 'outlier_block' must be a positive multiple of m=16"),
    ({"outliers_per_block": 0}, "field 'outliers_per_block' must be in 1..256"),
    ({"outlier_block": None}, "field 'outliers_per_block' must be 0 when 'outlier_block' is null"),
    ({"has_scale": "yes"}, "field 'has_scale' must be true or false"),
    ({"colour": "blue"}, "unknown field(s) ['colour']"),
    ({"ignore": "lm_head"}, "field 'ignore' must be a list"),
])
def test_config_rejects(change, message):
    with pytest.raises(NM16FormatError) as e:
        NM16Spec.from_config({**GOOD, **change})
    assert message in str(e.value)


def test_read_spec_requires_quantization_config(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(NM16FormatError, match="no 'quantization_config'"):
        fmt.read_spec(tmp_path)
