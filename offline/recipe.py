"""The compression recipe: every option that decides the result, declared once.

:class:`Recipe` is what the compressor runs (``offline.compressor.compress_model``), what the checkpoint records
(``quantization_config.recipe`` and ``nm16_report.json``, from ``dataclasses.asdict``), what the Python API
``offline.compress(..., **options)`` takes as keyword arguments, and what ``nm16-compress`` turns into its options
(``offline.cli``: one ``--field-name`` per field, from the field's default and ``metadata``). Options that change how
a run goes but not its result (device, threads, overwrite, ...) are not part of it.

Field metadata (all optional): ``help`` (plain text, no argparse ``%`` escapes), ``choices``, ``type`` (the parser of
a command-line value when the default's type is not it; a ``ValueError`` it raises becomes the usage error),
``metavar``, ``flag`` (the option's name where it is not ``--field-name``; a boolean field is a switch that sets the
opposite of its default).

Stdlib only at import time: ``nm16-compress --help`` must not import torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

METHODS = ("magnitude", "wanda", "sparsegpt")
OUTLIER_STRUCTURES = ("structured", "unstructured")
VARIANCE_CORRECTIONS = ("channel", "tensor", "none")


def alpha_or_none(text: str) -> float | None:
    """``--equalize`` value: 'none' or an alpha in [0, 1]."""
    if text.lower() == "none":
        return None
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"expected ALPHA in [0, 1] or 'none', got {text!r}") from None
    if not 0 <= v <= 1:
        raise ValueError(f"ALPHA must be in [0, 1], got {v}")
    return v


def _int_at_least(text: str, low: int, expected: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise ValueError(f"expected {expected}, got {text!r}") from None
    if v < low:
        raise ValueError(f"expected {expected}, got {v}")
    return v


def positive_int(text: str) -> int:
    """``--nsamples`` / ``--seqlen`` / ``--blocksize`` / ``--threads`` value: an integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """``--reconstruct`` value: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def _option(default: Any, help: str | None = None, **cli: Any) -> Any:
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class Recipe:
    """Everything that decides the result (recorded in ``quantization_config.recipe``)."""

    pattern: str = _option("8:16", "N:M (2:4, 4:8, 8:16, 16:32) or 'unstructured' (50%, quality comparisons only: "
                                   "written as a dense HF folder holding zeros)")
    method: str = _option("sparsegpt", choices=METHODS)
    # 'k/B', 'auto' (1 per 64 weights, largest B dividing all layers) or None
    outliers: str | None = _option("auto", "k/B outliers per (row, block of B input columns), 'auto' (1 per 64 "
                                           "weights with the largest B in 256/192/128/64 dividing every layer) or "
                                           "'none'")
    outlier_structure: str = _option("structured", "unstructured = global top weights at equal bytes (comparison "
                                                   "only; dense output)", choices=OUTLIER_STRUCTURES)
    # Defaults chosen on the validation split (benchmarks/ablation.py, benchmarks/results/quality_ablation.json,
    # SmolLM2-135M, SOTU 1990-1999): equalization and variance correction off (each alone, and both, lowered validation
    # perplexity: 47.67 -> 46.44 / 46.54 / 46.28), outliers on (49.21 without), block-wise reconstruction 200 steps
    # on (46.28 -> 39.47), 32 calibration windows (128: 46.04, for ~4x the compress time).
    variance_correction: str = _option("none", choices=VARIANCE_CORRECTIONS)
    mean_shift: bool = _option(False, "also restore the output mean (weight_shift)")
    equalize: float | None = _option(None, "SmoothQuant-like equalization strength (folded into the norms / "
                                          "producing layers)", type=alpha_or_none, metavar="ALPHA|none")
    nsamples: int = _option(32, "calibration windows drawn from --calib (more: better statistics, slower)",
                            type=positive_int)
    seqlen: int = _option(512, "tokens per calibration window", type=positive_int)
    seed: int = _option(0)
    blocksize: int = _option(128, "SparseGPT column block size (a multiple of M)", type=positive_int)
    percdamp: float = _option(0.01, "SparseGPT Hessian damping (fraction of mean diag)")
    true_sequential: bool = _option(True, "collect all statistics of a block before compressing any of its layers",
                                    flag="--no-true-sequential")
    reconstruct: int = _option(200, "block-wise reconstruction: after each decoder block is pruned, STEPS Adam steps "
                                  "(fp32, one calibration window each) on its kept values, outliers and correction "
                                  "scales/shifts so that the block's output matches the dense block's on the "
                                  "calibration activations; masks unchanged; 0 = off", type=non_negative_int,
                               metavar="STEPS")
    reconstruct_lr: float = _option(1e-4, "Adam learning rate of --reconstruct")
    calib: str | None = _option(None, "calibration text file or folder of .txt (default: the sotu-calib split)",
                                type=Path)

    def check(self) -> None:
        """Refuse, before any model is loaded, every setting the pipeline cannot honour (one-line ValueError)."""
        from offline import outliers   # torch-dependent: imported here, not at module import (``--help``)
        from offline.scoring import Pattern
        from vllm_nm16 import format as fmt

        pattern = Pattern.parse(self.pattern)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {'|'.join(METHODS)}, got {self.method!r}")
        if self.outlier_structure not in OUTLIER_STRUCTURES:
            raise ValueError(f"outlier structure must be structured|unstructured, got {self.outlier_structure!r}")
        if self.variance_correction not in VARIANCE_CORRECTIONS:
            raise ValueError(f"variance correction must be channel|tensor|none, got {self.variance_correction!r}")
        if self.equalize is not None and not 0 <= self.equalize <= 1:
            raise ValueError(f"equalize alpha must be in [0, 1], got {self.equalize}")
        if isinstance(self.nsamples, bool) or not isinstance(self.nsamples, int) or self.nsamples < 1:
            raise ValueError(f"calibration needs nsamples >= 1 (--nsamples), got {self.nsamples!r}")
        if isinstance(self.seqlen, bool) or not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise ValueError(f"calibration needs seqlen >= 2 tokens (--seqlen), got {self.seqlen!r}")
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ValueError(f"SparseGPT block size (--blocksize) must be a positive integer, got {self.blocksize!r}")
        if self.method == "sparsegpt" and pattern.structured and self.blocksize % pattern.m:
            raise ValueError(f"SparseGPT block size {self.blocksize} (--blocksize) must be a multiple of "
                             f"M={pattern.m} (pattern {self.pattern})")
        if not (isinstance(self.percdamp, (int, float)) and math.isfinite(self.percdamp) and self.percdamp >= 0):
            raise ValueError(f"SparseGPT damping (--percdamp) must be a finite number >= 0, got {self.percdamp!r}")
        if isinstance(self.reconstruct, bool) or not isinstance(self.reconstruct, int) or self.reconstruct < 0:
            raise ValueError(f"block-wise reconstruction (--reconstruct) needs STEPS >= 0 (0 = off), "
                             f"got {self.reconstruct!r}")
        if not (isinstance(self.reconstruct_lr, (int, float)) and not isinstance(self.reconstruct_lr, bool)
                and math.isfinite(self.reconstruct_lr) and self.reconstruct_lr > 0):
            raise ValueError(f"reconstruction learning rate (--reconstruct-lr) must be a finite number > 0, "
                             f"got {self.reconstruct_lr!r}")
        if self.outliers not in (None, "auto"):
            kb = outliers.parse_outliers(self.outliers)
            if kb and pattern.structured and kb[1] % pattern.m:
                raise ValueError(f"outlier block B={kb[1]} must be a multiple of M={pattern.m} "
                                 f"(pattern {self.pattern})")
            if kb and self.packable:   # every other limit of the format (e.g. B <= 32768), before any work
                fmt.NM16Spec(n=pattern.n, m=pattern.m, outlier_block=kb[1], outliers_per_block=kb[0])
        if self.mean_shift and not self.packable:
            raise ValueError("the mean shift needs a packable nm16 output (an N:M pattern with structured outliers)")

    @property
    def packable(self) -> bool:
        from offline.scoring import Pattern

        return Pattern.parse(self.pattern).structured and not (self.outliers and
                                                                 self.outlier_structure == "unstructured")


def recipe_options() -> tuple[str, ...]:
    """The field names, i.e. the recipe keyword arguments of ``offline.compress``."""
    return tuple(f.name for f in fields(Recipe))
