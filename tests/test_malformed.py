"""Malformed nm16 checkpoints: vLLM must refuse to start, with an error that names the layer/tensor/field.

Every case is one real ``LLM(model=..., quantization="nm16")`` start in a fresh subprocess (single process:
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the ``uni`` executor, so the error surfaces as the exception itself and a start
costs one interpreter). A case passes only if the child produced no result (it never got to generate) and its output
contains every expected fragment. A control case starts the unmodified checkpoint the same way and must generate,
so a harness that always "fails to start" cannot pass.

The good checkpoint: a 1-layer random Llama (hidden 128, intermediate 256, 2 heads / 2 KV heads), packed 8:16 with 2
outliers per 32 columns and a per-row scale.
"""

from __future__ import annotations

import pytest
import torch

from tests.ckpt_factory import nm16_checkpoint, variant
from tests.vllm_runner import describe, run_llm
from vllm_nm16.compat import KV_CACHE_BYTES

L0 = "model.layers.0"
SINGLE_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


@pytest.fixture(scope="module")
def good(make_llama, tmp_path_factory):
    src = make_llama(hidden=128, intermediate=256, layers=1, heads=2, kv_heads=2, seed=2)
    return nm16_checkpoint(src, "malformed-base", outlier_block=32, outliers_per_block=2, has_scale=True,
                           root=tmp_path_factory.mktemp("malformed"))


def _start(ckpt, tp: int = 1, prompts=()):
    engine = {"model": str(ckpt), "quantization": "nm16", "dtype": "float32", "enforce_eager": True,
              "kv_cache_memory_bytes": KV_CACHE_BYTES, "max_model_len": 64, "tensor_parallel_size": tp,
              "distributed_executor_backend": "uni" if tp == 1 else "mp"}
    env = SINGLE_PROCESS if tp == 1 else {**SINGLE_PROCESS, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    return run_llm({"engine": engine, "prompts": list(prompts), "max_tokens": 4}, env=env, timeout=300)


def _set(key, value):
    def fn(cfg):
        cfg["quantization_config"][key] = value
    return fn


def _tensor(name, edit):
    def fn(tensors):
        edit(tensors, name)
    return fn


def _drop(tensors, name):
    del tensors[name]


def _flip_bit(tensors, name):  # a 9th kept column in group 0 of row 0
    t = tensors[name].clone()
    bits = int(t[0, 0]) & 0xFFFF
    free = next(j for j in range(16) if not bits >> j & 1)
    t[0, 0] = torch.tensor((bits | 1 << free) - (1 << 16) if (bits | 1 << free) >= 1 << 15 else bits | 1 << free,
                           dtype=t.dtype)
    tensors[name] = t


def _drop_outliers(tensors):
    for k in [k for k in tensors if ".outlier_" in k]:
        del tensors[k]


def _put(value, where=(0, 0)):
    def edit(tensors, name):
        t = tensors[name].clone()
        t[where] = value
        tensors[name] = t
    return edit


CASES = {
    # id: (config edit, tensor edit, tensor-parallel size, fragments the error output must contain)
    "quant_method": (_set("quant_method", "nm17"), None, 1, ["nm17"]),
    "format_version": (_set("format_version", 2), None, 1, ["format_version", "2"]),
    "missing_tensor": (None, _tensor(f"{L0}.self_attn.k_proj.weight_mask", _drop), 1,
                       [f"{L0}.self_attn.k_proj.weight_mask", "missing"]),
    "extra_tensor": (None, lambda t: t.__setitem__(f"{L0}.mlp.up_proj.weight_extra", torch.zeros(4)), 1,
                     ["up_proj.weight_extra"]),
    "wrong_shape": (None, _tensor(f"{L0}.self_attn.q_proj.weight_values",
                                  lambda t, n: t.__setitem__(n, torch.zeros(128, 80, dtype=torch.bfloat16))), 1,
                    [f"{L0}.self_attn.q_proj.weight_values", "shape (128, 80)", "(128, 64)"]),
    "wrong_dtype": (None, _tensor(f"{L0}.mlp.gate_proj.weight_mask",
                                  lambda t, n: t.__setitem__(n, t[n].to(torch.int32))), 1,
                    [f"{L0}.mlp.gate_proj.weight_mask", "dtype", "torch.int32", "torch.int16"]),
    "popcount": (None, _tensor(f"{L0}.mlp.up_proj.weight_mask", _flip_bit), 1,
                 [f"{L0}.mlp.up_proj.weight_mask", "popcount 9 != N=8"]),
    "outlier_index_range": (None, _tensor(f"{L0}.mlp.down_proj.outlier_index", _put(40)), 1,
                            [f"{L0}.mlp.down_proj.outlier_index", "out of range"]),
    "nan_values": (None, _tensor(f"{L0}.self_attn.o_proj.weight_values", _put(float("nan"))), 1,
                   [f"{L0}.self_attn.o_proj.weight_values", "NaN/Inf"]),
    "inf_scale": (None, _tensor(f"{L0}.self_attn.v_proj.weight_scale", _put(float("inf"), (3,))), 1,
                  [f"{L0}.self_attn.v_proj.weight_scale", "NaN/Inf"]),
    "in_features_not_multiple_of_m": (
        lambda c: (c.__setitem__("intermediate_size", 136), _set("outlier_block", None)(c),
                   _set("outliers_per_block", 0)(c)), _drop_outliers, 1,
        [f"{L0}.mlp.down_proj", "in_features=136", "M=16"]),
    "tp_splits_a_group": (_set("outlier_block", 128), None, 2,
                          [f"{L0}.self_attn.o_proj", "tensor_parallel_size=2", "cuts a outlier block"]),
}


def test_control_good_checkpoint_starts(good):
    res, proc = _start(good, prompts=["Hello"])
    assert res is not None and len(res["outputs"][0]["token_ids"]) == 4, describe(proc)


@pytest.mark.parametrize("case", list(CASES))
def test_refused(case, good, tmp_path):
    config_fn, tensors_fn, tp, fragments = CASES[case]
    bad = variant(good, tmp_path / case, config_fn=config_fn, tensors_fn=tensors_fn)
    res, proc = _start(bad, tp=tp, prompts=["Hello"])
    out = proc.stdout + proc.stderr
    assert res is None, f"{case}: vLLM started and generated from a malformed checkpoint"
    assert proc.returncode != 0
    missing = [f for f in fragments if f not in out]
    assert not missing, f"{case}: error output lacks {missing}:\n{describe(proc, 25)}"
