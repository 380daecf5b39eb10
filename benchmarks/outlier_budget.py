"""How many structured outliers per block: output reconstruction error vs outlier budget (the measurement behind the
default ``--outliers auto`` = 1 outlier per 64 weights, i.e. 4/256, or 3/192 on SmolLM2-135M whose hidden size 576 is
not a multiple of 256).

    .venv/bin/python benchmarks/outlier_budget.py [--blocks 0 10 20 29] [--nsamples 8 --seqlen 256]

For the linear layers of a few decoder blocks of the default model, with input statistics from the dense model on
sotu-calib (one shot), every budget k per (row, B input columns) is applied with SparseGPT 8:16 (no other correction)
through ``offline.compressor.compress_linear``; the table gives the mean relative output error
||X (W_eff - W)^T||^2 / ||X W^T||^2 over the layers, the share of the dense bytes the side tensor costs, and the error
reduction per extra byte. Writes ``benchmarks/results/outlier_budget.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offline.assets import default_calib_path, default_model_dir
    from offline.calibration import calibration_samples
    from offline.compressor import Recipe, Stats, compress_linear
    from offline.models import LLAMA_GROUPS
    from offline.scoring import Pattern
    from vllm_nm16 import format as fmt

    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 10, 20, 29])
    ap.add_argument("--block-size", type=int, default=192, help="B (must divide 576 and 1536 on the default model)")
    ap.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2, 3, 4, 6])
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model_dir = default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    samples = calibration_samples(AutoTokenizer.from_pretrained(model_dir), default_calib_path(), args.nsamples,
                                  args.seqlen, 0)
    names = [f"model.layers.{b}.{n}" for b in args.blocks for g in LLAMA_GROUPS for n in g.names]
    stats, hooks = {}, []
    for name in names:
        mod = model.get_submodule(name)
        stats[name] = Stats.empty(mod.in_features, "cpu")
        hooks.append(mod.register_forward_pre_hook(lambda m, a, _n=name: stats[_n].add(a[0])))
    with torch.no_grad():
        for i in range(0, len(samples), 4):
            model(input_ids=samples[i:i + 4], use_cache=False)
    for h in hooks:
        h.remove()
    rows = []
    b = args.block_size
    for k in args.ks:
        recipe = Recipe(method="sparsegpt", pattern="8:16", outliers=f"{k}/{b}" if k else None,
                        variance_correction="none", equalize=None)
        spec = fmt.NM16Spec(8, 16, outlier_block=b if k else None, outliers_per_block=k)
        errs, extra, dense = [], 0.0, 0.0
        for name in names:
            W = model.get_submodule(name).weight.float()
            res = compress_linear(name, W, stats[name], recipe, Pattern(8, 16), spec, (k, b) if k else None,
                                  torch.bfloat16)
            errs.append(res.report["rel_error_after_correction"])
            lb = fmt.layer_bytes(spec, *W.shape)
            extra += lb["outliers"]
            dense += lb["dense"]
        rows.append({"k": k, "B": b, "mean_rel_error": sum(errs) / len(errs), "outlier_bytes_share_of_dense":
                     extra / dense, "bits_per_weight_bitmask": 9 + 16 * extra / dense})
        print(f"k={k}/{b}: mean rel error {rows[-1]['mean_rel_error']:.5f}, side tensor "
              f"{100 * extra / dense:.2f}% of dense bytes", flush=True)
    base = rows[0]["mean_rel_error"] if rows[0]["k"] == 0 else None
    lines = ["# Outlier budget: SparseGPT 8:16 output error vs structured outliers per (row, block)", "",
             f"Layers: all 7 projections of blocks {args.blocks} of SmolLM2-135M; dense-model inputs, "
             f"{args.nsamples} x {args.seqlen} tokens of sotu-calib; no variance correction/equalization.", "",
             "| k / B | outlier bytes (% of dense) | bits/weight (bitmask) | mean rel. output error | "
             "error cut vs no outliers |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        cut = f"{100 * (1 - r['mean_rel_error'] / base):.1f}%" if base else "n/a"
        lines.append(f"| {r['k']}/{r['B']} | {100 * r['outlier_bytes_share_of_dense']:.2f} | "
                     f"{r['bits_per_weight_bitmask']:.3f} | {r['mean_rel_error']:.5f} | {cut} |")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "outlier_budget.json").write_text(json.dumps({"settings": vars(args), "rows": rows, "seconds":
                                                         round(time.time() - t0, 1)}, indent=2) + "\n")
    (out / "outlier_budget.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
