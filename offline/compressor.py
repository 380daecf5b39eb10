"""The compression pipeline: calibrate block by block, equalize, pick outliers, prune, correct, pack.

Calibration is sequential, as in SparseGPT/Wanda: the calibration batch is embedded once, then each decoder block is
compressed with statistics of *its* inputs, which come out of the already-compressed previous blocks; the block's
outputs under its compressed weights feed the next block. Inside a block the linear layers are compressed in forward
order, stage by stage (q/k/v, o, gate/up, down: "true sequential"), each stage's statistics collected with the earlier
stages already compressed. Only one block (in fp32 on ``device``) and the calibration activations are live at a time.

Per input group we collect H = sum x x^T (SparseGPT's Hessian; its diagonal gives Wanda's ||X_j||^2; with the input mean
it gives the covariance for variance correction and the exact reconstruction error), the input sum and the per-channel
max |x| (equalization).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from offline import correction, equalize, outliers, scoring
from offline.models import linear_groups
from offline.recipe import Recipe
from offline.reconstruct import SparseLinearParts, reconstruct_block
from offline.scoring import Pattern
from vllm_nm16 import format as fmt

log = logging.getLogger("offline")

AUTO_OUTLIER_DENSITY = 64   # 'auto' keeps one outlier per 64 weights (2.3% of the dense bytes with bf16 + uint8 index)
AUTO_BLOCKS = (256, 192, 128, 64)


def resolve_outliers(text: str | None, in_features: list[int], m: int | None) -> tuple[int, int] | None:
    """(k, B) from the recipe string; 'auto' picks the largest B in AUTO_BLOCKS dividing every layer's in_features
    (and a multiple of M) with k = B / 64."""
    if text is None:
        return None
    if text != "auto":
        return outliers.parse_outliers(text)
    if m is not None:  # layers whose in_features M does not divide stay dense anyway: they do not constrain B
        in_features = [f for f in in_features if f % m == 0]
    for b in AUTO_BLOCKS:
        if (m is None or b % m == 0) and all(f % b == 0 for f in in_features):
            return b // AUTO_OUTLIER_DENSITY, b
    return None


@dataclass
class Stats:
    """Sufficient statistics of a linear layer's input over the calibration tokens."""

    H: torch.Tensor
    xsum: torch.Tensor
    absmax: torch.Tensor
    count: int = 0

    @classmethod
    def empty(cls, dim: int, device) -> "Stats":
        return cls(torch.zeros(dim, dim, device=device), torch.zeros(dim, dtype=torch.float64, device=device),
                   torch.zeros(dim, device=device))

    def add(self, x: torch.Tensor, hessian: bool = True) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if hessian:
            self.H.addmm_(x.T, x)
        self.xsum += x.sum(0, dtype=torch.float64)
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        self.count += x.shape[0]


class _Stop(Exception):
    pass


def _run_block(block, xs, kwargs):
    outs = []
    for x in xs:
        y = block(x, **kwargs)
        outs.append(y[0] if isinstance(y, tuple) else y)
    return outs


@torch.no_grad()
def collect_stats(block, xs, kwargs, modules: dict[str, torch.nn.Module], *, hessian: bool,
                  stop_after: str | None) -> dict[str, Stats]:
    """Forward the calibration inputs through ``block`` recording the inputs of ``modules``; with ``stop_after`` the
    forward is cut right after that module's input is seen (later parts of the block are not needed)."""
    stats = {n: Stats.empty(m.in_features, m.weight.device) for n, m in modules.items()}
    handles = []
    for name, mod in modules.items():
        def hook(_mod, args, _name=name):
            stats[_name].add(args[0], hessian=hessian)
            if _name == stop_after:
                raise _Stop
        handles.append(mod.register_forward_pre_hook(hook))
    try:
        for x in xs:
            try:
                block(x, **kwargs)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return stats


@dataclass
class LayerResult:
    name: str
    tensors: dict[str, torch.Tensor] | None       # packed (nm16) tensors, or None when not packable
    w_eff: torch.Tensor                           # effective dense weight (fp32, from the stored 16-bit parts)
    shift: torch.Tensor | None
    report: dict[str, Any] = field(default_factory=dict)
    # While its block is being compressed (dropped after it, to keep one block's worth of them alive): the stored
    # parts as fp32 (block-wise reconstruction tunes them) and the N:M keep mask (outlier slots included).
    parts: SparseLinearParts | None = None
    keep: torch.Tensor | None = None


