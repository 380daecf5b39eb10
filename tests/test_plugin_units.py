"""Fast checks of the plugin's pieces without starting vLLM: the custom op's CPU path against the format's reference
unpack (every supported N:M, with and without outliers/scale/shift/bias), the op's registration (opcheck: schema,
fake implementation, torch.compile tracing), the config parser and layer routing, and the checkpoint-name check."""

from __future__ import annotations

import pytest
import torch

from vllm_nm16 import format as fmt
from vllm_nm16 import backends, ops


def _layer(spec: fmt.NM16Spec, out_f: int, in_f: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g).to(torch.bfloat16)
    keep = fmt.nm_keep_topk(w.abs(), spec.n, spec.m)
    kw = {}
    if spec.has_outliers:
        pos = fmt.outlier_positions_topk(w.abs() * (~keep), spec.outliers_per_block, spec.outlier_block)
        kw.update(outliers=w * pos, outlier_mask=pos)
    if spec.has_scale:
        kw["scale"] = torch.rand(out_f, generator=g) + 0.5
    if spec.has_shift:
        kw["shift"] = torch.randn(out_f, generator=g)
    return fmt.pack(w, keep, spec, **kw)


SPECS = [
    fmt.NM16Spec(),
    fmt.NM16Spec(n=8, m=16, outlier_block=64, outliers_per_block=2, has_scale=True, has_shift=True),
    fmt.NM16Spec(n=2, m=4, has_scale=True),
    fmt.NM16Spec(n=4, m=8, outlier_block=32, outliers_per_block=1, has_shift=True),
    fmt.NM16Spec(n=16, m=32, outlier_block=128, outliers_per_block=3, has_scale=True),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.pattern}-o{s.outliers_per_block}-s{int(s.has_scale)}"
                                                     f"-h{int(s.has_shift)}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_op_matches_unpack(spec, dtype):
    out_f, in_f = 48, 256
    t = _layer(spec, out_f, in_f, seed=1)
    up = fmt.unpack(t, spec)
    geom = backends.LayerGeometry.from_spec(spec, in_features=in_f, out_features=out_f, act_dtype=dtype)
    backend = backends.choose_backend(geom, torch.device("cpu"))
    assert backend.name == "torch"
    p = backend.process_weights(geom, t[fmt.VALUES], t[fmt.MASK], t.get(fmt.OUTLIER_VALUES), t.get(fmt.OUTLIER_INDEX),
                                t.get(fmt.SCALE), t.get(fmt.SHIFT))
    x = torch.randn(5, in_f).to(dtype)
    bias = torch.randn(out_f).to(dtype)
    y = ops.nm16_linear(x, p["values"], p["positions"], p["outlier_values"], p["outlier_index"], p["scale"],
                        p["shift"], bias, geom.n, geom.m, geom.outlier_block, geom.outliers_per_block, in_f, out_f,
                        backend.name)
    assert y.dtype == dtype and y.shape == (5, out_f)
    ref = x.double() @ up.effective_weight(torch.float64).T + bias.double()
    if up.shift is not None:
        ref = ref + up.shift.double()
    tol = 1e-4 if dtype == torch.float32 else 0.1  # bf16: rounding of the scaled weight and of the output
    torch.testing.assert_close(y.double(), ref, atol=tol, rtol=tol if dtype == torch.float32 else 0.03)


def test_op_registration_and_compile():
    spec = SPECS[1]
    t = _layer(spec, 32, 128, seed=2)
    p = ops.prepare_torch(t[fmt.VALUES], t[fmt.MASK], t[fmt.OUTLIER_VALUES], t[fmt.OUTLIER_INDEX], t[fmt.SCALE],
                          t[fmt.SHIFT], n=8, m=16, outlier_block=64, outliers_per_block=2, in_features=128,
                          act_dtype=torch.float32)
    args = (torch.randn(3, 128), p["values"], p["positions"], p["outlier_values"], p["outlier_index"], None,
            p["shift"], None, 8, 16, 64, 2, 128, 32, "torch")
    torch.library.opcheck(torch.ops.nm16.linear.default, args)

    def f(x):
        return torch.ops.nm16.linear(x, *args[1:]) * 2

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="eager")
    for m_tokens in (1, 7):
        x = torch.randn(m_tokens, 128)
        torch.testing.assert_close(compiled(x), f(x))


def test_config_parse_and_routing():
    from vllm.model_executor.layers.quantization import get_quantization_config

    import vllm_nm16
    from vllm_nm16.config import NM16Config

    vllm_nm16.register()
    vllm_nm16.register()  # re-entrant
    assert get_quantization_config("nm16") is NM16Config
    good = fmt.NM16Spec(ignore=("model.layers.0.mlp.down_proj",)).to_config()
    cfg = NM16Config.from_config(good)
    assert cfg.is_ignored("model.layers.0.mlp.down_proj") and not cfg.is_ignored("model.layers.1.mlp.down_proj")
    assert cfg.checkpoint_names("model.layers.0.self_attn.qkv_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    import pickle

    assert pickle.loads(pickle.dumps(cfg)).spec == cfg.spec  # vLLM pickles it into its engine process
    for field, value, msg in (("format_version", 2, "format_version"), ("m", 12, "'m'"), ("n", 16, "'n'"),
                              ("quant_method", "gptq", "quant_method"), ("outlier_block", 24, "outlier_block")):
        with pytest.raises(fmt.NM16FormatError, match=msg):
            NM16Config.from_config({**good, field: value})
    half = NM16Config.from_config({**good, "ignore": ["model.layers.0.self_attn.q_proj"]})
    with pytest.raises(fmt.NM16FormatError, match="all dense or all packed"):
        half.is_ignored("model.layers.0.self_attn.qkv_proj")


def test_check_names():
    from vllm_nm16.config import DEFAULT_FUSED_MODULES, check_names

    spec = fmt.NM16Spec(has_scale=True, ignore=("model.layers.0.mlp.down_proj",))
    base = ["model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.self_attn.q_proj.weight_values", "model.layers.0.self_attn.q_proj.weight_mask",
            "model.layers.0.self_attn.q_proj.weight_scale"]
    check_names(base, spec, DEFAULT_FUSED_MODULES)
    for extra, msg in (("model.layers.0.self_attn.q_proj.outlier_index", "q_proj.outlier_index"),
                       ("model.layers.0.self_attn.q_proj.foo", "q_proj.foo"),
                       ("model.layers.0.mlp.down_proj.weight_mask", "listed in 'ignore'"),
                       ("model.layers.0.mlp.up_proj.weight", "up_proj.weight: stored dense")):
        with pytest.raises(fmt.NM16FormatError, match=msg):
            check_names(base + [extra], spec, DEFAULT_FUSED_MODULES)


def test_compile_cache_tag_changes_vllm_config_hash():
    """The Triton and PyTorch paths must not share vLLM's compiled-graph cache (an AOT-compiled Triton forward reloaded
    for VLLM_NM16_BACKEND=torch failed on vLLM 0.26): the tag must reach the hash that names the cache."""
    from vllm.config import VllmConfig, set_current_vllm_config

    from vllm_nm16 import compat

    hashes = []
    for value in ("triton", "torch"):
        cfg = VllmConfig()
        with set_current_vllm_config(cfg):
            compat.tag_compile_cache("nm16_backend", value)
        assert cfg.additional_config["nm16_backend"] == value
        hashes.append(cfg.compute_hash())
    assert hashes[0] != hashes[1]
    assert backends.requested_backend() == ("gluon" if torch.cuda.is_available() else "torch")
