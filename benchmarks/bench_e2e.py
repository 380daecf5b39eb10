"""End-to-end vLLM speed: dense vs nm16 checkpoints of the same model, identical engine settings, vLLM defaults
(torch.compile + CUDA graphs on; no --enforce-eager).

What it measures, per model, in ONE engine (one start per model instead of one per batch size — device time is scarce;
the timed loop is the same as `vllm bench latency` / `vllm bench throughput`: random token-id prompts, ignore_eos,
fixed output length):

* latency: for each batch size B, the wall time of ``LLM.generate`` on B prompts of ``--input-len`` random tokens
  generating exactly ``--output-len`` tokens each (median of ``--iters`` after ``--warmup`` runs);
* throughput: ``--tp-prompts`` prompts of ``--tp-input`` tokens, ``--tp-output`` tokens each, in one generate call:
  output tokens/s and total tokens/s;
* weight memory: vLLM's "Model loading took X GiB" log line; KV-cache capacity: its "GPU KV cache size: N tokens"
  line (``kv_tokens``; the engine's block count and block size are kept too); engine start time (``startup_s``).

    python benchmarks/bench_e2e.py --dense DENSE_DIR --nm16 NM16_DIR --json OUT.json [--plot OUT.png]

Each model runs in its own subprocess (a clean GPU for each); results are merged into one JSON whose ``rows`` hold
``bench`` (latency|throughput), ``batch``, ``dense``, ``nm16``, ``unit``, ``speedup`` (>1: nm16 faster).
A device call is limited to 10 minutes, so the two models can also run in separate calls and be merged afterwards
(the settings of both runs must match; the merge checks it):

    python benchmarks/bench_e2e.py --only dense --dense DENSE_DIR --log-dir RAW      # call 1 -> RAW/e2e_dense.json
    python benchmarks/bench_e2e.py --only nm16 --nm16 NM16_DIR --log-dir RAW         # call 2 -> RAW/e2e_nm16.json
    python benchmarks/bench_e2e.py --merge RAW/e2e_dense.json RAW/e2e_nm16.json --json OUT.json --plot OUT.png

Any shape without weight files: ``--load-format dummy`` (vLLM fills the dense model with noise; the nm16 plugin fills
each packed layer with a valid random nm16 layer) on config-only folders (``make_random_llama.py --config-only``,
``pack_random_nm16.py --config-only``), with ``--skip-tokenizer-init`` (the prompts are random token ids; nothing is
detokenized). Both are engine settings, recorded with the others, so a merge refuses runs that differ in them.

Large models (issue 12, e.g. a 70B-shaped one on one GPU): ``--tp N`` (vLLM tensor parallelism), ``--start-only``
(start the engine, record start time / weights / KV tokens, stop: no timed runs), ``--timeout S`` (stop the run after
S seconds, the engine's processes with it) and ``--record-failure`` (a run that fails or times out still writes its
result file, with ``started``, ``error`` — vLLM's root-cause message from the log — and what it measured before).
The child rewrites its result after the start and after every measurement, so a run stopped part-way keeps those.
``--label`` names the model in the result (e.g. ``70b``) for ``scale_report.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import atomic_write, commit_record, error_from_log, kv_tokens_from_log, weights_gib_from_log


def run_one(args: argparse.Namespace) -> dict:
    """Child process: benchmark one checkpoint."""
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = dict(model=args.model, max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_mem,
              enable_prefix_caching=False, max_num_seqs=max(max(args.batches), 256), seed=0)
    if args.tp != 1:
        kw["tensor_parallel_size"] = args.tp
    if args.quantization:
        kw["quantization"] = args.quantization
    if args.load_format != "auto":
        kw["load_format"] = args.load_format
    if args.skip_tokenizer_init:
        kw["skip_tokenizer_init"] = True
    if args.profile_tokens:
        # vLLM's own torch-profiler hook in the worker (the engine core runs in another process): skip the prefill
        # and first decode iterations, record PROFILE_STEPS decode iterations. Inert until start_profile().
        kw["profiler_config"] = {"profiler": "torch", "torch_profiler_dir": str(args.profile_dir.resolve()),
                                 "torch_profiler_with_stack": False, "ignore_frontend": True,
                                 "delay_iterations": PROFILE_DELAY, "max_iterations": args.profile_steps}
    t0 = time.perf_counter()
    llm = LLM(**kw)
    startup_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    out: dict = {"model": args.model, "quantization": args.quantization, "startup_s": startup_s, "latency": {},
                 "throughput": {}, "complete": False, **engine_kv_blocks(llm)}

    def save() -> None:  # after every measurement: a run stopped part-way keeps what it measured
        atomic_write(args.child_json, json.dumps(out, indent=2))

    save()
    if args.start_only:
        out["complete"] = True
        return out

    def prompts(count: int, length: int):
        return [TokensPrompt(prompt_token_ids=rng.integers(100, 10000, size=length).tolist()) for _ in range(count)]

    def sampling(max_tokens: int) -> SamplingParams:
        return SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=max_tokens,
                              detokenize=not args.skip_tokenizer_init)

    sp = sampling(args.output_len)
    for b in args.batches:
        batch = prompts(b, args.input_len)
        for _ in range(args.warmup):
            llm.generate(batch, sp, use_tqdm=False)
        times = []
        for _ in range(args.iters):
            t = time.perf_counter()
            res = llm.generate(batch, sp, use_tqdm=False)
            times.append(time.perf_counter() - t)
            assert all(len(r.outputs[0].token_ids) == args.output_len for r in res)
        out["latency"][str(b)] = {"median_s": statistics.median(times), "all_s": times}
        save()
        print(f"[{args.quantization or 'dense'}] latency batch {b}: median {statistics.median(times):.4f} s",
              flush=True)
    if args.profile_tokens:
        out["profile"] = {}
        psp = sampling(args.profile_tokens)
        for b in args.batches:
            batch = prompts(b, args.input_len)
            before = set(args.profile_dir.rglob("*.pt.trace.json*"))
            llm.start_profile(profile_prefix=f"{args.quantization or 'dense'}_b{b}")
            llm.generate(batch, psp, use_tqdm=False)
            llm.stop_profile()
            traces = []
            for _ in range(120):  # the worker writes the trace after stop_profile returns
                traces = sorted(set(args.profile_dir.rglob("*.pt.trace.json*")) - before)
                if traces:
                    break
                time.sleep(1)
            time.sleep(2)
            out["profile"][str(b)] = summarize_trace(traces, args.profile_steps)
            print(f"[{args.quantization or 'dense'}] profile batch {b}: "
                  f"{out['profile'][str(b)].get('kernel_us_per_step', float('nan')):.0f} us of kernels per step",
                  flush=True)
    if args.tp_prompts:
        batch = prompts(args.tp_prompts, args.tp_input)
        tsp = sampling(args.tp_output)
        llm.generate(batch[: min(32, len(batch))], tsp, use_tqdm=False)  # warm-up
        t = time.perf_counter()
        res = llm.generate(batch, tsp, use_tqdm=False)
        el = time.perf_counter() - t
        n_out = sum(len(r.outputs[0].token_ids) for r in res)
        out["throughput"] = {"elapsed_s": el, "requests_per_s": len(batch) / el, "output_tokens_per_s": n_out / el,
                             "total_tokens_per_s": (n_out + len(batch) * args.tp_input) / el}
        print(f"[{args.quantization or 'dense'}] throughput: {n_out / el:.1f} output tok/s", flush=True)
    out["complete"] = True
    return out


def engine_kv_blocks(llm) -> dict:
    """The engine's KV-cache block count and block size as the front end knows them (a cross-check of the logged
    ``kv_tokens``; empty where this vLLM keeps them elsewhere)."""
    try:
        cc = llm.llm_engine.vllm_config.cache_config
        return {"kv_blocks": int(cc.num_gpu_blocks), "kv_block_size": int(cc.block_size)}
    except Exception:  # noqa: BLE001 - a cross-check only
        return {}


PROFILE_DELAY = 4  # engine iterations skipped after start_profile: the prefill (<= 64 x 128 tokens) and warm decode


def kernel_category(name: str) -> str:
    """Coarse owner of a GPU kernel in a decode step."""
    low = name.lower()
    if "nm16" in low or "_unpack_kernel" in low or "split_k_reduce" in low:
        return "nm16 (Triton)"
    if any(t in low for t in ("flash", "attn", "attention", "fmha", "paged")):  # before "cutlass": FA3 is CUTLASS
        return "attention"
    if any(t in low for t in ("nvjet", "gemm", "xmma", "cutlass", "cublas", "gemv")):
        return "cuBLAS GEMM"
    if low.startswith("triton_") or "fused" in low:
        return "Inductor fused (norms, rope, act, ...)"
    return "other"


def recategorize(summary: dict) -> dict:
    """Re-apply kernel_category to a summary's top kernels and move their time between categories (fixes summaries
    written before FlashAttention kernels were matched ahead of "cutlass"; kernels outside the top list keep theirs)."""
    cats = dict(summary.get("by_category_us_per_step") or {})
    for k in summary.get("top_kernels", []):
        new = kernel_category(k["name"])
        if new != k["category"]:
            cats[k["category"]] = cats.get(k["category"], 0.0) - k["us_per_step"]
            cats[new] = cats.get(new, 0.0) + k["us_per_step"]
            k["category"] = new
    summary["by_category_us_per_step"] = dict(sorted(cats.items(), key=lambda kv: -kv[1]))
    return summary


def summarize_trace(paths: list[Path], steps: int) -> dict:
    """GPU kernel time per decode step from torch-profiler chrome traces (vLLM's worker profiler): totals by
    category and the top kernels by name. Kernels replayed from CUDA graphs are recorded by CUPTI like others."""
    import gzip

    by_name: dict[str, list[float]] = {}
    for path in paths:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            events = json.load(f).get("traceEvents", [])
        for e in events:
            if e.get("cat") in ("kernel", "Kernel") and "dur" in e:
                by_name.setdefault(e["name"], []).append(float(e["dur"]))
    if not by_name:
        return {"error": f"no kernel events in {[str(p) for p in paths]}"}
    total = sum(sum(v) for v in by_name.values())
    cats: dict[str, float] = {}
    for name, durs in by_name.items():
        cats[kernel_category(name)] = cats.get(kernel_category(name), 0.0) + sum(durs)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:12]
    return {"traces": [str(p) for p in paths], "steps": steps, "kernel_us_per_step": total / steps,
            "by_category_us_per_step": {k: v / steps for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n[:120], "calls_per_step": len(d) / steps, "us_per_step": sum(d) / steps,
                             "category": kernel_category(n)} for n, d in top]}


def bench_model(model: str, quantization: str | None, args: argparse.Namespace, log_dir: Path) -> dict:
    res_file = log_dir / f"e2e_{quantization or 'dense'}.json"
    log_file = log_dir / f"e2e_{quantization or 'dense'}.log"
    res_file.unlink(missing_ok=True)  # a stale result must not pass for this run's
    cmd = [sys.executable, __file__, "--child", "--model", model, "--child-json", str(res_file),
           "--batches", *map(str, args.batches), "--input-len", str(args.input_len), "--output-len",
           str(args.output_len), "--iters", str(args.iters), "--warmup", str(args.warmup), "--tp-prompts",
           str(args.tp_prompts), "--tp-input", str(args.tp_input), "--tp-output", str(args.tp_output),
           "--max-model-len", str(args.max_model_len), "--gpu-mem", str(args.gpu_mem),
           "--profile-tokens", str(args.profile_tokens), "--profile-steps", str(args.profile_steps),
           "--profile-dir", str(args.profile_dir), "--load-format", args.load_format, "--tp", str(args.tp)]
    if quantization:
        cmd += ["--quantization", quantization]
    if args.skip_tokenizer_init:
        cmd += ["--skip-tokenizer-init"]
    if args.start_only:
        cmd += ["--start-only"]
    rc, timed_out = run_child(cmd, log_file, args.timeout)
    text = log_file.read_text(errors="replace")
    res = {"model": model, "quantization": quantization}
    if res_file.is_file():
        try:
            res = json.loads(res_file.read_text())
        except json.JSONDecodeError:  # cut short while the child wrote its final result
            pass
    failed = rc != 0 or not res.get("complete")
    if failed and not args.record_failure:
        print(text[-6000:])
        raise SystemExit(f"benchmark of {model} failed (rc {rc}{', timed out' if timed_out else ''}); log: {log_file}")
    res.update(started="startup_s" in res, weights_gib=weights_gib_from_log(text), kv_tokens=kv_tokens_from_log(text),
               label=args.label, settings=settings_of(args), env=environment(args.commit), start_only=args.start_only)
    if failed:
        cause, lines = error_from_log(text)
        if timed_out:
            cause = f"timed out after {args.timeout:.0f} s" + (f" (last error in the log: {cause})" if cause else "")
        res.update(complete=False, returncode=rc, timed_out=timed_out,
                   error=cause or f"exit status {rc} with no exception in the log", error_lines=lines[-10:])
        print(f"[{quantization or 'dense'}] FAILED (recorded): started={res['started']} error={res['error']}")
    res_file.write_text(json.dumps(res, indent=2, default=str))
    return res


def run_child(cmd: list[str], log_file: Path, timeout: float | None) -> tuple[int, bool]:
    """Run a benchmark child with its output in ``log_file``, in its own process group; on timeout stop the group
    (SIGTERM, then SIGKILL after 30 s), and in any case kill what is left of the group when the child is gone (an
    engine-core or worker process must not keep the GPU from the next run). Returns (exit status, timed out)."""
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        stop_group(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode, timed_out


def stop_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to the process group ``pgid`` (one this script started with start_new_session)."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


SETTINGS = ("batches", "input_len", "output_len", "iters", "warmup", "tp_prompts", "tp_input", "tp_output",
            "max_model_len", "gpu_mem", "load_format", "skip_tokenizer_init", "tp")
# values of runs recorded before these settings existed
LEGACY_SETTINGS = {"load_format": "auto", "skip_tokenizer_init": False, "tp": 1}


def settings_of(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in SETTINGS}


def recorded_settings(run: dict) -> dict:
    """A result file's settings, with the defaults of settings added later filled in."""
    return {**LEGACY_SETTINGS, **run["settings"]}


def environment(commit: str | None = None) -> dict:
    """Versions, argv and the commit: ``commit`` (--commit) where given -- the GPU host's copy of the tree answers
    git with the commit its session started from, not the one copied (measured: 12ef88c recorded for e4509ba)."""
    env = {"python": platform.python_version(), "argv": sys.argv, **commit_record(commit)}
    try:
        import torch
        import vllm

        env.update(torch=torch.__version__, vllm=vllm.__version__,
                   gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
        import triton

        env["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001 - environment record only
        env["error"] = repr(e)
    return env


def merge(dense: dict, nm16: dict, args: argparse.Namespace) -> list[dict]:
    rows = []
    for b in args.batches:
        d, s = dense["latency"][str(b)]["median_s"], nm16["latency"][str(b)]["median_s"]
        tok = b * args.output_len
        rows.append({"bench": "latency", "batch": b, "input_len": args.input_len, "output_len": args.output_len,
                     "dense": d, "nm16": s, "unit": "s (median, lower is better)", "speedup": d / s,
                     "dense_tok_s": tok / d, "nm16_tok_s": tok / s})
    if args.tp_prompts:
        d, s = dense["throughput"]["output_tokens_per_s"], nm16["throughput"]["output_tokens_per_s"]
        rows.append({"bench": "throughput", "batch": args.tp_prompts, "input_len": args.tp_input,
                     "output_len": args.tp_output, "dense": d, "nm16": s, "unit": "output tokens/s",
                     "speedup": s / d})
    if dense.get("weights_gib") and nm16.get("weights_gib"):
        rows.append({"bench": "weight_memory", "batch": None, "dense": dense["weights_gib"],
                     "nm16": nm16["weights_gib"], "unit": "GiB (vLLM 'Model loading took')",
                     "speedup": dense["weights_gib"] / nm16["weights_gib"]})
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = [r for r in rows if r["bench"] == "latency"]
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"latency b={r['batch']}" for r in lat] + [f"throughput ({r['batch']} req)" for r in rows
                                                           if r["bench"] == "throughput"]
    vals = [r["speedup"] for r in lat] + [r["speedup"] for r in rows if r["bench"] == "throughput"]
    ax.bar(labels, vals, color="tab:blue")
    ax.axhline(1.0, color="k", lw=1)
    for i, v in enumerate(vals):
        ax.text(i, v + 0.02, f"{v:.2f}x", ha="center")
    ax.set_ylabel("nm16 speedup over dense (x)")
    ax.set_title(title, fontsize=9)
    plt.xticks(rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dense")
    ap.add_argument("--nm16")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--log-dir", type=Path, default=Path("."))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tp-prompts", type=int, default=500)
    ap.add_argument("--tp-input", type=int, default=512)
    ap.add_argument("--tp-output", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--gpu-mem", type=float, default=0.85)
    ap.add_argument("--profile-tokens", type=int, default=0,
                    help="after the latency runs, profile one generate of this many tokens per batch size "
                         "(0: no profile)")
    ap.add_argument("--profile-steps", type=int, default=16, help="decode iterations recorded per profile")
    ap.add_argument("--profile-dir", type=Path, default=Path("/tmp/nm16_profile"))
    ap.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                    help="vLLM load format: dummy = random weights, no weight files read (config-only folders work; "
                         "nm16 layers get valid random nm16 data)")
    ap.add_argument("--skip-tokenizer-init", action="store_true",
                    help="start vLLM without a tokenizer (prompts are token ids; outputs are not detokenized)")
    ap.add_argument("--tp", type=int, default=1, help="vLLM tensor_parallel_size")
    ap.add_argument("--start-only", action="store_true",
                    help="only start the engine and record startup_s / weights_gib / kv_tokens (no timed runs)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="stop a model's run (the engine's processes too) after this many seconds")
    ap.add_argument("--record-failure", action="store_true",
                    help="a run that fails or times out writes its result (started, error, what it measured) "
                         "instead of stopping with an error")
    ap.add_argument("--commit", help="the commit this tree was copied from (recorded instead of git's answer)")
    ap.add_argument("--label", help="model label stored in the result (e.g. 70b), read by scale_report.py")
    ap.add_argument("--only", choices=("dense", "nm16"), help="benchmark one model; write LOG_DIR/e2e_<name>.json")
    ap.add_argument("--merge", nargs=2, type=Path, metavar=("DENSE_JSON", "NM16_JSON"),
                    help="merge two --only results into --json/--plot")
    # child mode
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--quantization", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.child:
        res = run_one(args)
        args.child_json.write_text(json.dumps(res, indent=2))
        return 0
    args.log_dir.mkdir(parents=True, exist_ok=True)
    if args.only:
        model = args.dense if args.only == "dense" else args.nm16
        if not model:
            ap.error(f"--only {args.only} needs --{args.only}")
        bench_model(model, None if args.only == "dense" else "nm16", args, args.log_dir)
        print(f"wrote {args.log_dir / f'e2e_{args.only}.json'}")
        return 0
    if args.merge:
        dense, nm16 = (json.loads(p.read_text()) for p in args.merge)
        if recorded_settings(dense) != recorded_settings(nm16):
            raise SystemExit(f"error: the two runs used different settings: {recorded_settings(dense)} vs "
                             f"{recorded_settings(nm16)}")
        for k, v in recorded_settings(dense).items():
            setattr(args, k, v)
        env = {"dense": dense.get("env"), "nm16": nm16.get("env"), "merge_argv": sys.argv}
        gpu, vllm_v = (dense.get("env") or {}).get("gpu"), (dense.get("env") or {}).get("vllm")
    else:
        if not (args.dense and args.nm16 and args.json):
            ap.error("--dense, --nm16 and --json are required")
        dense = bench_model(args.dense, None, args, args.log_dir)
        nm16 = bench_model(args.nm16, "nm16", args, args.log_dir)
        env = environment(args.commit)
        gpu, vllm_v = env.get("gpu"), env.get("vllm")
    if not args.json:
        ap.error("--json is required")
    rows = merge(dense, nm16, args)
    result = {"env": env, "settings": settings_of(args), "rows": rows, "dense_raw": dense, "nm16_raw": nm16}
    if dense.get("profile") or nm16.get("profile"):
        # GPU kernel time per decode step by category, side by side (from each run's torch-profiler traces)
        result["profile_us_per_step"] = {
            b: {name: recategorize(run.get("profile", {}).get(str(b)) or {}).get("by_category_us_per_step")
                for name, run in (("dense", dense), ("nm16", nm16))} for b in args.batches}
    args.json.write_text(json.dumps(result, indent=2, default=str))
    if args.plot:
        weights = ", dummy (random) weights" if args.load_format == "dummy" else ""
        plot(rows, args.plot, f"vLLM {vllm_v} on {gpu}: nm16 vs dense{weights}")
    for r in rows:
        print(json.dumps({k: r[k] for k in ("bench", "batch", "dense", "nm16", "unit", "speedup")}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    sys.exit(main())
