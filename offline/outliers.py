"""Salient ("outlier") weights taken out before N:M pruning and kept exactly in a 16-bit side tensor.

* structured (the paper's proposal, the one the nm16 format stores): the k most salient weights of every (row, block of
  B input columns) — a fixed budget per block, so the side tensor shards and streams like the main tensor;
* unstructured (for comparison only): the globally most salient weights of the layer at **equal bytes**: stored as CSR
  (bf16 value + int16 column index per outlier, plus an int32 row pointer per row), so it holds fewer outliers than
  the structured variant (3 bytes each with B <= 256) for the same bytes. It cannot be written in the nm16 format.

Salience: |W| for magnitude pruning, the Wanda score |W_ij| * ||X_j|| otherwise (it measures the output error a
weight's removal causes, which is what keeping it in 16 bits avoids).
"""

from __future__ import annotations

import torch

from vllm_nm16 import format as fmt


def parse_outliers(text: str | None) -> tuple[int, int] | None:
    """'k/B' -> (k, B); 'none'/'0' -> None."""
    if text is None or str(text).strip().lower() in ("none", "0", "off", ""):
        return None
    try:
        k, b = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ValueError(f"outliers must be k/B (e.g. 4/256) or 'none', got {text!r}") from None
    if not 0 < k < b:
        raise ValueError(f"outliers {text!r}: need 0 < k < B")
    return k, b


def salience(W: torch.Tensor, col_norm: torch.Tensor | None) -> torch.Tensor:
    return W.abs() if col_norm is None else W.abs() * col_norm[None, :]


def structured_positions(score: torch.Tensor, k: int, block: int) -> torch.Tensor:
    return fmt.outlier_positions_topk(score, k, block)


def unstructured_bytes_per_outlier(value_bytes: int = 2) -> int:
    return value_bytes + 2  # bf16/fp16 value + int16 column index (CSR)


def structured_bytes(out_f: int, in_f: int, k: int, block: int, value_bytes: int = 2) -> float:
    idx_bytes = torch.tensor([], dtype=fmt.index_dtype(block)).element_size()
    return out_f * (in_f // block) * k * (value_bytes + idx_bytes)


def unstructured_count_at_equal_bytes(out_f: int, in_f: int, k: int, block: int, value_bytes: int = 2) -> int:
    budget = structured_bytes(out_f, in_f, k, block, value_bytes) - 4 * (out_f + 1)  # CSR row pointers
    return max(int(budget // unstructured_bytes_per_outlier(value_bytes)), 0)


def unstructured_positions(score: torch.Tensor, count: int) -> torch.Tensor:
    flat = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if count > 0:
        flat[torch.topk(score.reshape(-1).to(torch.float32), count, sorted=False).indices] = True
    return flat.reshape(score.shape)


def unstructured_bytes(out_f: int, count: int, value_bytes: int = 2) -> float:
    return count * unstructured_bytes_per_outlier(value_bytes) + 4 * (out_f + 1)