def compress_linear(name: str, W: torch.Tensor, st: Stats, recipe: Recipe, pattern: Pattern,
                    spec: fmt.NM16Spec | None, outlier_kb: tuple[int, int] | None,
                    value_dtype: torch.dtype, hinv: torch.Tensor | None = None) -> LayerResult:
    """Prune one linear layer (fp32 weight W [out, in]) with its input statistics."""
    out_f, in_f = W.shape
    col_norm = st.H.diagonal().clamp_min(0).sqrt()
    protect = None
    if outlier_kb is not None:
        sal = outliers.salience(W, None if recipe.method == "magnitude" else col_norm)
        k, b = outlier_kb
        if recipe.outlier_structure == "structured":
            protect = outliers.structured_positions(sal, k, b)
        else:
            protect = outliers.unstructured_positions(
                sal, outliers.unstructured_count_at_equal_bytes(out_f, in_f, k, b))
    if recipe.method == "magnitude":
        Wp, keep = scoring.magnitude_prune(W, pattern, protect)
    elif recipe.method == "wanda":
        Wp, keep = scoring.wanda_prune(W, col_norm, pattern, protect)
    else:
        Wp, keep = scoring.sparsegpt_prune(W, st.H, pattern, protect, blocksize=recipe.blocksize,
                                           percdamp=recipe.percdamp, hinv=hinv)
    # Round to the storage dtype first: corrections are computed for the weights that will actually be served.
    if protect is not None:
        # A group may hold more protected positions than M - N (large k): such kept slots hold zeros, so no weight
        # is counted twice (kept N:M values and outliers are disjoint).
        keep_vals = keep & ~protect
    else:
        keep_vals = keep
    w_nm = (Wp * keep_vals).to(value_dtype)
    w_out = (Wp * protect).to(value_dtype) if protect is not None else None
    w_nm32 = w_nm.float()
    w_out32 = w_out.float() if w_out is not None else None
    scale = None
    if recipe.variance_correction != "none":
        C = correction.covariance(st.H.double(), st.xsum, st.count)
        scale = correction.variance_scale(W, w_nm32, w_out32, C, recipe.variance_correction)
    w_before = w_nm32 + (w_out32 if w_out32 is not None else 0)
    w_eff = (w_nm32 * scale[:, None] if scale is not None else w_nm32) + (w_out32 if w_out32 is not None else 0)
    shift = correction.mean_shift(W, w_eff, st.xsum / st.count) if recipe.mean_shift else None
    err_before = correction.relative_error(W, w_before, st.H)
    if scale is None and shift is None:
        err_after = err_before  # nothing corrected: skip the second (costly) quadratic form
    else:
        err_after = correction.relative_error(W, w_eff, st.H, shift, st.xsum, st.count)
    tensors = None
    if spec is not None:
        tensors = fmt.pack(w_nm, keep, spec, outliers=w_out, outlier_mask=protect, scale=scale, shift=shift,
                           name=name)
    parts = SparseLinearParts(w_nm32, keep_vals, w_out32, protect, scale, shift)
    live = keep if protect is None else keep | protect
    report = {
        "shape": [out_f, in_f],
        "sparsity": round(1 - float(live.sum()) / live.numel(), 6),
        "outliers": int(protect.sum()) if protect is not None else 0,
        "rel_error_before_correction": err_before,
        "rel_error_after_correction": err_after,
    }
    if scale is not None:
        report["scale_mean"] = float(scale.mean())
        report["scale_min"] = float(scale.min())
        report["scale_max"] = float(scale.max())
    report["bytes"] = layer_bytes_report(out_f, in_f, pattern, spec, recipe, outlier_kb,
                                         int(protect.sum()) if protect is not None else 0,
                                         torch.tensor([], dtype=value_dtype).element_size())
    return LayerResult(name, tensors, w_eff, shift, report, parts, keep)


