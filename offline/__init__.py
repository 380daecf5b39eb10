"""Offline side of vllm_nm16: compress a Hugging Face causal LM into an nm16 checkpoint and measure perplexity.

Python API (mirrors the ``nm16-compress`` / ``nm16-eval`` CLIs; importing this package is cheap: torch and transformers
are imported inside the functions)::

    import offline
    ckpt = offline.compress("path/to/hf-model", "out/nm16", pattern="8:16", method="sparsegpt")
    offline.evaluate(ckpt, ".cache/data/sotu-eval.txt", max_tokens=8192)["perplexity"]
"""

from __future__ import annotations

from pathlib import Path

# The submodule ``offline.evaluate`` shares its name with the function below. Importing a submodule for the first time
# binds it as an attribute of the package, which would replace the function after any
# ``from offline.evaluate import ...``. Importing it here first (it is cheap: stdlib only at module level) means
# that binding happens now, and the ``def`` below wins for good.
from offline import evaluate as _evaluate_module  # noqa: E402,F401


def compress(model_dir, out_dir, **kwargs) -> Path:
    """See :func:`offline.api.compress` (keyword arguments = the CLI options)."""
    from offline.api import compress as _compress

    return _compress(model_dir, out_dir, **kwargs)


def evaluate(model_or_ckpt, text, *, seqlen: int = 512, stride: int | None = None, max_tokens: int | None = None,
             engine: str = "hf", **engine_kw) -> dict:
    """Perplexity of a dense HF folder or nm16 checkpoint on a text file; ``engine`` is 'hf' (transformers, fp32,
    nm16 layers unpacked to dense) or 'vllm' (``offline.eval_vllm.perplexity_vllm``)."""
    if engine == "hf":
        from offline.evaluate import perplexity_hf

        return perplexity_hf(model_or_ckpt, text, seqlen=seqlen, stride=stride, max_tokens=max_tokens, **engine_kw)
    if engine == "vllm":
        from offline.eval_vllm import perplexity_vllm

        return perplexity_vllm(model_or_ckpt, text, seqlen=seqlen, stride=stride, max_tokens=max_tokens,
                               **engine_kw)
    raise ValueError(f"engine must be 'hf' or 'vllm', got {engine!r}")


def __getattr__(name: str):
    if name == "CompressError":  # lazily, so `import offline` stays cheap
        from offline.api import CompressError

        return CompressError
    raise AttributeError(f"module 'offline' has no attribute {name!r}")


__all__ = ["compress", "evaluate", "CompressError"]
