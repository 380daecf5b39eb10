"""nm16 GPU kernels (Triton): the plugin's CUDA path.

Importing this package is cheap and needs neither CUDA nor Triton: the Triton module is imported on first use.

* :func:`repack` -- once per layer (``process_weights_after_loading``): on-disk tensors -> the kernels' layout.
* :func:`nm16_linear` -- ``y = scale * (x @ W_nm.T) + x @ W_out.T + shift + bias`` for x [M, K] bf16/fp16, fp32
  accumulation. :func:`choose_config` picks the kernel from ``x.shape[0]`` (a Python int): the Gluon fragment kernels
  (8:16: gluon_nm16.py mma_v2 at M <= 16, gluon_wgmma.py wgmma at M 17..128 on sm_90 -- 17..256 on layers without
  outliers -- whose outliers run first as their own pass, outliers.py, except on small layers at M <= 32), the Triton gemv / tile-decode kernels (triton_nm16.py; other N:M, fp32, M = 1 on
  small layers) or decode-to-scratch + cuBLAS (scratch.py, large M). All are CUDA-graph and torch.compile safe (no host syncs, no data-dependent shapes,
  output from ``torch.empty``; the wgmma kernel's split-K counters are made before capture and reset by the kernel).
"""

from __future__ import annotations

import torch

from vllm_nm16.kernels.layout import POS_BYTE, POS_LUT16, POS_NIBBLE32, repack

__all__ = ["repack", "nm16_linear", "choose_config", "POS_LUT16", "POS_NIBBLE32", "POS_BYTE"]


def nm16_linear(x2d: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, outlier_values: torch.Tensor | None,
                outlier_index: torch.Tensor | None, scale: torch.Tensor | None, shift: torch.Tensor | None,
                bias: torch.Tensor | None, *, n: int, m: int, outlier_block: int | None, outliers_per_block: int,
                in_features: int, out_features: int, config: dict | None = None,
                out: torch.Tensor | None = None, allow_gluon: bool = True) -> torch.Tensor:
    """[M, in_features] x -> [M, out_features] in x's dtype. ``values, positions, outlier_values, outlier_index``
    come from :func:`repack`; scale/shift fp32 [out] or None, bias [out] in x's dtype or None. ``config`` overrides
    the tuned launch config and ``out`` (contiguous [M, out_features]) is written instead of a fresh tensor (tests
    poison it); ``allow_gluon=False`` keeps the call on the Triton kernels (the ``triton`` backend)."""
    cfg = config if config and "kernel" in config else \
        choose_config(x2d, values, positions, n=n, m=m, out_features=out_features,
                      outlier_block=outlier_block if outliers_per_block else None, allow_gluon=allow_gluon)
    if cfg["kernel"] == "gluon":
        from vllm_nm16.kernels.gluon_nm16 import fragment_linear  # noqa: PLC0415  (lazy: Triton import)

        return fragment_linear(x2d, values, positions, outlier_values, outlier_index, scale, shift, bias,
                               outlier_block=outlier_block or 0, outliers_per_block=outliers_per_block,
                               in_features=in_features, out_features=out_features, config=cfg, out=out)
    if cfg["kernel"] == "wgmma":
        from vllm_nm16.kernels.gluon_wgmma import wgmma_linear  # noqa: PLC0415  (lazy: Triton import)

        return wgmma_linear(x2d, values, positions, outlier_values, outlier_index, scale, shift, bias,
                            outlier_block=outlier_block or 0, outliers_per_block=outliers_per_block,
                            in_features=in_features, out_features=out_features, config=cfg, out=out)
    if cfg["kernel"] == "scratch":
        from vllm_nm16.kernels.scratch import scratch_linear  # noqa: PLC0415

        return scratch_linear(x2d, values, positions, outlier_values, outlier_index, scale, shift, bias, n=n, m=m,
                              outlier_block=outlier_block, outliers_per_block=outliers_per_block,
                              in_features=in_features, out_features=out_features, out=out,
                              chunk_bytes=int(cfg["chunk_mb"] * 2**20) if "chunk_mb" in cfg else None,
                              overlap=int(cfg.get("overlap", 0)))
    from vllm_nm16.kernels.triton_nm16 import nm16_linear as _impl  # noqa: PLC0415  (lazy: Triton import)

    return _impl(x2d, values, positions, outlier_values, outlier_index, scale, shift, bias, n=n, m=m,
                 outlier_block=outlier_block, outliers_per_block=outliers_per_block, in_features=in_features,
                 out_features=out_features, config=cfg, out=out)


