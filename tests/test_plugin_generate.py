"""Greedy generation through ``LLM(model=ckpt, quantization="nm16")`` equals transformers' greedy generation on the same
checkpoint unpacked to dense (``offline.evaluate.load_hf_model``: effective weight = scale * W_nm + W_out, shift as
bias).

Both sides run in float32: vLLM's CPU path rebuilds the effective weight in the activation dtype, so in fp32 the two
models compute the same function up to summation order (~1e-6 relative), and greedy ties that could flip a token
are far rarer than in bf16. The test still checks the margin: wherever the two disagree, it reports vLLM's top-2 log
probability gap so a genuine tie can be told from a bug.

A second run in bfloat16 (the production dtype) must agree on the first tokens of every prompt and keep the per-token
log-probability of transformers' fp32 greedy choice within 0.15 nats for every compared position: bf16 rounding of
activations makes later tokens legitimately diverge.
"""

from __future__ import annotations

import pytest
import torch

from tests.ckpt_factory import nm16_checkpoint
from tests.vllm_runner import describe, run_llm
from vllm_nm16.compat import KV_CACHE_BYTES

PROMPTS = [
    "The history of the United States began",
    "My fellow citizens, tonight I want to talk about",
    "def fibonacci(n):",
    "The capital of France is Paris. The capital of Germany is",
]
NEW_TOKENS = 32
LOGPROB_TOL = 0.15  # nats; bf16 activations vs fp32 reference


@pytest.fixture(scope="session")
def default_nm16(default_model):
    """The default model, magnitude-pruned to 8:16 with 2 outliers per 64 columns, a per-row scale, and one layer kept
    dense through 'ignore' (so routing to the dense method is exercised too)."""
    return nm16_checkpoint(default_model, "smollm2-nm16-o64", outlier_block=64, outliers_per_block=2,
                           has_scale=True, ignore=("model.layers.0.mlp.down_proj",))


def _hf_greedy(ckpt, prompt_ids: list[list[int]], new_tokens: int) -> list[tuple[list[int], list[float]]]:
    """(greedy tokens, log-prob of each) per prompt, transformers fp32 on the unpacked checkpoint."""
    from offline.evaluate import load_hf_model

    model = load_hf_model(ckpt, dtype=torch.float32)
    outs = []
    with torch.inference_mode():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False,
                               min_new_tokens=new_tokens, pad_token_id=model.config.eos_token_id,
                               output_scores=True, return_dict_in_generate=True)
            toks = y.sequences[0, len(ids):].tolist()
            lps = [float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(y.scores, toks)]
            outs.append((toks, lps))
    return outs


def _engine(ckpt, dtype: str) -> dict:
    return {"model": str(ckpt), "quantization": "nm16", "dtype": dtype, "enforce_eager": True,
            "kv_cache_memory_bytes": KV_CACHE_BYTES, "max_model_len": 256, "seed": 0}


@pytest.fixture(scope="module")
def prompt_ids(default_nm16):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_nm16)
    return [tok(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_reference(default_nm16, prompt_ids):
    return _hf_greedy(default_nm16, prompt_ids, NEW_TOKENS)


def test_greedy_matches_transformers_fp32(default_nm16, prompt_ids, hf_reference):
    res, proc = run_llm({"engine": _engine(default_nm16, "float32"), "prompts": prompt_ids, "max_tokens": NEW_TOKENS,
                         "logprobs": 2})
    assert res is not None, describe(proc)
    for p, o, (h, _) in zip(PROMPTS, res["outputs"], hf_reference):
        v = o["token_ids"]
        assert len(v) == NEW_TOKENS
        if v != h:
            i = next(j for j in range(NEW_TOKENS) if v[j] != h[j])
            gap = sorted(o["logprobs"][i].values(), reverse=True)
            pytest.fail(f"prompt {p!r}: vLLM and transformers diverge at generated token {i}: vLLM {v[i]} vs "
                        f"transformers {h[i]}; vLLM top-2 logprob gap there {gap[0] - gap[1]:.2e}\n"
                        f"vLLM {v}\nHF   {h}")


def test_bf16_first_tokens_and_logprobs(default_nm16, prompt_ids, hf_reference):
    res, proc = run_llm({"engine": _engine(default_nm16, "bfloat16"), "prompts": prompt_ids, "max_tokens": 8,
                         "logprobs": 1})
    assert res is not None, describe(proc)
    for p, o, (h, hlp) in zip(PROMPTS, res["outputs"], hf_reference):
        v = o["token_ids"]
        assert v[:2] == h[:2], f"prompt {p!r}: bf16 vLLM {v} vs fp32 transformers {h[:8]}"
        for i in range(len(v)):
            if v[i] != h[i]:
                break
            vlp = o["logprobs"][i][str(v[i])]
            assert abs(vlp - hlp[i]) < LOGPROB_TOL, (f"prompt {p!r} token {i}: bf16 vLLM logprob {vlp:.4f} vs "
                                                     f"fp32 transformers {hlp[i]:.4f}")
