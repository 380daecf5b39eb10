"""Recipe ablation on the validation split: is each component of the default recipe worth keeping?

    .venv/bin/python benchmarks/ablation.py [ROW ...] [--calib PATH --text PATH --eval-tokens N|all ...]

A ROW is ``dense``, ``default`` (the current ``offline.recipe.Recipe()`` defaults) or ``default`` followed by
modifiers, one at a time from the default: ``-outliers``, ``-variance_correction``, ``-equalize``, ``-mean_shift``,
``-true_sequential`` switch a component off (``+mean_shift`` on), ``FIELD=VALUE`` sets a recipe field
(``nsamples=128``, ``outliers=6/192``, ``equalize=0.25``, ...). Without ROWs: dense, the default and the default with
each of outliers, variance correction and equalization switched off.

Defaults: calibration on ``sotu-calib-train`` (speeches before 1990), perplexity on the first ``--eval-tokens`` tokens
of ``sotu-valid`` (1990-1999) in non-overlapping 512-token windows: both disjoint from sotu-eval (2000 on), so a
choice made here is not tuned on the evaluation text. ``--calib``/``--text``/``--eval-tokens all`` measure a chosen
recipe on the full sotu-eval the same way.

Every row compresses the dense model in memory with ``offline.compressor.compress_model`` (the code path of
``nm16-compress``) and evaluates it in fp32 with ``offline.evaluate``. Each finished row is added at once to
``benchmarks/results/quality_ablation.json`` with its command, settings, full recipe and the git commit it ran on;
a row already there with the same settings and recipe at the same commit is skipped (``--again`` reruns it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

from common import atomic_write, commit_record

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_ROWS = ("dense", "default", "default -outliers", "default -variance_correction", "default -equalize")
OFF = {"outliers": None, "variance_correction": "none", "equalize": None, "mean_shift": False,
       "true_sequential": False}


def row_recipe(row: str) -> dict | None:
    """The recipe (all fields, as a dict) of a row name; None for ``dense``. ValueError on a bad name."""
    from offline.recipe import Recipe

    words = row.split()
    if words == ["dense"]:
        return None
    if not words or words[0] != "default":
        raise ValueError(f"row {row!r}: expected 'dense' or 'default [modifiers]'")
    recipe = Recipe()
    by_name = {f.name: f for f in dataclasses.fields(Recipe)}
    for w in words[1:]:
        if w[:1] in "+-" and "=" not in w:
            name = w[1:]
            if name not in OFF:
                raise ValueError(f"row {row!r}: {w!r}: a switch is one of {', '.join('±' + k for k in OFF)}")
            value = OFF[name] if w[0] == "-" else True
            if w[0] == "+" and not isinstance(OFF[name], bool):
                raise ValueError(f"row {row!r}: {w!r}: only a boolean field can be switched on; use FIELD=VALUE")
        elif "=" in w:
            name, text = w.split("=", 1)
            if name not in by_name or name == "calib":
                raise ValueError(f"row {row!r}: unknown recipe field {name!r}")
            f = by_name[name]
            parse = f.metadata.get("type") or type(f.default)
            if text.lower() == "none" and name == "outliers":
                value = None
            elif isinstance(f.default, bool):
                value = text.lower() in ("1", "true", "yes", "on")
            else:
                value = parse(text) if parse is not type(None) else text
        else:
            raise ValueError(f"row {row!r}: cannot read modifier {w!r}")
        setattr(recipe, name, value)
    return dataclasses.asdict(recipe)


def _rel(p: Path) -> str:
    """A path as recorded: under the cache folder as '.cache/...', under the repository relative to it."""
    from offline.assets import default_root

    p = Path(os.path.abspath(p))
    cache = Path(os.path.abspath(default_root()))
    if p.is_relative_to(cache):
        return str(Path(".cache") / p.relative_to(cache))
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def run_row(row: str, recipe: dict | None, model_dir: Path, tok, windows, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from offline.calibration import calibration_samples
    from offline.compressor import compress_model
    from offline.evaluate import perplexity_of_model
    from offline.recipe import Recipe

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out: dict = {"row": row, "recipe": recipe}
    if recipe is not None:
        r = Recipe(**{**recipe, "calib": str(args.calib)})
        samples = calibration_samples(tok, args.calib, r.nsamples, r.seqlen, r.seed)
        _spec, results, ignore, info = compress_model(model, samples, r, device=args.device, progress=not args.quiet)
        out.update(outliers_resolved=info["outliers_kb"], dense_layers=len(ignore), compress_seconds=info["seconds"],
                   mean_rel_error=sum(x.report["rel_error_after_correction"] for x in results.values())
                   / len(results))
    t1 = time.time()
    model.to(args.device)
    nll, count = perplexity_of_model(model, windows, batch_size=4, progress=not args.quiet, desc=row)
    out.update(perplexity=math.exp(nll / count), nll_sum=nll, tokens=count, eval_seconds=round(time.time() - t1, 1),
               seconds=round(time.time() - t0, 1))
    return out


def merge_runs(files: list[Path], out: Path) -> int:
    """Add the runs of ``files`` (each written by this script) to ``out``, skipping runs it already holds."""
    data = json.loads(out.read_text()) if out.exists() else {"runs": []}
    added = 0
    for f in files:
        for run in json.loads(f.read_text())["runs"]:
            if run not in data["runs"]:
                data["runs"].append(run)
                added += 1
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(data, indent=2) + "\n")
    print(f"{out}: {added} runs added, {len(data['runs'])} in all")
    return 0


def main(argv: list[str] | None = None) -> int:
    from offline.assets import default_calib_train_path, default_model_dir, default_valid_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rows", nargs="*", default=list(DEFAULT_ROWS))
    ap.add_argument("--model", type=Path, default=default_model_dir())
    ap.add_argument("--calib", type=Path, default=default_calib_train_path(),
                    help="calibration text (default: sotu-calib-train, speeches before 1990)")
    ap.add_argument("--text", type=Path, default=default_valid_path(),
                    help="evaluation text (default: sotu-valid, speeches 1990-1999)")
    ap.add_argument("--eval-tokens", default="16384", help="first N tokens of --text, or 'all'")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="where blocks are compressed and the model is evaluated (cuda)")
    ap.add_argument("--commit", help="record this commit instead of asking git (a tree copied without its history)")
    ap.add_argument("--out", type=Path, default=RESULTS / "quality_ablation.json")
    ap.add_argument("--again", action="store_true", help="rerun rows already recorded with the same settings")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="FILE",
                    help="only add the runs recorded in these files (rows run in parallel) to --out, and stop")
    args = ap.parse_args(argv)
    if args.merge:
        return merge_runs(args.merge, args.out)
    max_tokens = None if args.eval_tokens == "all" else int(args.eval_tokens)
    try:
        recipes = {row: row_recipe(row) for row in args.rows}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import torch
    from transformers import AutoTokenizer

    from offline.evaluate import load_eval_ids, make_windows

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    windows = make_windows(load_eval_ids(tok, args.text, max_tokens), args.eval_seqlen)
    settings = {"model": _rel(args.model), "calib": _rel(args.calib), "text": _rel(args.text),
                "eval_tokens": args.eval_tokens, "eval_seqlen": args.eval_seqlen, "threads": args.threads,
                **({"device": args.device} if args.device != "cpu" else {}),
                "scored_tokens": sum(len(w.ids) - max(w.score_from, 1) for w in windows)}
    data = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    python = "nice -n 5 .venv/bin/python" if args.device == "cpu" else "python3"   # the GPU host has no venv
    command = f"{python} benchmarks/ablation.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    for row, recipe in recipes.items():
        commit = commit_record(args.commit)
        same = [r for r in data["runs"] if r["settings"] == settings and r["recipe"] == recipe
                and r["commit"] == commit["commit"]]
        if same and not args.again:
            print(f"{row}: already recorded (ppl {same[-1]['perplexity']:.3f}); --again reruns it")
            continue
        print(f"{row}", flush=True)
        res = run_row(row, recipe, args.model, tok, windows, args)
        res = {**res, "settings": settings, **commit, "command": command,
               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        data["runs"].append(res)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, json.dumps(data, indent=2) + "\n")
        print(f"    ppl {res['perplexity']:.3f}  ({res['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