def repack(res: LayerResult, parts: SparseLinearParts, spec: fmt.NM16Spec | None,
           value_dtype: torch.dtype) -> None:
    """Replace ``res``'s stored parts (same masks) by ``parts``: packed tensors, effective weight and shift."""
    if spec is not None:
        res.tensors = fmt.pack(parts.values.to(value_dtype), res.keep, spec,
                               outliers=None if parts.outliers is None else parts.outliers.to(value_dtype),
                               outlier_mask=parts.outlier_mask, scale=parts.scale, shift=parts.shift, name=res.name)
    res.parts = parts
    res.w_eff = parts.effective_weight()
    res.shift = parts.shift


def layer_bytes_report(out_f, in_f, pattern: Pattern, spec, recipe: Recipe, outlier_kb, n_outliers,
                       value_bytes) -> dict[str, float]:
    """Bytes of one compressed linear layer in both metadata accountings (see format.layer_bytes). Unstructured
    sparsity counts 1 bit per weight of position metadata in both; unstructured outliers count their CSR bytes."""
    dense = out_f * in_f * value_bytes
    vec = out_f * 4 * ((recipe.variance_correction != "none") + recipe.mean_shift)
    if spec is not None:
        bm = fmt.layer_bytes(spec, out_f, in_f, value_bytes, "bitmask")["total"]
        cb = fmt.layer_bytes(spec, out_f, in_f, value_bytes, "combinatorial")["total"]
        return {"dense": dense, "bitmask": bm, "combinatorial": cb}
    if pattern.structured:
        groups = out_f * in_f // pattern.m
        values = groups * pattern.n * value_bytes
        meta_bm = groups * pattern.m / 8
        meta_cb = groups * fmt.metadata_bits_per_group(pattern.n, pattern.m, "combinatorial") / 8
    else:
        values = out_f * in_f * (1 - pattern.sparsity) * value_bytes
        meta_bm = meta_cb = out_f * in_f / 8
    outl = outliers.unstructured_bytes(out_f, n_outliers, value_bytes) if n_outliers else 0.0
    return {"dense": dense, "bitmask": values + meta_bm + outl + vec, "combinatorial": values + meta_cb + outl + vec}


@torch.no_grad()
def _set_linear(mod: torch.nn.Linear, w_eff: torch.Tensor, shift: torch.Tensor | None) -> None:
    """Make the in-memory layer compute the compressed function (the shift as a forward hook, so the module's own
    bias, which is written to the checkpoint unchanged, stays as it was). Calling it again replaces the shift."""
    mod.weight.copy_(w_eff.to(mod.weight.dtype))
    old = getattr(mod, "_nm16_shift_hook", None)
    if old is not None:
        old.remove()
        mod._nm16_shift_hook = None
    if shift is not None:
        def add_shift(_mod, _inp, out, _shift=shift):
            return out + _shift.to(device=out.device, dtype=out.dtype)
        mod._nm16_shift_hook = mod.register_forward_hook(add_shift)


@torch.no_grad()
def equalize_block(block, groups, xs, kwargs, alpha: float, *, heads: int, kv_heads: int, head_dim: int) -> None:
    """SmoothQuant-like equalization of one decoder block, in place, with 1/s folded into the norms and producing
    rows (see :mod:`offline.equalize`): the block computes the same function afterwards. The per-channel input maxima
    of every group are collected in one pass before any fold (each fold leaves every group's input unchanged)."""
    reps = {g.names[0]: block.get_submodule(g.names[0]) for g in groups}
    st = collect_stats(block, xs, kwargs, reps, hessian=False, stop_after=None)
    for g in groups:
        mods = [block.get_submodule(n) for n in g.names]
        if g.fold_kind == "norm":
            equalize.fold_into_norm(block.get_submodule(g.fold_into), mods, st[g.names[0]].absmax, alpha)
        else:
            index = equalize.gqa_index(heads, kv_heads, head_dim) if g.fold_into.endswith("v_proj") else None
            equalize.fold_into_rows(block.get_submodule(g.fold_into), mods[0], st[g.names[0]].absmax, alpha, index)