# Largest M the Gluon kernel serves (above: the scratch path, kernels/scratch.py); gluon_nm16.MAX_M is its limit.
GLUON_MAX_M = 32
# From this many weights (N * K) on, M = 1 and M = 17..32 run the Gluon kernel instead of the Triton gemv / the
# scratch path (H200, outliers + scale, benchmarks/results/kernels_h200.json: M = 1 gluon 16.3 vs gemv 20.5 us on
# 6144 x 4096, gemv 11.6 us on 4096 x 4096; M = 32 on 4096 x 4096 the scratch path measured ahead).
GLUON_SMALL_LAYER_WEIGHTS = 24 * 2**20


def choose_config(x2d, values, positions, *, n: int, m: int, out_features: int, outlier_block: int | None,
                  allow_gluon: bool = True) -> dict:
    """The kernel (and launch config) of one call, from M = ``x2d.shape[0]`` (a Python int: fixed at trace/capture
    time): the Gluon fragment kernel where it can run and wins (:func:`gluon_choice`), else the Triton kernels'
    table (configs.pick_config: gemv / dot / scratch)."""
    from vllm_nm16.kernels.configs import pick_config  # noqa: PLC0415

    M, K = x2d.shape
    if allow_gluon and wgmma_choice(x2d, values, positions, n=n, m=m, out_features=out_features,
                                    has_outliers=bool(outlier_block)):
        return {"kernel": "wgmma"}
    if allow_gluon and gluon_choice(x2d, values, positions, n=n, m=m, out_features=out_features):
        return {"kernel": "gluon"}
    return pick_config(out_features, K, M, n=n, m=m, outlier_block=outlier_block)


def gluon_choice(x2d, values, positions, *, n: int, m: int, out_features: int) -> bool:
    """Whether the Gluon mma_v2 fragment kernel runs this call (asked after :func:`wgmma_choice`, which takes M 17..
    where it can run): it can (8:16, bf16/fp16, sm_80+, M <= GLUON_MAX_M) and, at M = 1 and M > 16, the layer is
    large enough to beat the Triton gemv / the scratch path."""
    if not x2d.is_cuda or x2d.shape[0] > GLUON_MAX_M:
        return False
    from vllm_nm16.kernels.gluon_nm16 import can_implement  # noqa: PLC0415

    M, K = x2d.shape
    ok, _ = can_implement(M, out_features, K, n, m, x2d, values, positions)
    return ok and (1 < M <= 16 or out_features * K >= GLUON_SMALL_LAYER_WEIGHTS)


# The wgmma kernel (gluon_wgmma.py, sm_90) runs M = WGMMA_MIN_M..WGMMA_MAX_M tokens. H200: bare 8:16 it beat the
# scratch path up to M = 128 (0.39-0.62x vs 0.31-0.38x cuBLAS, benchmarks/results/raw/h200/wg_bench_*.json); with
# outliers 4/256 + scale it did so only up to M = 64 while it computed the outliers itself, and up to M = 128 (on 6 of
# the 7 Llama-3 shapes, equal on 8B o) once they ran as their own pass (raw/h200/pre_variants_v1.json). With the TMA
# ring (kernels_h200.json on 6147ef3, M = 256, interleaved with the scratch path): bare 8:16 0.69-0.92x the scratch
# path's time on every Llama-3 shape, so layers without outliers take it up to WGMMA_MAX_M_BARE; with outliers 4/256
# + scale 0.93-1.20x (the outlier pass costs what the loop gains): they stay on the scratch path there.
WGMMA_MIN_M, WGMMA_MAX_M, WGMMA_MAX_M_BARE = 17, 128, 256


def wgmma_choice(x2d, values, positions, *, n: int, m: int, out_features: int, has_outliers: bool = True) -> bool:
    """Whether the wgmma kernel runs this call (it can, and M is in its range for a layer with / without outliers)."""
    M = x2d.shape[0]
    if not x2d.is_cuda or not WGMMA_MIN_M <= M <= (WGMMA_MAX_M if has_outliers else WGMMA_MAX_M_BARE):
        return False
    from vllm_nm16.kernels.gluon_wgmma import can_implement  # noqa: PLC0415

    ok, _ = can_implement(M, out_features, x2d.shape[1], n, m, x2d, values, positions)
    return ok


def prepare_device(device: torch.device) -> None:
    """Make the Gluon kernel's constant tables on ``device`` (once per device, before any CUDA-graph capture)."""
    from vllm_nm16.kernels.gluon_nm16 import prepare_device as _prepare  # noqa: PLC0415
    from vllm_nm16.kernels.gluon_wgmma import prepare_device as _prepare_wgmma  # noqa: PLC0415

    _prepare(device)
    _prepare_wgmma(device)
