"""Perplexity through vLLM (``nm16-eval --engine vllm``): the same token windows as the transformers engine
(``offline.evaluate.load_eval_ids`` / ``make_windows``), scored from vLLM's prompt log-probabilities.

vLLM returns, for every prompt position t >= 1, the log-probability of the actual token ids[t] given ids[:t]
(``prompt_logprobs=0``: only the actual token), computed in fp32 from the model's logits -- the quantity
``offline.evaluate.window_nll`` sums. Prefix caching is turned off: a cached prefix would have no prompt logprobs.
Each window is one prompt; vLLM batches them itself.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from offline.evaluate import is_nm16_checkpoint, load_eval_ids, make_windows, summarize
from vllm_nm16 import compat
from vllm_nm16.engine import open_llm


def perplexity_vllm(model_dir, text_path, seqlen: int = 512, stride: int | None = None,
                    max_tokens: int | None = None, llm: Any = None, **engine_kw: Any) -> dict:
    """Perplexity of a dense HF folder or an nm16 checkpoint through ``vllm.LLM``; ``engine_kw`` go to ``LLM()``
    (defaults: eager mode, 20% of memory, the checkpoint's dtype). Pass ``llm`` to reuse a running engine of that
    checkpoint (its max_model_len must be > seqlen; the caller shuts it down); an engine made here is shut down before
    returning (``vllm_nm16.engine.open_llm``). Returns the same keys as the hf engine."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.time()
    model_dir = Path(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = load_eval_ids(tok, text_path, max_tokens)
    windows = make_windows(ids, seqlen, stride)
    kw = {"model": str(model_dir), "enforce_eager": True, "max_model_len": seqlen + 1,
          "enable_prefix_caching": False, "seed": 0, "load_format": "safetensors"}
    if "gpu_memory_utilization" not in engine_kw:
        kw["kv_cache_memory_bytes"] = 2 * compat.KV_CACHE_BYTES
    if is_nm16_checkpoint(model_dir):
        kw["quantization"] = "nm16"
    kw.update(engine_kw)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    prompts = [TokensPrompt(prompt_token_ids=w.ids) for w in windows]
    if llm is not None:
        outs = llm.generate(prompts, params, use_tqdm=False)
    else:  # our engine: shut down here, in order, not by finalizers at interpreter exit (see vllm_nm16.engine)
        with open_llm(**kw) as own:
            outs = own.generate(prompts, params, use_tqdm=False)
    nll_sum, count = 0.0, 0
    for w, out in zip(windows, outs):
        plp = out.prompt_logprobs
        if plp is None or len(plp) != len(w.ids):
            raise RuntimeError(f"vLLM returned {None if plp is None else len(plp)} prompt logprobs for a window of "
                               f"{len(w.ids)} tokens")
        for t in range(max(w.score_from, 1), len(w.ids)):
            nll_sum -= float(plp[t][w.ids[t]].logprob)
            count += 1
    return summarize(nll_sum, count, engine="vllm", model=str(model_dir), text=str(text_path), seqlen=seqlen,
                     stride=stride or seqlen, max_tokens=max_tokens, windows=len(windows),
                     seconds=round(time.time() - t0, 2))
