"""vllm_nm16: N:M (8:16 by default) sparse checkpoints served by vLLM.

Importing this package must stay cheap and CUDA-free: vLLM imports it in every process through the
``vllm.general_plugins`` entry point and calls :func:`register`.
"""

__version__ = "0.1.0"


def register() -> None:
    """vLLM plugin entry point: register the ``nm16`` quantization method (re-entrant)."""
    from vllm_nm16.plugin import register_nm16  # noqa: PLC0415  (lazy: keep `import vllm_nm16` light)

    register_nm16()
