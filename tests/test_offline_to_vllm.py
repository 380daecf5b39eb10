"""The compressor's real output loads and runs in vLLM: ``offline.compress`` (the default recipe -- SparseGPT,
outliers 'auto', block-wise reconstruction -- plus variance correction, mean shift and equalization, so that every
part of the format is written) on a small random Llama, then ``LLM(quantization="nm16")`` greedy (fp32) equals
transformers greedy on the same checkpoint unpacked to dense. Guards the writer <-> plugin contract (tensor names,
dtypes, ignore list, shift/scale handling) on every CI run; the default model's full compression runs in ``make demo``.
"""

from __future__ import annotations

import torch

from tests.vllm_runner import describe, run_llm
from vllm_nm16.compat import KV_CACHE_BYTES

PROMPTS = ["The quick brown fox", "In 1776, the"]
NEW_TOKENS = 16


def test_compressed_checkpoint_generates_like_transformers(make_llama, tmp_path, calib_text):
    import offline
    from offline.evaluate import load_hf_model
    from transformers import AutoTokenizer

    src = make_llama(hidden=128, intermediate=256, layers=2, heads=2, kv_heads=2, seed=3)
    ckpt = offline.compress(src, tmp_path / "nm16", calib=calib_text, nsamples=4, seqlen=128, mean_shift=True,
                            variance_correction="channel", equalize=0.5, progress=False)
    from vllm_nm16 import format as fmt

    spec = fmt.read_spec(ckpt)
    assert spec.has_outliers and spec.has_scale and spec.has_shift, spec  # every part of the format is exercised
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    engine = {"model": str(ckpt), "quantization": "nm16", "dtype": "float32", "enforce_eager": True,
              "kv_cache_memory_bytes": KV_CACHE_BYTES, "max_model_len": 128, "seed": 0}
    res, proc = run_llm({"engine": engine, "prompts": ids, "max_tokens": NEW_TOKENS, "logprobs": 2})
    assert res is not None, describe(proc)
    model = load_hf_model(ckpt, dtype=torch.float32)
    with torch.inference_mode():
        for p, x, o in zip(PROMPTS, ids, res["outputs"]):
            t = torch.tensor([x])
            h = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, do_sample=False,
                               pad_token_id=model.config.eos_token_id)[0, len(x):].tolist()
            assert o["token_ids"] == h, f"prompt {p!r}:\nvLLM {o['token_ids']}\nHF   {h}"
