"""Perplexity evaluation shared by both engines (transformers here, vLLM in ``offline.eval_vllm``).

Protocol (the same for every row of the quality matrix and for both engines):

* ``load_eval_ids``: the whole text file is tokenized once, without special tokens (no BOS is inserted: the corpus is
  one long running text), and cut to the first ``max_tokens`` tokens when a cap is given.
* ``make_windows``: windows of ``seqlen`` tokens starting every ``stride`` tokens (default ``stride = seqlen``:
  non-overlapping). No token is scored twice: the first window scores from position 1 (the very first token has no
  context), later windows only the tokens the previous window did not reach (``score_from``, at least 1). With the
  default non-overlapping windows the first token of every window is therefore not scored (it has no context: the
  usual protocol); with ``stride < seqlen`` every token but the very first is scored, each with at least
  ``seqlen - stride`` tokens of context.
* perplexity = exp(sum of NLL / number of scored tokens), NLL computed from fp32 logits.

An nm16 checkpoint is evaluated in transformers by unpacking every packed layer to its effective dense weight
(``format.unpack(...).effective_weight()``) and adding ``weight_shift`` as a bias, i.e. exactly the function the vLLM
kernels compute, in fp32.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Window:
    ids: list[int]
    score_from: int  # NLL of ids[t] given ids[:t] is counted for t >= max(score_from, 1)


def load_eval_ids(tokenizer, text_path, max_tokens: int | None) -> list[int]:
    """Token ids of the whole text file (no special tokens), cut to the first ``max_tokens`` when given."""
    path = Path(text_path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation text {path} does not exist")
    text = path.read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"evaluation text {path} has {len(ids)} token(s); at least 2 are needed")
    return list(ids)


def make_windows(ids: list[int], seqlen: int = 512, stride: int | None = None) -> list[Window]:
    """Cut ``ids`` into windows that score every token (but the first) exactly once; see the module docstring."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    stride = seqlen if stride is None else stride
    if not 0 < stride <= seqlen:
        raise ValueError(f"stride must be in 1..seqlen={seqlen}, got {stride}")
    windows: list[Window] = []
    scored_to = 1  # tokens [0, scored_to) are already scored (token 0 never is)
    begin = 0
    n = len(ids)
    while scored_to < n and begin < n - 1:  # a window of one token would score nothing
        end = min(begin + seqlen, n)
        if end > scored_to:
            windows.append(Window(ids=list(ids[begin:end]), score_from=max(scored_to - begin, 1)))
            scored_to = end
        begin += stride
    return windows


def window_nll(logits, window: Window) -> tuple[float, int]:
    """Sum of NLL (fp32) and count of the scored tokens of one window, from its logits [len, vocab]."""
    import torch

    ids = torch.tensor(window.ids, dtype=torch.long, device=logits.device)
    start = max(window.score_from, 1)
    # logits[t-1] predicts ids[t]
    lp = torch.log_softmax(logits[start - 1:len(window.ids) - 1].float(), dim=-1)
    nll = -lp.gather(-1, ids[start:].unsqueeze(-1)).squeeze(-1)
    return float(nll.sum(dtype=torch.float64)), int(nll.numel())


def summarize(nll_sum: float, tokens: int, **extra: Any) -> dict[str, Any]:
    return {"perplexity": math.exp(nll_sum / tokens), "nll_sum": nll_sum, "tokens": tokens, **extra}


def is_nm16_checkpoint(model_dir) -> bool:
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        return False
    qc = json.loads(cfg.read_text()).get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == "nm16"


def load_hf_model(model_dir, device: str = "cpu", dtype=None):
    """A transformers causal LM from a dense HF folder or an nm16 checkpoint (unpacked to dense), in ``dtype``
    (default fp32, so evaluation computes in fp32 whatever the storage dtype)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = dtype or torch.float32
    model_dir = Path(model_dir)
    if not is_nm16_checkpoint(model_dir):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
        return model.to(device).eval()
    from offline.nm16_loading import load_nm16_state_dict

    config = AutoConfig.from_pretrained(model_dir)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # transformers has no 'nm16' quantizer: we unpack ourselves
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state, biases = load_nm16_state_dict(model_dir, dtype=dtype)
    model = model.to_empty(device="cpu")
    for prefix, shift in biases.items():
        mod = model.get_submodule(prefix)
        if mod.bias is None:
            mod.bias = torch.nn.Parameter(shift.clone())
        else:
            state[f"{prefix}.bias"] = state[f"{prefix}.bias"] + shift
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied lm_head is absent from the file by design; anything else missing is an error.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    missing = [k for k in missing if k.rpartition(".")[0] not in biases]
    if missing or unexpected:
        raise ValueError(f"{model_dir}: checkpoint does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    # Non-persistent buffers (rotary inv_freq) were left uninitialized by to_empty: rebuild the rotary modules.
    for name, mod in list(model.named_modules()):
        if type(mod).__name__.endswith("RotaryEmbedding") and hasattr(mod, "config"):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, type(mod)(config=mod.config))
    return model.to(device).eval()


def perplexity_of_model(model, windows: list[Window], *, batch_size: int = 4, progress: bool = False,
                        desc: str = "eval") -> tuple[float, int]:
    """(sum NLL, scored tokens) of an in-memory transformers causal LM over ``windows``."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    nll_sum, count = 0.0, 0
    # Batch windows of equal length (all but possibly the last); no padding is ever needed.
    batches: list[list[Window]] = []
    for w in windows:
        if batches and len(batches[-1]) < batch_size and len(batches[-1][0].ids) == len(w.ids):
            batches[-1].append(w)
        else:
            batches.append([w])
    with torch.inference_mode():
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            x = torch.tensor([w.ids for w in batch], dtype=torch.long, device=device)
            logits = model(input_ids=x, use_cache=False).logits
            for i, w in enumerate(batch):
                s, c = window_nll(logits[i], w)
                nll_sum += s
                count += c
    return nll_sum, count


def perplexity_hf(model_or_ckpt_dir, text_path, seqlen=512, stride=None, max_tokens=None, device="cpu",
                  *, progress: bool = False, batch_size: int = 4, tokenizer=None) -> dict:
    """Perplexity of a dense HF folder, an nm16 checkpoint, or an in-memory transformers model (then pass
    ``tokenizer`` or leave it None to load it from ``model.name_or_path``)."""
    from transformers import AutoTokenizer

    t0 = time.time()
    if isinstance(model_or_ckpt_dir, (str, Path)):
        src = Path(model_or_ckpt_dir)
        model = load_hf_model(src, device=device)
        tok = tokenizer or AutoTokenizer.from_pretrained(src)
        name = str(src)
    else:
        model = model_or_ckpt_dir
        tok = tokenizer or AutoTokenizer.from_pretrained(model.name_or_path)
        name = getattr(model, "name_or_path", "<in-memory model>")
    ids = load_eval_ids(tok, text_path, max_tokens)
    windows = make_windows(ids, seqlen, stride)
    nll_sum, count = perplexity_of_model(model, windows, batch_size=batch_size, progress=progress)
    return summarize(nll_sum, count, engine="hf", model=name, text=str(text_path), seqlen=seqlen,
                     stride=stride or seqlen, max_tokens=max_tokens, windows=len(windows),
                     seconds=round(time.time() - t0, 2))
