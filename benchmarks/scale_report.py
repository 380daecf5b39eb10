"""Issue 12 (scale): merge the raw results of the scale runs into one table and a plot of tokens/s per GPU.

Inputs (files, or folders searched for ``*.json``):

* ``bench_e2e.py --only ... --label MODEL`` results (``e2e_dense.json`` / ``e2e_nm16.json``, also those of failed or
  timed-out starts written with ``--record-failure``, and ``--start-only`` ones);
* ``benchmarks/gpu/serve_dummy.py`` results (``"kind": "serve"``): the ``vllm serve`` + openai-client checks;
* ``--e2e-8b FILE``: a merged ``bench_e2e.py`` result (``benchmarks/results/e2e_h200.json``) for the 8B rows, with
  ``--e2e-8b-logs DIR`` (its ``e2e_dense.log`` / ``e2e_nm16.log``) for the KV-cache sizes it did not record and
  ``--e2e-8b-commit`` for the commit it was measured on.

Output ``--json``: ``rows`` with ``model, engine, gpus, tp, bench, batch, tokens_per_s, tokens_per_s_per_gpu,
weights_gib, kv_tokens, started, error, commit, command`` (+ ``gpu_mem``, ``startup_s``, lengths). ``bench`` is
``latency`` (tokens/s = batch x output_len / median seconds of one generate call), ``throughput`` (output tokens/s),
or ``startup`` (one row for an engine that measured no speed: it did not start, or timed out first, or was started
only). ``serve`` holds the serve checks; ``not_measured`` the settings of issue 12 with no row (nothing is made up
for them). Rows are only ever built from the inputs; two inputs for the same setting are refused.

    python benchmarks/scale_report.py benchmarks/results/raw/scale_h200 \\
        --e2e-8b benchmarks/results/e2e_h200.json --e2e-8b-logs benchmarks/results/raw/h200 --e2e-8b-commit SHA \\
        --commit SHA --json benchmarks/results/scale_h200.json --plot benchmarks/results/scale_h200.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import LEGACY_SETTINGS  # noqa: E402  (settings of runs recorded before they existed)
from common import git, kv_tokens_from_log  # noqa: E402

# The settings issue 12 asks for: (model, engine, tp)
PLANNED = [("70b", "nm16", 1), ("70b", "dense", 1), ("70b", "dense", 2), ("8b", "nm16", 1), ("8b", "dense", 1),
           ("8b", "nm16", 2), ("8b", "dense", 2)]


def kernel_commit(commit: str | None) -> str | None:
    """The last commit at or before ``commit`` that changed vllm_nm16/kernels (None without git)."""
    # (":/": from the top of the repository -- git runs in benchmarks/, where a plain path matched nothing)
    return git("log", "-1", "--format=%H", commit, "--", ":/vllm_nm16/kernels") if commit else None


def command_of(env: dict | None) -> str | None:
    argv = (env or {}).get("argv")
    return "python3 " + " ".join(argv) if argv else None


def run_rows(run: dict, model: str, commit: str | None) -> list[dict]:
    """Rows of one bench_e2e result (one engine): latency per batch and throughput, or one startup row when it
    measured no speed."""
    st = {**LEGACY_SETTINGS, **(run.get("settings") or {})}
    tp = int(st["tp"])
    env = run.get("env") or {}
    started = bool(run.get("started", "startup_s" in run))
    base = {"model": model, "engine": "nm16" if run.get("quantization") == "nm16" else "dense", "gpus": tp, "tp": tp,
            "weights_gib": run.get("weights_gib"), "kv_tokens": run.get("kv_tokens"), "started": started,
            "error": run.get("error"), "complete": bool(run.get("complete", True)), "startup_s": run.get("startup_s"),
            "gpu_mem": st.get("gpu_mem"), "max_model_len": st.get("max_model_len"),
            "load_format": st.get("load_format"), "gpu": env.get("gpu"), "vllm": env.get("vllm"),
            "commit": env.get("commit") or commit, "command": command_of(env)}
    base["kernel_commit"] = kernel_commit(base["commit"])
    rows = []
    for b, lat in sorted((run.get("latency") or {}).items(), key=lambda kv: int(kv[0])):
        tok_s = int(b) * st["output_len"] / lat["median_s"]
        rows.append({**base, "bench": "latency", "batch": int(b), "tokens_per_s": tok_s,
                     "tokens_per_s_per_gpu": tok_s / tp, "input_len": st["input_len"], "output_len": st["output_len"],
                     "median_s": lat["median_s"], "iters": st.get("iters")})
    thr = run.get("throughput") or {}
    if thr.get("output_tokens_per_s"):
        tok_s = thr["output_tokens_per_s"]
        rows.append({**base, "bench": "throughput", "batch": st["tp_prompts"], "tokens_per_s": tok_s,
                     "tokens_per_s_per_gpu": tok_s / tp, "input_len": st["tp_input"], "output_len": st["tp_output"],
                     "total_tokens_per_s": thr.get("total_tokens_per_s")})
    if not rows:
        rows.append({**base, "bench": "startup", "batch": None, "tokens_per_s": None, "tokens_per_s_per_gpu": None})
    return rows


def serve_entry(res: dict, commit: str | None) -> dict:
    tp = int(res.get("tp", 1))
    return {"model": res["label"], "engine": res["engine"], "gpus": tp, "tp": tp, "started": bool(res.get("started")),
            "ready_s": res.get("ready_s"), "weights_gib": res.get("weights_gib"), "kv_tokens": res.get("kv_tokens"),
            "completion_answered": bool(res.get("completion_answered")),
            "chat_answered": bool(res.get("chat_answered")),
            "chat": (res.get("chat") or {}).get("content", (res.get("chat") or {}).get("error")),
            "error": res.get("error"), "commit": commit, "command": res.get("cmd"),
            "gpu_mem": res.get("gpu_mem")}


def load_inputs(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    """(bench_e2e results, serve results) among the JSON files of ``paths`` (folders are searched)."""
    files = []
    for p in paths:
        files += sorted(p.rglob("*.json")) if p.is_dir() else [p]
    runs, serves = [], []
    for f in files:
        d = json.loads(f.read_text())
        if not isinstance(d, dict):
            continue
        d["_file"] = str(f)
        if d.get("kind") == "serve":
            serves.append(d)
        elif "settings" in d and ("latency" in d or "started" in d) and "rows" not in d:
            if not d.get("label"):
                raise SystemExit(f"error: {f} has no model label (run bench_e2e.py with --label)")
            runs.append(d)
    return runs, serves


def e2e_8b_runs(path: Path, logs: Path | None) -> list[dict]:
    """The dense and nm16 runs of a merged bench_e2e result, labelled 8b; KV tokens from their logs if given."""
    merged = json.loads(path.read_text())
    runs = []
    for name in ("dense", "nm16"):
        run = dict(merged[f"{name}_raw"])
        run.setdefault("settings", merged["settings"])
        run.setdefault("env", (merged.get("env") or {}).get(name))
        run["label"] = "8b"
        log = logs / f"e2e_{name}.log" if logs else None
        if run.get("kv_tokens") is None and log and log.is_file():
            run["kv_tokens"] = kv_tokens_from_log(log.read_text(errors="replace"))
        run["_file"] = str(path)
        runs.append(run)
    return runs


def build(runs: list[dict], serves: list[dict], commit: str | None, commits: dict[str, str | None]) -> dict:
    """The report: rows of every run (``commits`` maps an input file to the commit it was measured on, else
    ``commit``), the serve checks, the planned settings without rows."""
    rows = []
    for run in runs:
        rows += run_rows(run, run["label"], commits.get(run["_file"], commit))
    seen = {}
    for r in rows:
        key = (r["model"], r["engine"], r["tp"], r["gpu_mem"], r["bench"], r["batch"])
        if key in seen:
            raise SystemExit(f"error: two results for {key}: {seen[key]} and {r['command']}")
        seen[key] = r["command"]
    rows.sort(key=lambda r: (r["model"] != "70b", r["engine"], r["tp"], r["gpu_mem"] or 0,
                             ["startup", "latency", "throughput"].index(r["bench"]), r["batch"] or 0))
    have = {(r["model"], r["engine"], r["tp"]) for r in rows}
    return {"rows": rows, "serve": [serve_entry(s, commits.get(s["_file"], commit)) for s in serves],
            "not_measured": [{"model": m, "engine": e, "tp": t} for m, e, t in PLANNED if (m, e, t) not in have]}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    models = [m for m in ("70b", "8b") if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.4), squeeze=False)
    colors = {("nm16", 1): "tab:blue", ("dense", 1): "tab:gray", ("nm16", 2): "tab:cyan", ("dense", 2): "k"}
    for ax, model in zip(axes[0], models):
        mr = [r for r in rows if r["model"] == model]
        speed = [r for r in mr if r["bench"] != "startup" and r["tokens_per_s_per_gpu"]]
        benches = sorted({(r["bench"] != "latency", r["batch"]) for r in speed})
        labels = [f"latency b={b}" if not t else f"throughput ({b} req)" for t, b in benches]
        settings = sorted({(r["engine"], r["tp"], r["gpu_mem"]) for r in speed}, key=lambda s: (s[1], s[0] != "nm16"))
        width = 0.8 / max(1, len(settings))
        for i, (eng, tp, gm) in enumerate(settings):
            vals = []
            for t, b in benches:
                hit = [r for r in speed if (r["engine"], r["tp"], r["gpu_mem"]) == (eng, tp, gm)
                       and (r["bench"] != "latency", r["batch"]) == (t, b)]
                vals.append(hit[0]["tokens_per_s_per_gpu"] if hit else 0.0)
            xs = [j + (i - (len(settings) - 1) / 2) * width for j in range(len(benches))]
            ax.bar(xs, vals, width, label=f"{eng} TP={tp} ({tp} GPU{'s' if tp > 1 else ''})",
                   color=colors.get((eng, tp), None))
            for x, v in zip(xs, vals):
                if v:
                    ax.text(x, v * 1.05, f"{v:.0f}", ha="center", fontsize=7)
        notes = [f"{r['engine']} TP={r['tp']} (gpu_mem {r['gpu_mem']}): "
                 + ("did not start: " + (r["error"] or "?")[:70] if not r["started"] else "started, no speed run")
                 for r in mr if r["bench"] == "startup"]
        for k, note in enumerate(notes):
            ax.text(0.01, 0.97 - 0.06 * k, note, transform=ax.transAxes, fontsize=7, va="top", color="tab:red")
        ax.set_yscale("log")
        if speed:  # headroom above the bars for the notes
            top = max(r["tokens_per_s_per_gpu"] for r in speed)
            ax.set_ylim(min(r["tokens_per_s_per_gpu"] for r in speed) / 2, top * (4 + 3 * len(notes)))
        ax.set_xticks(range(len(benches)), labels, rotation=15, fontsize=8)
        ax.set_ylabel("output tokens/s per GPU (log)")
        weights = ", ".join(f"{r['engine']} TP={r['tp']} {r['weights_gib']:.1f} GiB" for r in
                            {(r["engine"], r["tp"]): r for r in mr if r.get("weights_gib")}.values())
        lengths = sorted({f"{r['input_len']}/{r['output_len']}" for r in speed if r["bench"] == "latency"})
        ax.set_title(f"Llama-3-{model.upper()} shapes, dummy weights; weights loaded: {weights}\n"
                     f"latency: in/out tokens {', '.join(lengths) or '-'}", fontsize=8)
        if settings:
            ax.legend(fontsize=8, loc="upper right")
    gpu = next((r["gpu"] for r in rows if r.get("gpu")), "?")
    vllm = next((r["vllm"] for r in rows if r.get("vllm")), "?")
    fig.suptitle(f"vLLM {vllm} on {gpu}: tokens/s per GPU (bars absent = not measured)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="*", type=Path, help="raw result files or folders")
    ap.add_argument("--e2e-8b", type=Path, help="merged bench_e2e result of the 8B shapes (TP=1)")
    ap.add_argument("--e2e-8b-logs", type=Path, help="folder with that run's e2e_dense.log / e2e_nm16.log")
    ap.add_argument("--e2e-8b-commit", help="commit the 8B result was measured on (over what the file says)")
    ap.add_argument("--commit", help="commit the raw runs were measured on, where they did not record one "
                                     "(default: this checkout's HEAD)")
    ap.add_argument("--commit-of", action="append", default=[], metavar="FILE=SHA",
                    help="the commit one input file was measured on, over what the file says (repeatable): the GPU "
                         "host's copy of the tree answers git with the commit its session started from")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args(argv)
    runs, serves = load_inputs(args.inputs)
    commits: dict[str, str | None] = {}
    forced = [spec.partition("=")[::2] for spec in args.commit_of]
    if args.e2e_8b:
        runs += e2e_8b_runs(args.e2e_8b, args.e2e_8b_logs)
        if args.e2e_8b_commit:
            forced.append((str(args.e2e_8b), args.e2e_8b_commit))
    for file, sha in forced:
        hit = [r for r in runs + serves if Path(r["_file"]) == Path(file)]
        if not sha or not hit:
            raise SystemExit(f"error: --commit-of {file}={sha}: expected FILE=SHA with FILE one of the inputs")
        for r in hit:
            r["env"] = {**(r.get("env") or {}), "commit": sha, "commit_given": True}
            commits[r["_file"]] = sha
    if not runs and not serves:
        raise SystemExit("error: no results among the inputs")
    report = build(runs, serves, args.commit or git("rev-parse", "HEAD"), commits)
    report["inputs"] = sorted({r["_file"] for r in runs} | {s["_file"] for s in serves})
    report["argv"] = sys.argv if argv is None else ["scale_report.py", *argv]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    for r in report["rows"]:
        tps = f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] else "-"
        print(f"{r['model']:>4} {r['engine']:>5} TP={r['tp']} {r['bench']:>10} {str(r['batch']):>4} tok/s {tps:>9} "
              f"weights {r['weights_gib']} GiB kv {r['kv_tokens']} started {r['started']}"
              + (f" error: {r['error']}" if r["error"] else ""))
    for s in report["serve"]:
        print(f"serve {s['model']} {s['engine']} TP={s['tp']}: started {s['started']} chat answered "
              f"{s['chat_answered']} ({s['chat']!r})")
    if report["not_measured"]:
        print("not measured:", ", ".join(f"{m['model']} {m['engine']} TP={m['tp']}" for m in report["not_measured"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
