"""Variance correction matches output variances on the calibration data; the equalization fold preserves the dense
function; the true-sequential statistics see the compressed earlier layers."""

from __future__ import annotations

import copy

import pytest
import torch

from offline import correction, equalize, scoring
from offline.compressor import Stats, capture_block_inputs, equalize_block
from offline.models import linear_groups
from offline.outliers import structured_positions
from offline.scoring import Pattern


def _calib(tokens=2048, dim=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, dim // 2, generator=g) @ torch.randn(dim // 2, dim, generator=g)) + 0.3
    return x * torch.exp(0.5 * torch.randn(dim, generator=g))


@pytest.mark.parametrize("mode", ["channel", "tensor"])
@pytest.mark.parametrize("with_outliers", [False, True])
def test_variance_correction_matches_variances(mode, with_outliers):
    X = _calib()
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    protect = structured_positions(W.abs(), 4, 64) if with_outliers else None
    Wp, keep = scoring.wanda_prune(W, X.norm(dim=0), Pattern(8, 16), protect)
    w_nm = Wp * keep
    w_out = Wp * protect if with_outliers else None
    st = Stats.empty(128, "cpu")
    st.add(X)
    C = correction.covariance(st.H.double(), st.xsum, st.count)
    s = correction.variance_scale(W, w_nm, w_out, C, mode)
    assert s.shape == (48,) and s.dtype == torch.float32
    w_eff = w_nm * s[:, None] + (w_out if w_out is not None else 0)
    var_dense = (X.double() @ W.double().T).var(0, correction=0)
    var_before = (X.double() @ (w_nm + (w_out if w_out is not None else 0)).double().T).var(0, correction=0)
    var_after = (X.double() @ w_eff.double().T).var(0, correction=0)
    assert not torch.allclose(var_before, var_dense, rtol=1e-2), "pruning changes the output variances"
    if mode == "channel":
        torch.testing.assert_close(var_after, var_dense, rtol=1e-3, atol=0)
    else:
        assert abs(float(var_after.sum() / var_dense.sum()) - 1) < 1e-3
        assert torch.unique(s).numel() == 1


def test_mean_shift_restores_output_mean():
    X = _calib()
    W = torch.randn(16, 128)
    Wp, keep = scoring.magnitude_prune(W, Pattern(8, 16))
    shift = correction.mean_shift(W, Wp, X.mean(0))
    torch.testing.assert_close((X @ Wp.T + shift).mean(0), (X @ W.T).mean(0), rtol=1e-4, atol=1e-3)


def test_relative_error_from_hessian_is_exact():
    X = _calib()
    W = torch.randn(16, 128)
    Wp, _ = scoring.magnitude_prune(W, Pattern(8, 16))
    direct = float(((X.double() @ (Wp - W).double().T) ** 2).sum() / ((X.double() @ W.double().T) ** 2).sum())
    assert correction.relative_error(W, Wp, (X.T @ X)) == pytest.approx(direct, rel=1e-4)


def test_gqa_index_maps_query_heads_to_their_kv_head():
    idx = equalize.gqa_index(heads=4, kv_heads=2, head_dim=3)
    assert idx.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_equalization_fold_is_function_preserving(make_llama, alpha):
    """Equalize every block (norms, v rows, up rows absorb 1/s; GQA with 4 query / 2 KV heads): the dense model's
    logits are unchanged up to float rounding, while the weights really changed."""
    from transformers import AutoModelForCausalLM

    path = make_llama(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, seed=3)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # A random Llama has near-uniform activations: give its norms a spread so equalization has something to do.
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.mul_(torch.exp(torch.randn(64)))
    ids = torch.randint(0, 1000, (3, 32), generator=torch.Generator().manual_seed(0))
    original = copy.deepcopy(model)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    xs, kwargs = capture_block_inputs(model, ids, batch=2, device="cpu")
    cfg = model.config
    for layer in model.model.layers:
        equalize_block(layer, linear_groups(cfg.to_dict()), xs, kwargs, alpha, heads=cfg.num_attention_heads,
                       kv_heads=cfg.num_key_value_heads, head_dim=cfg.hidden_size // cfg.num_attention_heads)
        with torch.no_grad():
            xs = [_out(layer(x, **kwargs)) for x in xs]
    before = dict(original.named_parameters())
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    for part in ("input_layernorm", "post_attention_layernorm", "q_proj", "v_proj", "o_proj", "up_proj",
                 "down_proj"):
        assert any(part in n for n in changed), f"equalization did not touch {part}"
    with torch.no_grad():
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # Stored in bf16 (what a checkpoint holds), the folded model is as close to the fp32 reference as the unfolded
    # model stored in bf16 is: the fold adds no error beyond bf16 rounding.
    with torch.no_grad():
        err_folded = (model.to(torch.bfloat16)(input_ids=ids).logits.float() - ref).abs().mean()
        err_plain = (original.to(torch.bfloat16)(input_ids=ids).logits.float() - ref).abs().mean()
    assert err_folded < 2 * err_plain + 1e-3, (err_folded, err_plain)


def _out(y):
    return y[0] if isinstance(y, tuple) else y