def capture_block_inputs(model, samples: torch.Tensor, batch: int, device):
    """Embedded calibration inputs of the first decoder block (list of fp32 chunks) and the keyword arguments the
    model passes to its decoder layers (causal mask, fp32 rotary embeddings)."""
    layers = model.model.layers
    first = layers[0]
    captured: dict[str, Any] = {}

    class Catcher(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention_type = getattr(first, "attention_type", "full_attention")

        def forward(self, hidden_states, *args, **kwargs):
            captured["x"] = hidden_states
            captured["kwargs"] = kwargs
            raise _Stop

    layers[0] = Catcher()
    xs = []
    try:
        for i in range(0, samples.shape[0], batch):
            try:
                model(input_ids=samples[i:i + batch], use_cache=False)
            except _Stop:
                pass
            xs.append(captured["x"].to(device=device, dtype=torch.float32))
    finally:
        layers[0] = first
    kwargs = {k: v for k, v in captured["kwargs"].items() if k in ("attention_mask", "position_ids",
                                                                     "cache_position")}
    seqlen = samples.shape[1]
    pos = torch.arange(seqlen, device=device)[None]
    model.model.rotary_emb.to(device)
    kwargs["position_embeddings"] = tuple(t.float() for t in model.model.rotary_emb(xs[0], pos))
    kwargs["position_ids"] = pos
    if isinstance(kwargs.get("attention_mask"), torch.Tensor):
        m = kwargs["attention_mask"]
        kwargs["attention_mask"] = m.to(device=device, dtype=torch.float32 if m.is_floating_point() else m.dtype)
    kwargs["use_cache"] = False
    return xs, kwargs


@torch.no_grad()
def compress_model(model, samples: torch.Tensor, recipe: Recipe, *, device="cpu", progress: bool = True,
                   strict_divisible: bool = False):
    """Compress ``model`` in place (its linears end up holding the effective weights). Returns
    (spec or None, {module name: LayerResult}, ignore list, info)."""
    from tqdm.auto import tqdm

    from offline.faults import point

    recipe.check()
    pattern = Pattern.parse(recipe.pattern)
    config = model.config.to_dict()
    groups = linear_groups(config)
    layers = model.model.layers
    model_dtype = next(model.parameters()).dtype   # blocks go back in this dtype (fp32 for in-memory evaluation)
    value_dtype = model_dtype
    if value_dtype not in fmt.VALUE_DTYPES:
        value_dtype = torch.bfloat16
    all_in = sorted({layers[0].get_submodule(n).in_features for g in groups for n in g.names})
    m = pattern.m
    outlier_kb = resolve_outliers(recipe.outliers, all_in, m)
    if recipe.outliers == "auto" and outlier_kb is None:
        log.warning("no outlier block in %s divides every in_features %s: outliers disabled", AUTO_BLOCKS, all_in)
    spec = None
    ignore: list[str] = []
    if recipe.packable:
        spec = fmt.NM16Spec(n=pattern.n, m=pattern.m, outlier_block=outlier_kb[1] if outlier_kb else None,
                            outliers_per_block=outlier_kb[0] if outlier_kb else 0,
                            has_scale=recipe.variance_correction != "none", has_shift=recipe.mean_shift)
    need = spec.k_multiple() if spec else (outlier_kb[1] if outlier_kb else (m or 1))
    if outlier_kb and m and outlier_kb[1] % m:
        raise ValueError(f"outlier block B={outlier_kb[1]} must be a multiple of M={m}")
    skip_names = set()
    for i in range(len(layers)):
        for g in groups:
            for n in g.names:
                mod = layers[i].get_submodule(n)
                if mod.in_features % need:
                    full = f"model.layers.{i}.{n}"
                    msg = (f"{full}: in_features={mod.in_features} is not a multiple of {need} "
                           f"(pattern {recipe.pattern}, outliers {outlier_kb})")
                    if strict_divisible:
                        raise ValueError(msg + ": cannot be compressed")
                    skip_names.add(full)
    n_linear = len(layers) * sum(len(g.names) for g in groups)
    if len(skip_names) == n_linear:
        raise ValueError(f"no linear layer can be compressed: no in_features in {all_in} is a multiple of {need} "
                         f"(pattern {recipe.pattern}, outliers {outlier_kb}); choose another --outliers block")
    if skip_names:
        log.warning("%d layer(s) stay dense (in_features not divisible): %s", len(skip_names),
                    ", ".join(sorted(skip_names)[:6]) + (" ..." if len(skip_names) > 6 else ""))
        ignore.extend(sorted(skip_names))
    batch = max(1, min(8, 8192 // recipe.seqlen))
    xs, kwargs = capture_block_inputs(model, samples, batch, device)
    results: dict[str, LayerResult] = {}
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    t0 = time.time()
    recon: dict[str, dict[str, Any]] = {}
    bar = tqdm(range(len(layers)), desc=f"compress {recipe.method} {recipe.pattern}", disable=not progress,
               unit="block")
    for i in bar:
        block = layers[i].to(device=device, dtype=torch.float32)
        prefix = f"model.layers.{i}"
        # Targets of block-wise reconstruction: the dense block on the inputs that come through the compressed
        # earlier blocks.
        targets = _run_block(block, xs, kwargs) if recipe.reconstruct else None
        if recipe.equalize is not None:
            equalize_block(block, groups, xs, kwargs, recipe.equalize, heads=heads, kv_heads=kv, head_dim=head_dim)
        stage_groups = groups if recipe.true_sequential else (groups,)
        for stage in stage_groups:
            stage = stage if isinstance(stage, tuple) else (stage,)
            reps = {g.names[0]: block.get_submodule(g.names[0]) for g in stage}
            stop = stage[-1].names[0] if recipe.true_sequential else None
            st = collect_stats(block, xs, kwargs, reps, hessian=True, stop_after=stop)
            point(f"stats.{prefix}.{stage[0].names[0]}")
            for g in stage:
                hinv = None
                if recipe.method == "sparsegpt":
                    hinv = scoring.sparsegpt_hinv(st[g.names[0]].H, recipe.percdamp)
                for n in g.names:
                    full = f"{prefix}.{n}"
                    if full in skip_names:
                        continue
                    mod = block.get_submodule(n)
                    res = compress_linear(full, mod.weight.float(), st[g.names[0]], recipe, pattern, spec,
                                          outlier_kb, value_dtype, hinv)
                    _set_linear(mod, res.w_eff, res.shift)
                    results[full] = res
                    point(f"linear.{full}")
        if targets is not None:
            names = [n for g in groups for n in g.names if f"{prefix}.{n}" in results]
            if names:
                rr = reconstruct_block(block, xs, targets, {n: results[f"{prefix}.{n}"].parts for n in names},
                                       steps=recipe.reconstruct, lr=recipe.reconstruct_lr, seed=recipe.seed + i,
                                       kwargs=kwargs, value_dtype=value_dtype, progress=progress,
                                       desc=f"reconstruct {i}")
                if rr.applied:
                    for n in names:
                        res = results[f"{prefix}.{n}"]
                        repack(res, rr.layers[n], spec, value_dtype)
                        _set_linear(block.get_submodule(n), res.w_eff, res.shift)
                else:
                    log.warning("%s: reconstruction did not lower the block's output error (%.4g -> %.4g): "
                                "kept the pruned weights as they were", prefix, rr.rel_error_before,
                                rr.rel_error_optimised)
                recon[prefix] = {"rel_error_before": rr.rel_error_before, "rel_error_after": rr.rel_error_after,
                                 "applied": rr.applied, "seconds": round(rr.seconds, 1)}
                point(f"reconstruct.{prefix}")
            del targets
        xs = _run_block(block, xs, kwargs)
        for n in (n for g in groups for n in g.names):
            if f"{prefix}.{n}" in results:
                results[f"{prefix}.{n}"].parts = results[f"{prefix}.{n}"].keep = None
        layers[i] = block.to(device="cpu", dtype=model_dtype)
        point(f"block.{prefix}")
        errs = [results[f"{prefix}.{n}"].report["rel_error_after_correction"]
                for g in groups for n in g.names if f"{prefix}.{n}" in results]
        if errs:
            post = {"rel_err": f"{sum(errs) / len(errs):.4f}"}
            if prefix in recon:
                post["block_err"] = f"{recon[prefix]['rel_error_before']:.4f}->{recon[prefix]['rel_error_after']:.4f}"
            bar.set_postfix(post)
    info = {"outliers_kb": list(outlier_kb) if outlier_kb else None, "seconds": round(time.time() - t0, 1),
            "value_dtype": str(value_dtype).replace("torch.", "")}
    if recon:
        info["reconstruction"] = recon
    return spec, results, ignore, info
