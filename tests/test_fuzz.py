"""Seeded fuzz of the pure-torch paths (CPU, CI; issue 14 item 5's small fuzz): random layers against the float64
reference of the on-disk tensors.

* The PyTorch backend (``backends.BACKENDS["torch"].process_weights`` + the ``nm16::linear`` op with backend
  ``torch``) vs ``nm16_dev.kernel_testing.reference_linear`` (``format.unpack``, float64), over N (multiple of 16),
  K (multiple of M and of the outlier block B, often not of 128), M 1-40 tokens, 2:4 / 4:8 / 8:16 / 16:32, outliers
  on/off with any k < B the format allows, scale / shift / bias on/off, bf16/fp16 values and bf16/fp16/fp32
  activations. Bound: relative Frobenius error of the output, per activation dtype (tests/kernel_cases.py's bounds).
* The CPU model of the Gluon kernel (``kernels.fragment.unpack_like_kernel``: its load offsets + decode program) vs
  ``format.unpack`` on random 8:16 layers (K multiple of 32, N multiple of 16, bf16/fp16): bit-exact, with random
  16-bit patterns as values (sign bits, NaN/Inf patterns: the decode moves bits, it never computes on them).

Hypothesis runs derandomized (a fixed seed per test, the same examples every run) with a bounded number of examples;
the data of an example comes from a drawn seed through torch.Generator, so a failure prints everything needed to
replay it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nm16_dev.kernel_testing import layer_args, random_layer, reference_linear
from kernel_cases import REL_ERR_BOUND, REL_ERR_BOUND_FP16, REL_ERR_BOUND_FP32
from vllm_nm16 import backends, ops
from vllm_nm16 import format as fmt
from vllm_nm16.kernels import fragment as fr

PATTERNS = ((2, 4), (4, 8), (8, 16), (16, 32))
BOUND = {torch.bfloat16: REL_ERR_BOUND, torch.float16: REL_ERR_BOUND_FP16, torch.float32: REL_ERR_BOUND_FP32}
# 150 layers each, about 12 s for both tests on 2 busy cores (plus the imports)
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the layers are tiny, and on shared, busy cores the OpenMP team's spinning made the
    torch-path test 5x slower in wall time (36 s vs 7 s at a load average of 15 on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@st.composite
def torch_cases(draw):
    n, m = draw(st.sampled_from(PATTERNS))
    out_f = 16 * draw(st.integers(1, 6))
    outliers = draw(st.booleans())
    if outliers:
        # B: a multiple of M (the format's rule), K: a multiple of B; k in 1..B-1
        block = m * draw(st.integers(1, max(1, 256 // m)))
        in_f = block * draw(st.integers(1, max(1, 640 // block)))
        k = draw(st.integers(1, block - 1))
    else:
        block, k = None, 0
        in_f = m * draw(st.integers(1, 640 // m))
    return {
        "n": n, "m": m, "N": out_f, "K": in_f, "B": block, "k": k,
        "M": draw(st.integers(1, 40)),
        "scale": draw(st.booleans()), "shift": draw(st.booleans()), "bias": draw(st.booleans()),
        "wdtype": draw(st.sampled_from((torch.bfloat16, torch.float16))),
        "xdtype": draw(st.sampled_from((torch.bfloat16, torch.float16, torch.float32))),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def torch_path_error(c: dict) -> float:
    """Relative Frobenius error of the PyTorch backend's output against the float64 reference, for one case."""
    g = torch.Generator().manual_seed(c["seed"])
    t = random_layer(c["N"], c["K"], n=c["n"], m=c["m"], outlier_block=c["B"], outliers_per_block=c["k"],
                     scale=c["scale"], shift=c["shift"], dtype=c["wdtype"], generator=g)
    v, mk, ov, oi, sc, sh = layer_args(t)
    spec = fmt.NM16Spec(n=c["n"], m=c["m"], outlier_block=c["B"], outliers_per_block=c["k"], has_scale=c["scale"],
                        has_shift=c["shift"])
    fmt.validate_layer(t, spec, name="fuzz", out_features=c["N"], in_features=c["K"])
    geom = backends.LayerGeometry.from_spec(spec, in_features=c["K"], out_features=c["N"], act_dtype=c["xdtype"])
    backend = backends.BACKENDS["torch"]
    assert backend.can_implement(geom, torch.device("cpu"))[0]
    p = backend.process_weights(geom, v, mk, ov, oi, sc, sh)
    x = torch.randn(c["M"], c["K"], generator=g).to(c["xdtype"])
    bias = torch.randn(c["N"], generator=g).to(c["xdtype"]) if c["bias"] else None
    y = ops.nm16_linear(x, p["values"], p["positions"], p["outlier_values"], p["outlier_index"], p["scale"],
                        p["shift"], bias, geom.n, geom.m, geom.outlier_block, geom.outliers_per_block, c["K"], c["N"],
                        backend.name)
    assert y.dtype == c["xdtype"] and y.shape == (c["M"], c["N"])
    assert bool(torch.isfinite(y).all())
    ref = reference_linear(x, v, mk, ov, oi, sc, sh, bias, n=c["n"], m=c["m"], outlier_block=c["B"],
                           outliers_per_block=c["k"])
    return float((y.double() - ref).norm() / ref.norm())


