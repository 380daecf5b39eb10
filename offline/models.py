"""Which architectures the compressor supports, and where their linear layers and fold targets are.

Supported: Llama-family decoder-only models whose blocks are ``input_layernorm -> self_attn(q, k, v -> o) ->
post_attention_layernorm -> mlp(gate, up -> down)`` with a multiplicative RMSNorm (``x / rms * weight``), so that
equalization can fold ``1/s`` into the norm weight, into ``v_proj`` rows (for ``o_proj``) and ``up_proj`` rows (for
``down_proj``). Gemma (norm is ``1 + weight``), Phi/Falcon (fused qkv), MoE and encoder-decoder models are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True)
class LinearGroup:
    """Linear layers of a block that read the same input (their calibration statistics are shared)."""

    names: tuple[str, ...]        # module names relative to the decoder block
    fold_into: str                # where 1/s of the equalization goes: a norm, or the producing linear's rows
    fold_kind: str                # "norm" | "rows"


# Calibration stages in forward order: the statistics of a stage are collected with the earlier stages already
# compressed ("true sequential", as in the SparseGPT repo).
LLAMA_GROUPS = (
    LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", "norm"),
    LinearGroup(("self_attn.o_proj",), "self_attn.v_proj", "rows"),
    LinearGroup(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "norm"),
    LinearGroup(("mlp.down_proj",), "mlp.up_proj", "rows"),
)


class UnsupportedModelError(ValueError):
    pass


def architecture_of(config: dict) -> str:
    archs = config.get("architectures") or []
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return a
    raise UnsupportedModelError(
        f"unsupported architecture {archs or config.get('model_type')!r}: nm16-compress supports "
        f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}")


def linear_groups(config: dict) -> tuple[LinearGroup, ...]:
    architecture_of(config)
    return LLAMA_GROUPS
