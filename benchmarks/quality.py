"""The quality matrix: perplexity of the default model under every pattern x scorer, and the 8:16 recipe ablations.

    .venv/bin/python benchmarks/quality.py [--nsamples 8 --seqlen 256 --eval-tokens 4096] [--only ROW ...]

Every row compresses the dense model in memory with ``offline.compressor.compress_model`` (the same code path as
``nm16-compress``; the linears then hold the effective weights ``scale * W_nm + W_out`` computed from the 16-bit stored
parts, i.e. what the packed checkpoint unpacks to) and evaluates it in fp32 with ``offline.evaluate`` on the same
windows. Calibration: ``--nsamples`` random ``--seqlen``-token windows of sotu-calib (seed 0, the same for every row);
evaluation: the first ``--eval-tokens`` tokens of sotu-eval in non-overlapping 512-token windows (the same for every
row).

Resumable: each finished row is written to ``benchmarks/results/quality.json`` at once (atomically); a rerun with the
same settings skips the rows already there (``--fresh`` starts over). ``quality.md`` and ``quality.png`` are
regenerated from the JSON after every row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

from common import atomic_write

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

PATTERNS = ("2:4", "4:8", "8:16", "16:32", "unstructured")
METHODS = ("magnitude", "wanda", "sparsegpt")
# The recipe switches off everything but the scorer and pattern; ablation rows switch one thing on at a time.
BARE = {"outliers": None, "outlier_structure": "structured", "variance_correction": "none", "equalize": None}


def matrix_rows() -> list[dict]:
    """Rows in priority order (the most important first, so a time-limited run still answers the targets)."""
    rows: list[dict] = [{"name": "dense", "dense": True}]

    def nm(method, pattern, group, **kw):
        return {"name": f"{method} {pattern}" + "".join(f" +{k}={v}" for k, v in kw.items() if k != "note"),
                "group": group, "recipe": {**BARE, "method": method, "pattern": pattern,
                                           **{k: v for k, v in kw.items() if k != "note"}}}

    full = dict(outliers="auto", variance_correction="channel", equalize=0.5)
    rows.append(nm("sparsegpt", "8:16", "pattern x scorer"))
    rows.append({**nm("sparsegpt", "8:16", "8:16 recipe", **full), "name": "sparsegpt 8:16 full recipe (default)"})
    rows.append(nm("sparsegpt", "2:4", "pattern x scorer"))
    rows.append(nm("sparsegpt", "8:16", "8:16 recipe", outliers="auto", outlier_structure="structured"))
    rows.append(nm("sparsegpt", "8:16", "8:16 recipe", outliers="auto", outlier_structure="unstructured"))
    rows.append(nm("sparsegpt", "unstructured", "pattern x scorer"))
    rows.append(nm("sparsegpt", "4:8", "pattern x scorer"))
    rows.append(nm("sparsegpt", "16:32", "pattern x scorer"))
    rows.append(nm("sparsegpt", "8:16", "8:16 recipe", variance_correction="channel"))
    rows.append(nm("sparsegpt", "8:16", "8:16 recipe", variance_correction="tensor"))
    rows.append(nm("sparsegpt", "8:16", "8:16 recipe", equalize=0.5))
    for method in ("wanda", "magnitude"):
        for pattern in PATTERNS:
            rows.append(nm(method, pattern, "pattern x scorer"))
    # Outlier budget sweep (the default is 1 outlier per 64 weights: 3/192 on this model, 4/256 where 256 divides).
    rows.append(nm("sparsegpt", "8:16", "outlier budget", outliers="1/192"))
    rows.append(nm("sparsegpt", "8:16", "outlier budget", outliers="6/192"))
    rows.append({**nm("wanda", "8:16", "8:16 recipe", **full), "name": "wanda 8:16 full recipe"})
    # Disentangling the full recipe: outliers + variance correction without equalization.
    rows.append(nm("sparsegpt", "8:16", "8:16 recipe", outliers="auto", variance_correction="channel"))
    return rows


def bytes_per_weight(results: dict) -> dict:
    """Linear-layer bytes per weight (both metadata accountings) over all compressed linears."""
    n = sum(r.report["shape"][0] * r.report["shape"][1] for r in results.values())
    bm = sum(r.report["bytes"]["bitmask"] for r in results.values())
    cb = sum(r.report["bytes"]["combinatorial"] for r in results.values())
    return {"bytes_per_weight_bitmask": bm / n, "bytes_per_weight_combinatorial": cb / n}


def run_row(row: dict, args, samples, windows, model_dir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from offline.compressor import Recipe, compress_model
    from offline.evaluate import perplexity_of_model

    t0 = time.time()
    # fp32 in memory: the blocks come back in fp32 holding the effective weights (computed from the bf16 parts).
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out: dict = {"name": row["name"], "group": row.get("group", "reference")}
    if row.get("dense"):
        out.update(bytes_per_weight_bitmask=2.0, bytes_per_weight_combinatorial=2.0, recipe=None)
    else:
        recipe = Recipe(**row["recipe"], nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                        calib=str(args.calib))
        spec, results, ignore, info = compress_model(model, samples, recipe, progress=not args.quiet)
        out.update(bytes_per_weight(results), recipe=row["recipe"], outliers_resolved=info["outliers_kb"],
                   dense_layers=len(ignore), compress_seconds=info["seconds"],
                   mean_rel_error=sum(r.report["rel_error_after_correction"] for r in results.values())
                   / len(results))
    t1 = time.time()
    nll, count = perplexity_of_model(model, windows, batch_size=4, progress=not args.quiet, desc=row["name"])
    out.update(perplexity=math.exp(nll / count), nll_sum=nll, tokens=count, eval_seconds=round(time.time() - t1, 1),
               seconds=round(time.time() - t0, 1))
    return out


# ------------------------------------------------------------------------------------------------------ rendering
def render_markdown(data: dict) -> str:
    rows = data["rows"]
    dense = next((r for r in rows.values() if r["name"] == "dense"), None)
    s = data["settings"]
    lines = [
        "# Quality matrix (SmolLM2-135M-Instruct, sotu corpus)",
        "",
        f"Calibration: {s['nsamples']} x {s['seqlen']} tokens of sotu-calib (seed {s['seed']}); evaluation: first "
        f"{s['eval_tokens']} tokens of sotu-eval, non-overlapping {s['eval_seqlen']}-token windows "
        f"({s['scored_tokens']} scored tokens), fp32. Bytes/weight: all compressed linear layers (values + metadata "
        "+ outliers + scales), with the stored 16-bit bitmask and with the paper's ceil(log2 C(M,N))-bit code. "
        "Unstructured rows count 1 bit/weight of position metadata; unstructured outliers count CSR bytes.",
        "",
        f"Command: `{data['command']}`  ",
        f"Wall time: {data['wall_seconds'] / 60:.1f} min (sum over rows; machine shared with other jobs).",
        "",
        "| group | config | ppl | Δ vs dense | bytes/weight (bitmask) | bytes/weight (log2 C(M,N)) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    order = {name: i for i, name in enumerate(r["name"] for r in matrix_rows())}
    for r in sorted(rows.values(), key=lambda r: (r["group"] != "reference", r["group"], order.get(r["name"], 99))):
        delta = f"{100 * (r['perplexity'] / dense['perplexity'] - 1):+.1f}%" if dense else "n/a"
        lines.append(f"| {r['group']} | {r['name']} | {r['perplexity']:.2f} | {delta} | "
                     f"{r['bytes_per_weight_bitmask']:.4f} | {r['bytes_per_weight_combinatorial']:.4f} |")
    lines += ["", "## Targets", ""] + [f"- {t}" for t in targets(rows)]
    return "\n".join(lines) + "\n"


def _ppl(rows: dict, name: str):
    r = rows.get(name)
    return r["perplexity"] if r else None


def targets(rows: dict) -> list[str]:
    out = []
    for method in METHODS:
        p = [_ppl(rows, f"{method} {pat}") for pat in ("2:4", "4:8", "8:16", "16:32")]
        if None in p:
            out.append(f"ordering ({method}): not all rows measured")
            continue
        ok = p[0] > p[1] > p[2] >= p[3]
        out.append(f"ordering ({method}) 2:4 > 4:8 > 8:16 >= 16:32: {' / '.join(f'{v:.2f}' for v in p)} -> "
                   f"{'holds' if ok else 'MISSED'}")
    dense, full = _ppl(rows, "dense"), _ppl(rows, "sparsegpt 8:16 full recipe (default)")
    p24, uns = _ppl(rows, "sparsegpt 2:4"), _ppl(rows, "sparsegpt unstructured")
    if None not in (dense, full, p24):
        closed = (p24 - full) / (p24 - dense)
        out.append(f"default 8:16 recipe closes {100 * closed:.0f}% of the SparseGPT 2:4 gap to dense "
                   f"(target >= 50%): {'met' if closed >= 0.5 else 'MISSED'}")
    if None not in (full, uns):
        out.append(f"default 8:16 recipe {full:.2f} vs unstructured 50% SparseGPT {uns:.2f}: "
                   f"{'no worse (met)' if full <= uns else 'worse (MISSED)'}")
    st = _ppl(rows, "sparsegpt 8:16 +outliers=auto +outlier_structure=structured")
    un = _ppl(rows, "sparsegpt 8:16 +outliers=auto +outlier_structure=unstructured")
    if None not in (st, un):
        rel = st / un - 1
        out.append(f"structured vs unstructured outliers at equal bytes: {st:.2f} vs {un:.2f} ({100 * rel:+.1f}%; "
                   f"target within 2%): {'met' if abs(rel) <= 0.02 or st < un else 'MISSED'}")
    return out


def render_plot(data: dict, path: Path) -> None:
    """Left: every row, ppl (log) vs bytes/weight; right: zoom on the best rows (SparseGPT/Wanda around 8:16)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(data["rows"].values())
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1, 1.3]})
    colors = {"magnitude": "tab:gray", "wanda": "tab:blue", "sparsegpt": "tab:red"}
    dense = next((r for r in rows if r["name"] == "dense"), None)
    zoom_max = 70.0
    for ax, zoom in zip(axes, (False, True)):
        for r in rows:
            method = (r.get("recipe") or {}).get("method")
            if zoom and (r["perplexity"] > zoom_max or r["name"] == "dense"):
                continue
            marker = "*" if "full recipe" in r["name"] else ("s" if r["name"] == "dense" else "o")
            ax.scatter(r["bytes_per_weight_bitmask"], r["perplexity"], color=colors.get(method, "black"),
                       marker=marker, s=140 if marker != "o" else 30, zorder=3)
            pattern = (r.get("recipe") or {}).get("pattern", "")
            label = r["name"] if zoom else (pattern if method in ("magnitude", "wanda", "sparsegpt") and
                                            r["group"] == "pattern x scorer" else "")
            if label:
                ax.annotate(label.replace(" +", "\n+"), (r["bytes_per_weight_bitmask"], r["perplexity"]),
                            fontsize=6 if zoom else 7, xytext=(4, 2), textcoords="offset points")
        if dense and not zoom:
            ax.axhline(dense["perplexity"], color="black", lw=0.8, ls="--",
                       label=f"dense {dense['perplexity']:.1f} (2 bytes/weight)")
        ax.grid(alpha=0.3)
        ax.set_xlabel("linear-layer bytes per weight (bitmask metadata)")
    for m, c in colors.items():
        axes[0].scatter([], [], color=c, label=m)
    axes[0].scatter([], [], color="black", marker="*", s=100, label="full 8:16 recipe")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("perplexity on sotu-eval (log scale)")
    axes[0].set_title("all rows (labels: pattern)")
    axes[0].legend(fontsize=8)
    axes[1].set_ylabel("perplexity on sotu-eval")
    axes[1].set_title(f"zoom: rows with ppl < {zoom_max:.0f} (dense: {dense['perplexity']:.1f})" if dense else "zoom")
    fig.suptitle("SmolLM2-135M: perplexity vs bytes per weight (lower-left is better)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=150)
    os.replace(tmp, path)
    plt.close(fig)


ABLATION_BEGIN, ABLATION_END = "<!-- ablation (benchmarks/ablation.py) -->", "<!-- /ablation -->"


def kept_sections(old: str) -> str:
    """The hand-written recipe-ablation section of an existing quality.md (kept when the matrix is re-rendered)."""
    i, j = old.find(ABLATION_BEGIN), old.find(ABLATION_END)
    return "\n" + old[i:j + len(ABLATION_END)] + "\n" if 0 <= i < j else ""


def render(data: dict, folder: Path) -> None:
    md = folder / "quality.md"
    atomic_write(md, render_markdown(data) + kept_sections(md.read_text() if md.exists() else ""))
    render_plot(data, folder / "quality.png")


def main(argv: list[str] | None = None) -> int:
    from offline.assets import default_calib_path, default_eval_path, default_model_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=default_model_dir())
    ap.add_argument("--calib", type=Path, default=default_calib_path())
    ap.add_argument("--text", type=Path, default=default_eval_path())
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None, help="run only these row names")
    ap.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    ap.add_argument("--fresh", action="store_true", help="discard cached rows")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from offline.calibration import calibration_samples
    from offline.evaluate import load_eval_ids, make_windows

    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"model": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model),
                "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
                "eval_tokens": args.eval_tokens, "eval_seqlen": args.eval_seqlen}
    data = None
    if args.out.exists() and not args.fresh:
        data = json.loads(args.out.read_text())
        if {k: data["settings"].get(k) for k in settings} != settings:
            print(f"{args.out}: cached rows were made with other settings {data['settings']}; use --fresh",
                  file=sys.stderr)
            return 2
    if args.render_only:
        render(data, args.out.parent)
        return 0
    tok = AutoTokenizer.from_pretrained(args.model)
    samples = calibration_samples(tok, args.calib, args.nsamples, args.seqlen, args.seed)
    windows = make_windows(load_eval_ids(tok, args.text, args.eval_tokens), args.eval_seqlen)
    settings["scored_tokens"] = sum(len(w.ids) - max(w.score_from, 1) for w in windows)
    if data is None:
        data = {"settings": settings, "command": "", "wall_seconds": 0.0, "rows": {}}
    data["settings"] = settings
    data["command"] = "nice -n 5 .venv/bin/python benchmarks/quality.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    rows = [r for r in matrix_rows() if args.only is None or r["name"] in args.only]
    for i, row in enumerate(rows):
        if row["name"] in data["rows"]:
            continue
        print(f"[{i + 1}/{len(rows)}] {row['name']}", flush=True)
        res = run_row(row, args, samples, windows, args.model)
        data["rows"][row["name"]] = res
        data["wall_seconds"] = round(sum(r["seconds"] for r in data["rows"].values()), 1)
        atomic_write(args.out, json.dumps(data, indent=2) + "\n")
        render(data, args.out.parent)
        print(f"    ppl {res['perplexity']:.3f}  bytes/weight {res['bytes_per_weight_bitmask']:.4f}  "
              f"{res['seconds']:.0f} s", flush=True)
    for line in targets(data["rows"]):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