@FUZZ
@given(torch_cases())
def test_fuzz_torch_path_vs_float64_reference(c):
    err = torch_path_error(c)
    assert err <= BOUND[c["xdtype"]], f"rel. Frobenius error {err:.3g} > {BOUND[c['xdtype']]:g} for {c}"


@st.composite
def fragment_cases(draw):
    return {
        "N": 16 * draw(st.integers(1, 8)),
        "K": 32 * draw(st.integers(1, 40)),      # 32..1280: partial 128-column steps and whole ones
        "dtype": draw(st.sampled_from((torch.bfloat16, torch.float16))),
        "masks": draw(st.sampled_from(("random", "low8", "high8", "alternating", "mixed"))),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _fragment_keep(kind: str, n_rows: int, k: int, g: torch.Generator) -> torch.Tensor:
    score = torch.rand(n_rows, k, generator=g)
    col = torch.arange(k) % 16
    fixed = {"low8": col < 8, "high8": col >= 8, "alternating": col % 2 == 0}
    if kind in fixed:
        score = score * 0.5 + fixed[kind].float()            # the fixed columns win every group
    elif kind == "mixed":                                     # each group picks one of the fixed patterns or random
        pick = torch.randint(0, 4, (n_rows, k // 16), generator=g).repeat_interleave(16, dim=1)
        for i, f in enumerate(fixed.values()):
            score = torch.where(pick == i, score * 0.5 + f.float(), score)
    return fmt.nm_keep_topk(score, 8, 16)


@FUZZ
@given(fragment_cases())
def test_fuzz_fragment_decode_vs_format_unpack(c):
    g = torch.Generator().manual_seed(c["seed"])
    keep = _fragment_keep(c["masks"], c["N"], c["K"], g)
    # Random 16-bit patterns as the weights: every sign/exponent/mantissa bit (NaN and Inf patterns too) must
    # land unchanged in its column.
    w = torch.randint(-2**15, 2**15, (c["N"], c["K"]), dtype=torch.int32, generator=g).to(torch.int16)
    w = w.view(c["dtype"])
    spec = fmt.NM16Spec(n=8, m=16)
    t = fmt.pack(w, keep, spec)
    dense = fmt.unpack(t, spec).weight_nm
    got = fr.unpack_like_kernel(t[fmt.VALUES], t[fmt.MASK])
    assert got.dtype == c["dtype"] and got.shape == (c["N"], c["K"])
    diff = got.view(torch.int16) != dense.view(torch.int16)
    assert not bool(diff.any()), f"{int(diff.sum())} weight(s) differ, first at {diff.nonzero()[0].tolist()}: {c}"
    # the kept positions hold the values, bit for bit, in order
    np.testing.assert_array_equal(got.view(torch.int16)[keep].numpy(), t[fmt.VALUES].view(torch.int16).reshape(-1))
