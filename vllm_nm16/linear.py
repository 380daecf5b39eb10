"""``NM16LinearMethod``: how one vLLM linear layer holds, loads, validates and runs nm16 weights.

Parameters (per tensor-parallel rank; ``K`` = in_features of this rank, ``O`` = out_features of this rank):

====================  =========================  ===============================================================
parameter             shape                      vLLM class (sharding)
====================  =========================  ===============================================================
``weight_values``     ``[O, K*N/M]``             PackedvLLMParameter(packed_dim=1, packed_factor=M/N)
``weight_mask``       ``[O, K/M]``               PackedvLLMParameter(packed_dim=1, packed_factor=M)
``outlier_values``    ``[O, K/B*k]``             PackedvLLMParameter(packed_dim=1, packed_factor=B/k)
``outlier_index``     ``[O, K/B*k]``             PackedvLLMParameter(packed_dim=1, packed_factor=B/k)
``weight_scale``      ``[O]``                    ChannelQuantScaleParameter(output_dim=0)
``weight_shift``      ``[O]``                    ChannelQuantScaleParameter(output_dim=0)
====================  =========================  ===============================================================

Every tensor is row-major in the output channels, so column-parallel and fused (QKV, gate/up) layers shard by rows
with vLLM's stock loaders; row-parallel layers cut along K in whole groups/outlier blocks, which is why ``K / tp``
must stay a multiple of M (and of B): :meth:`create_weights` refuses a split that would cut one.

vLLM checks nothing about quantized checkpoints (no completeness, shape or dtype check: a too-wide tensor is silently
cropped by ``narrow``, a missing one stays garbage). So every parameter's loader is wrapped: it checks the exact
checkpoint shape and dtype of each incoming tensor (naming the checkpoint tensor) and records which shard arrived;
``process_weights_after_loading`` refuses missing tensors/shards, then runs the format's ``validate_layer`` on each
checkpoint module's rows (popcount == N, outlier offsets, finite values), then hands the tensors to the layer's kernel backend (backends.py).

Dummy loading (``load_format="dummy"``: vLLM reads no files and fills float parameters with noise): detected when the
layer is created (:func:`vllm_nm16.compat.dummy_weight_loading`); ``process_weights_after_loading`` then first fills
the layer's parameters of this rank with a valid random nm16 layer (:mod:`vllm_nm16.dummy`, seeded by prefix and
rank) and goes on exactly as for real weights (validation, the backend's ``process_weights``).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import (LinearMethodBase, MergedColumnParallelLinear, QKVParallelLinear,
                                               RowParallelLinear, register_weight_loader_v2_supported_method)
from vllm.logger import init_logger
from vllm.model_executor.parameter import ChannelQuantScaleParameter, PackedvLLMParameter

from vllm_nm16 import backends, compat, dummy
from vllm_nm16 import format as fmt
from vllm_nm16 import ops
QKV_SHARDS = ("q", "k", "v")
logger = init_logger("vllm.nm16")  # a child of vLLM's configured "vllm" logger, so its lines show
_dummy_logged = False


def _packed_factor(num: int, den: int) -> int | Fraction:
    f = Fraction(num, den)
    return int(f) if f.denominator == 1 else f


@register_weight_loader_v2_supported_method
class NM16LinearMethod(LinearMethodBase):
    """Linear method for layers stored packed in an nm16 checkpoint."""

    def __init__(self, quant_config: Any, prefix: str) -> None:
        # quant_config: the vllm_nm16.config.NM16Config that routes this layer here (config.py imports this module,
        # so no import back)
        self.quant_config = quant_config
        self.spec = quant_config.spec
        self.prefix = prefix

    # ------------------------------------------------------------------------------------------------ create_weights
    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs: Any):
        spec = self.spec
        # The backends give the layer different tensors: keep their compiled graphs apart.
        compat.tag_compile_cache("nm16_backend", backends.requested_backend())
        names = self.quant_config.checkpoint_names(self.prefix)
        fmt.check_in_features(spec, input_size, f"{', '.join(names)}")
        if input_size_per_partition % spec.k_multiple():
            tp = input_size // input_size_per_partition
            what = f"outlier block B={spec.outlier_block}" if spec.has_outliers else f"group M={spec.m}"
            raise fmt.NM16FormatError(
                f"nm16: {', '.join(names)}: tensor_parallel_size={tp} splits in_features={input_size} into "
                f"{input_size_per_partition} per rank, which cuts a {what}; use a tensor-parallel size that keeps "
                f"in_features/tp a multiple of {spec.k_multiple()}")
        in_f = input_size_per_partition
        out = sum(output_partition_sizes)
        loader = extra_weight_attrs["weight_loader"]
        value_dtype = params_dtype  # checkpoint values (bf16/fp16) are cast to the activation dtype on load
        layer.nm16_in_features = in_f
        layer.nm16_out_features = out
        layer.nm16_value_dtype_seen = None
        # load_format="dummy": no checkpoint tensors will arrive; process_weights_after_loading makes a random layer.
        self.dummy = compat.dummy_weight_loading()

        def packed(name: str, width: int, dtype: torch.dtype, factor) -> None:
            # Masks start at 0 (popcount 0): a mask shard that never arrives fails validation even if tracking missed it.
            param = PackedvLLMParameter(data=torch.zeros(out, width, dtype=dtype), input_dim=1, output_dim=0,
                                        packed_dim=1, packed_factor=factor,
                                        weight_loader=self._checked_loader(layer, name, loader))
            layer.register_parameter(name, param)

        packed(fmt.VALUES, in_f * spec.n // spec.m, value_dtype, _packed_factor(spec.m, spec.n))
        packed(fmt.MASK, in_f // spec.m, fmt.mask_dtype(spec.m), spec.m)
        if spec.has_outliers:
            width = in_f // spec.outlier_block * spec.outliers_per_block
            factor = _packed_factor(spec.outlier_block, spec.outliers_per_block)
            packed(fmt.OUTLIER_VALUES, width, value_dtype, factor)
            packed(fmt.OUTLIER_INDEX, width, fmt.index_dtype(spec.outlier_block), factor)
        for name, flag in ((fmt.SCALE, spec.has_scale), (fmt.SHIFT, spec.has_shift)):
            if flag:
                param = ChannelQuantScaleParameter(data=torch.zeros(out, dtype=fmt.SCALE_DTYPE), output_dim=0,
                                                   weight_loader=self._checked_loader(layer, name, loader))
                layer.register_parameter(name, param)
        layer.nm16_loaded = {}  # param name -> set of shard ids that arrived

    # ---------------------------------------------------------------------------------------------- load checking
    def _shards(self, layer) -> list[tuple[Any, str, int]]:
        """(shard id, checkpoint module name, full out_features) of each checkpoint module behind this layer."""
        names = self.quant_config.checkpoint_names(self.prefix)
        if isinstance(layer, QKVParallelLinear):
            ids = QKV_SHARDS
        elif isinstance(layer, MergedColumnParallelLinear):
            ids = tuple(range(len(layer.output_sizes)))
        else:
            return [(None, names[0], layer.output_size)]
        if len(names) != len(ids):
            names = [f"{self.prefix}[{i}]" for i in ids]
        return [(i, n, size) for i, n, size in zip(ids, names, layer.output_sizes)]

    def _checked_loader(self, layer, param_name: str, inner):
        method = self

        def load(param, loaded_weight: torch.Tensor, *args, **kwargs):
            shard_id = args[0] if args else kwargs.get("loaded_shard_id")
            shards = {i: (n, size) for i, n, size in method._shards(layer)}
            if shard_id not in shards:
                if shard_id is None:  # a fused layer stored fused on disk: not a layout nm16 writes
                    raise fmt.NM16FormatError(f"nm16: {method.prefix}.{param_name}: stored fused; expected the "
                                              f"separate tensors {[f'{n}.{param_name}' for n, _ in shards.values()]}")
                raise fmt.NM16FormatError(f"nm16: {method.prefix}.{param_name}: unexpected shard {shard_id!r}")
            ckpt_name, out_full = shards[shard_id]
            tensor_name = f"{ckpt_name}.{param_name}"
            expected = fmt.expected_tensors(method.spec, out_full, layer.input_size, torch.bfloat16)
            shape, dtype = expected[param_name]
            if tuple(loaded_weight.shape) != shape:
                raise fmt.NM16FormatError(f"nm16: {tensor_name}: shape {tuple(loaded_weight.shape)} != expected "
                                          f"{shape} (out_features={out_full}, in_features={layer.input_size}, "
                                          f"{method.spec.pattern})")
            if param_name in (fmt.VALUES, fmt.OUTLIER_VALUES):
                if loaded_weight.dtype not in fmt.VALUE_DTYPES:
                    raise fmt.NM16FormatError(f"nm16: {tensor_name}: dtype {loaded_weight.dtype} is not bf16/fp16")
                seen = layer.nm16_value_dtype_seen
                if seen is not None and seen != loaded_weight.dtype:
                    raise fmt.NM16FormatError(f"nm16: {tensor_name}: dtype {loaded_weight.dtype} differs from the "
                                              f"layer's other values ({seen})")
                layer.nm16_value_dtype_seen = loaded_weight.dtype
            elif loaded_weight.dtype != dtype:
                raise fmt.NM16FormatError(f"nm16: {tensor_name}: dtype {loaded_weight.dtype} != expected {dtype}")
            got = layer.nm16_loaded.setdefault(param_name, set())
            if shard_id in got:
                raise fmt.NM16FormatError(f"nm16: {tensor_name}: loaded twice (duplicate tensor in the checkpoint)")
            inner(param, loaded_weight, *args, **kwargs)
            got.add(shard_id)

        return load

    # ------------------------------------------------------------------------------------- after loading: validate
    def _fill_dummy(self, layer: torch.nn.Module) -> None:
        """Dummy loading: overwrite this rank's parameters with a valid random nm16 layer and mark every shard as
        loaded (vLLM's noise in the float parameters and any tensors a dummy loader pushed through are discarded)."""
        global _dummy_logged
        expected = fmt.expected_tensors(self.spec, 1, layer.nm16_in_features, torch.bfloat16)
        params = {p: getattr(layer, p).data for p in expected}
        seed = dummy.layer_seed(self.prefix, getattr(layer, "tp_rank", 0))
        layer.nm16_value_dtype_seen = dummy.fill_random(params, self.spec, layer.nm16_in_features, seed=seed,
                                                        fan_in=layer.input_size)
        layer.nm16_loaded = {p: {i for i, _, _ in self._shards(layer)} for p in expected}
        if not _dummy_logged:
            _dummy_logged = True
            logger.info("nm16: load_format=dummy: filling nm16 layers with valid random %s layers (outliers %s, "
                        "scale %s, shift %s)", self.spec.pattern,
                        f"{self.spec.outliers_per_block}/{self.spec.outlier_block}" if self.spec.has_outliers
                        else "none", self.spec.has_scale, self.spec.has_shift)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        spec = self.spec
        if getattr(self, "dummy", False):
            self._fill_dummy(layer)
        shards = self._shards(layer)
        expected = fmt.expected_tensors(spec, 1, layer.nm16_in_features, torch.bfloat16)
        missing = [f"{n}.{p}" for p in expected for i, n, _ in shards if i not in layer.nm16_loaded.get(p, ())]
        if missing:
            raise fmt.NM16FormatError(f"nm16: {self.prefix}: missing tensor(s) in the checkpoint: "
                                      f"{', '.join(missing)}")
        in_f = layer.nm16_in_features
        tensors = {p: getattr(layer, p).data for p in expected}
        # Validate each checkpoint module's rows of this rank separately, so an error names e.g. k_proj, not qkv_proj.
        check_dtype = layer.nm16_value_dtype_seen or torch.bfloat16
        row = 0
        tp = getattr(layer, "tp_size", 1)
        for _, ckpt_name, out_full in shards:
            rows = out_full // tp if not isinstance(layer, RowParallelLinear) else out_full
            part = {p: t[row:row + rows] for p, t in tensors.items()}
            for p in (fmt.VALUES, fmt.OUTLIER_VALUES):
                if p in part:  # values were cast to the activation dtype on load; check them in the checkpoint's
                    part[p] = part[p].to(check_dtype)
            fmt.validate_layer(part, spec, name=ckpt_name, out_features=rows, in_features=in_f,
                               value_dtype=check_dtype)
            row += rows
        shift = tensors.get(fmt.SHIFT)
        if shift is not None and isinstance(layer, RowParallelLinear) and getattr(layer, "tp_rank", 0) > 0:
            shift = None  # row-parallel partial sums are all-reduced: add the shift on rank 0 only (like vLLM's bias)
        self.geometry = backends.LayerGeometry.from_spec(spec, in_features=in_f,
                                                         out_features=layer.nm16_out_features,
                                                         act_dtype=layer.params_dtype)
        self.backend = backends.choose_backend(self.geometry, tensors[fmt.VALUES].device)
        prepared = self.backend.process_weights(self.geometry, tensors[fmt.VALUES], tensors[fmt.MASK],
                                                tensors.get(fmt.OUTLIER_VALUES), tensors.get(fmt.OUTLIER_INDEX),
                                                tensors.get(fmt.SCALE), shift)
        for p in expected:
            delattr(layer, p)
        # Only real tensors go on the layer; which parts exist is recorded on this (per-layer) method object, a
        # Python constant for torch.compile, instead of module attributes holding None.
        self.parts = {name: t is not None for name, t in prepared.items()}
        for name, t in prepared.items():
            if t is not None:
                layer.register_parameter(f"nm16_{name}", Parameter(t, requires_grad=False))
        del layer.nm16_loaded

    # ----------------------------------------------------------------------------------------------------- apply
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        g = self.geometry
        x2d = x.reshape(-1, x.shape[-1])
        part = lambda name: getattr(layer, f"nm16_{name}") if self.parts[name] else None  # noqa: E731
        y = ops.nm16_linear(x2d, layer.nm16_values, layer.nm16_positions, part("outlier_values"),
                            part("outlier_index"), part("scale"), part("shift"), bias, g.n, g.m, g.outlier_block,
                            g.outliers_per_block, g.in_features, g.out_features, self.backend.name)
        return y.reshape(*x.shape[:-1], g.out_features)
