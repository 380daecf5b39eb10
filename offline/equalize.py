"""SmoothQuant-like weight equalization, folded so the dense model computes the same function.

For a group of linear layers reading the same input x (q/k/v after ``input_layernorm``, gate/up after
``post_attention_layernorm``, o after v, down after up), per input channel j::

    s_j = max|X_j|^alpha / max|W_:j|^(1 - alpha)        W <- W diag(s),   x <- x / s

``x / s`` is folded into whatever produces x: the RMSNorm weight (``norm.weight /= s``) or the rows (and bias) of the
producing linear (``v_proj``/``up_proj`` rows ``/= s``; both feed their consumer linearly: attention mixes tokens, not
channels, and ``act(gate) * up`` is linear in up). With grouped-query attention an ``o_proj`` input channel is fed by
the ``v_proj`` row of its KV head, so the scales are shared by the query heads of a KV group.

Why: after the fold, weight magnitudes carry the activation scale, so magnitude-based choices (magnitude pruning, the
outlier budget) see which weights matter. Wanda and SparseGPT scores are (up to damping) invariant to this
reparametrization, so for them equalization changes little — measured in the quality matrix.
"""

from __future__ import annotations

import torch

EPS = 1e-5


def equalization_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [in] from per-channel activation and weight maxima (both [in])."""
    x = x_absmax.float().clamp_min(EPS)
    w = w_absmax.float().clamp_min(EPS)
    s = x.pow(alpha) / w.pow(1 - alpha)
    s = torch.where((x_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s))
    return s.clamp(1e-4, 1e4)


@torch.no_grad()
def fold_into_norm(norm: torch.nn.Module, linears: list[torch.nn.Linear], x_absmax: torch.Tensor,
                   alpha: float) -> torch.Tensor:
    """Equalize ``linears`` (which read ``norm``'s output) and fold 1/s into ``norm.weight``. Returns s."""
    w_absmax = torch.stack([lin.weight.abs().amax(dim=0).float() for lin in linears]).amax(dim=0)
    s = equalization_scales(x_absmax, w_absmax, alpha)
    norm.weight.div_(s.to(norm.weight.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
    return s


def gqa_index(heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """For every o_proj input channel (query head h, dim d) the v_proj output row feeding it."""
    c = torch.arange(heads * head_dim)
    h, d = c // head_dim, c % head_dim
    return (h // (heads // kv_heads)) * head_dim + d


@torch.no_grad()
def fold_into_rows(producer: torch.nn.Linear, consumer: torch.nn.Linear, x_absmax: torch.Tensor, alpha: float,
                   index: torch.Tensor | None = None) -> torch.Tensor:
    """Equalize ``consumer`` and fold 1/s into the rows (and bias) of ``producer``; ``index`` maps consumer input
    channels to producer rows (identity when None). Returns the consumer-side s [in]."""
    n_rows = producer.weight.shape[0]
    dev = consumer.weight.device  # the compressor may run on CUDA (--device cuda)
    index = torch.arange(n_rows, device=dev) if index is None else index.to(dev)
    w_absmax = consumer.weight.abs().amax(dim=0).float()
    x_rows = torch.zeros(n_rows, device=dev).scatter_reduce(0, index, x_absmax.float().to(dev), "amax",
                                                            include_self=False)
    w_rows = torch.zeros(n_rows, device=dev).scatter_reduce(0, index, w_absmax, "amax", include_self=False)
    s_rows = equalization_scales(x_rows, w_rows, alpha)
    producer.weight.div_(s_rows.to(producer.weight.dtype)[:, None])
    if producer.bias is not None:
        producer.bias.div_(s_rows.to(producer.bias.dtype))
    s = s_rows[index]
    consumer.weight.mul_(s.to(consumer.weight.dtype)[None, :])
    return s
