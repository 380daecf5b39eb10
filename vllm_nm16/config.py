"""``NM16Config``: vLLM's view of an nm16 checkpoint's ``quantization_config`` (parsing, validation, layer routing).

Parsing and validation are the format's own (:meth:`vllm_nm16.format.NM16Spec.from_config`), so vLLM refuses exactly
what the offline side refuses, with the same message naming the field. Routing: every linear layer gets the nm16
method unless it is listed in ``ignore`` (then it stays dense); embeddings, ``lm_head``, attention and everything else
get ``None`` (dense).

The class is top-level and holds only picklable data: vLLM pickles it into its engine and worker processes.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from vllm_nm16 import format as fmt

# vLLM fuses these checkpoint modules into one layer (used when the model does not tell us its own mapping).
DEFAULT_FUSED_MODULES = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
}


class NM16Config(QuantizationConfig):
    """The ``nm16`` quantization method (N:M sparse weights, optional outliers, per-row scale and shift)."""

    def __init__(self, spec: fmt.NM16Spec) -> None:
        super().__init__()  # creates packed_modules_mapping, filled in by vLLM from the model class
        self.spec = spec
        self.names_checked = False

    def __repr__(self) -> str:
        return (f"NM16Config(pattern={self.spec.pattern}, outlier_block={self.spec.outlier_block}, "
                f"outliers_per_block={self.spec.outliers_per_block}, has_scale={self.spec.has_scale}, "
                f"has_shift={self.spec.has_shift}, ignore={len(self.spec.ignore)} module(s))")

    # ------------------------------------------------------------------------------------------------ vLLM interface
    @classmethod
    def get_name(cls) -> str:
        return fmt.QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        # fp32 is for CPU runs (exact comparisons in tests); the CUDA kernels take bf16/fp16.
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # Ampere: the Triton kernels use bf16 tensor cores

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # quantization_config lives in config.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "NM16Config":
        return cls(fmt.NM16Spec.from_config(config))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None):
        # A checkpoint that says quant_method "nm16" selects this method even without --quantization.
        if isinstance(hf_quant_cfg, dict) and hf_quant_cfg.get("quant_method") == fmt.QUANT_METHOD \
                and user_quant in (None, fmt.QUANT_METHOD):
            return fmt.QUANT_METHOD
        return None

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        # Called once by VllmConfig (vLLM >= 0.3x) with the checkpoint path: refuse unknown tensors before any loading.
        self.check_tensor_names(model_name)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

        if not self.names_checked:  # vLLM builds without the maybe_update_config hook
            from vllm_nm16 import compat

            self.check_tensor_names(compat.current_model_path())

        if not isinstance(layer, LinearBase):
            return None  # embeddings, lm_head, attention: dense
        if self.is_ignored(prefix):
            return UnquantizedLinearMethod()
        from vllm_nm16.linear import NM16LinearMethod  # noqa: PLC0415 (lazy: pulls in the op registration)

        return NM16LinearMethod(self, prefix)

    # ------------------------------------------------------------------------------------------------------ helpers
    def check_tensor_names(self, model_dir) -> None:
        """Refuse checkpoint tensors vLLM would mis-handle: vLLM's fused layers (qkv_proj, gate_up_proj) route an
        unknown tensor name into an unrelated loader and fail with an AttributeError that names nothing, so every
        tensor of a packed layer must be one the spec declares, and a fused-away module stored dense must be listed in
        'ignore'. Reads only the safetensors headers."""
        from pathlib import Path

        self.names_checked = True
        folder = Path(model_dir) if model_dir else None
        if folder is None or not folder.is_dir():
            return  # not a local folder (hub id): nothing to read here
        from safetensors import safe_open

        keys: list[str] = []
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                keys.extend(fh.keys())
        check_names(keys, self.spec, self.fused_modules())

    def fused_modules(self) -> dict[str, list[str]]:
        return dict(self.packed_modules_mapping or {}) or dict(DEFAULT_FUSED_MODULES)

    def checkpoint_names(self, prefix: str) -> list[str]:
        """Checkpoint module names behind a vLLM layer prefix (several for fused layers, in shard order)."""
        parent, _, leaf = prefix.rpartition(".")
        parts = self.fused_modules().get(leaf)
        if not parts:
            return [prefix]
        return [f"{parent}.{p}" if parent else p for p in parts]

    def is_ignored(self, prefix: str) -> bool:
        """Whether a (possibly fused) layer is dense; a fused layer must be all-dense or all-packed."""
        names = self.checkpoint_names(prefix)
        ignored = [n for n in names if n in self.spec.ignore]
        if ignored and len(ignored) != len(names):
            raise fmt.NM16FormatError(
                f"nm16: quantization_config: field 'ignore' lists {ignored} but not the rest of "
                f"{[n for n in names if n not in ignored]}; vLLM fuses them into one layer ({prefix}), so they must "
                f"be all dense or all packed")
        return bool(ignored)


def check_names(keys, spec: fmt.NM16Spec, fused_modules: dict[str, list[str]]) -> None:
    """Raise NM16FormatError naming the first tensor that has no place in an nm16 checkpoint of ``spec``."""
    nm16_suffixes = {fmt.VALUES, fmt.MASK, fmt.OUTLIER_VALUES, fmt.OUTLIER_INDEX, fmt.SCALE, fmt.SHIFT}
    allowed = set(fmt.expected_tensors(spec, 1, spec.k_multiple(), torch.bfloat16)) | {"bias"}
    by_prefix: dict[str, set[str]] = {}
    for key in keys:
        prefix, _, suffix = key.rpartition(".")
        by_prefix.setdefault(prefix, set()).add(suffix)
    fused_leaves = {leaf for parts in fused_modules.values() for leaf in parts}
    for prefix, suffixes in sorted(by_prefix.items()):
        packed = suffixes & nm16_suffixes
        if packed and prefix in spec.ignore:
            raise fmt.NM16FormatError(f"nm16: {prefix}.{sorted(packed)[0]}: the module is listed in 'ignore' "
                                      f"(dense) but stored packed")
        if packed:
            extra = sorted(suffixes - allowed)
            if extra:
                raise fmt.NM16FormatError(
                    f"nm16: {prefix}.{extra[0]}: unexpected tensor in a packed layer (expected only "
                    f"{sorted(allowed)} for {spec.pattern}, outliers={spec.has_outliers}, scale={spec.has_scale}, "
                    f"shift={spec.has_shift})")
        elif prefix.rpartition(".")[2] in fused_leaves and "weight" in suffixes and prefix not in spec.ignore:
            raise fmt.NM16FormatError(f"nm16: {prefix}.weight: stored dense but not listed in "
                                      f"quantization_config 'ignore'")
