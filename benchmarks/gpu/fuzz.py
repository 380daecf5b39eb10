"""Kernel fuzz on the GPU host (issue 14 item 5): random layers through every GPU backend vs the float64 reference.

Each case is a random packed layer (on-disk tensors, ``nm16_dev.kernel_testing.random_layer`` on the GPU): N a
multiple of 16 up to 20000, K a multiple of 256 up to 30000 (N * K capped so that one case's dense bf16 weight stays
under ``--max-weight-mb``), M 1-1100 tokens, 8:16 mostly and 2:4 / 4:8 / 16:32, outliers on/off with a random
block B (a multiple of M dividing K) and count k < B, scale / shift / bias on/off, bf16/fp16 checkpoint values and
activations (now and then a bf16 checkpoint served in fp16 or the reverse, values cast at load as the plugin does, or
left bf16 for the kernels' mixed path). Checked per case, each into a NaN-poisoned output:

* ``dispatch``: ``vllm_nm16.kernels.nm16_linear(..., allow_gluon=True)`` -- the ``gluon`` backend's per-call choice
  (Gluon fragment kernel / Triton gemv or tile-decode / decode-to-scratch + cuBLAS, by M and layer size);
* ``triton``: ``allow_gluon=False`` -- the ``triton`` backend;
* ``gluon``: the Gluon kernel forced (``config={"kernel": "gluon"}``) at any M, where it can run (8:16, values in
  the activation dtype, N % 16 == 0, K % 32 == 0).

Weights go through ``backends.BACKENDS[...].process_weights`` as in the plugin. The reference is
``reference_linear`` of the ON-DISK tensors in float64 on the GPU. A check fails when the output is not finite, the
call raises, or the relative Frobenius error exceeds the bound of the output dtype (tests/kernel_cases.py: 1e-2 bf16,
2e-3 fp16).

The cases run in ``--workers`` subprocesses sharing the GPU (the Triton/Gluon compiles of random shapes, outlier
budgets and flags dominate the run; they spread over the CPU cores), fed one case at a time; a worker that dies (a
CUDA fault poisons its context) or passes ``--case-timeout`` is restarted and its case recorded as a failure. At
``--time-budget`` no new case starts (a minute later the workers are killed); cases not finished are reported as
``not_run`` (and the exit code is 1, as for a mismatch).

    python3 benchmarks/gpu/fuzz.py --out benchmarks/results/fuzz_h200.json      # GPU host, ~8 min
    python3 benchmarks/gpu/fuzz.py --dry-run                                     # anywhere: list the cases
    python3 benchmarks/gpu/fuzz.py --only 17,203 --workers 0                     # replay cases in this process

Prints one line per failing check and a summary line; writes ``--out`` (keys ``cases``, ``mismatches``,
``max_rel_err`` and ``tolerance`` per dtype, ``seed``, ``command``, ``rows`` ...).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import commit_record  # noqa: E402  (benchmarks/common.py: no heavy imports)
TOLERANCE = {"bfloat16": 1e-2, "float16": 2e-3}   # = tests/kernel_cases.py REL_ERR_BOUND / REL_ERR_BOUND_FP16
PATTERNS = ((8, 16), (2, 4), (4, 8), (16, 32))
N_MAX, K_MAX, M_MAX = 20000, 30000, 1100
RESULT = "FUZZ_RESULT "
HARD_STOP_GRACE_S = 60  # after --time-budget, cases still running get this long, then the workers are killed
MAX_RESTARTS = 20  # worker restarts (deaths, timeouts) after which the run stops


# ------------------------------------------------------------------------------------------------------- the cases
def _loguniform_int(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))))))


def _outliers(rng: np.random.Generator, m: int, K: int) -> tuple[int | None, int]:
    """(B, k): B a multiple of m dividing K (at most 32768, the format's limit), k in 1..B-1. Mostly the budgets a
    checkpoint uses (B 64..512, k <= 16: fewer distinct compiles), else any the format allows."""
    if rng.random() < 0.4:
        return None, 0
    blocks = [b for b in range(m, min(K, 32768) + 1, m) if K % b == 0]
    common = [b for b in blocks if b in (64, 128, 192, 256, 512)]
    B = int(rng.choice(common)) if common and rng.random() < 0.7 else int(rng.choice(blocks))
    small = [k for k in (1, 2, 3, 4, 8, 16) if k < B]
    k = int(rng.choice(small)) if rng.random() < 0.7 else _loguniform_int(rng, 1, B - 1)
    return B, k


def make_cases(seed: int, count: int, max_weights: int) -> list[dict]:
    """``count`` cases from ``seed`` (numpy only: the same list on any machine). The first four are corners: the
    largest N and the largest K under the cap, the smallest layer at M = 1 and at M = 1100."""
    rng = np.random.default_rng(seed)
    n_top, k_top = N_MAX // 16 * 16, K_MAX // 256 * 256
    corners = [(n_top, max_weights // n_top // 256 * 256, None), (max_weights // k_top // 16 * 16, k_top, None),
               (16, 256, 1), (16, 256, M_MAX)]
    cases = []
    for i in range(count):
        n, m = PATTERNS[0] if rng.random() < 0.7 else PATTERNS[int(rng.integers(1, len(PATTERNS)))]
        if i < len(corners):
            N, K, M = corners[i]
        else:
            while True:
                N = 16 * _loguniform_int(rng, 1, N_MAX // 16)
                K = 256 * _loguniform_int(rng, 1, K_MAX // 256)
                if N * K <= max_weights:
                    break
            M = None
        if M is None:
            M = int(rng.integers(1, 41)) if rng.random() < 0.4 else _loguniform_int(rng, 1, M_MAX)
        B, k = _outliers(rng, m, K)
        wdtype = str(rng.choice(list(TOLERANCE)))
        xdtype, cast = wdtype, True
        if rng.random() < 0.15:  # checkpoint dtype != serving dtype
            xdtype = "float16" if wdtype == "bfloat16" else "bfloat16"
            # the plugin casts values to the activation dtype at load; bf16 values with fp16 x is also a kernel path
            cast = wdtype == "float16" or bool(rng.random() < 0.5)
        cases.append({"idx": i, "n": n, "m": m, "N": N, "K": K, "M": M, "B": B, "k": k,
                      "scale": bool(rng.random() < 0.5), "shift": bool(rng.random() < 0.5),
                      "bias": bool(rng.random() < 0.5), "wdtype": wdtype, "xdtype": xdtype, "cast_at_load": cast,
                      "seed": int(rng.integers(0, 2**31 - 1))})
    return cases


def weight_mb(c: dict) -> float:
    """Packed bytes of the case's layer (values + mask + outliers) in MB."""
    b = c["N"] * c["K"] * c["n"] // c["m"] * 2 + c["N"] * c["K"] // 8
    if c["k"]:
        b += c["N"] * c["K"] // c["B"] * c["k"] * (2 + (1 if c["B"] <= 256 else 2))
    return b / 1e6


# ------------------------------------------------------------------------------------------------ one case (GPU)
def run_case(c: dict, device: str = "cuda") -> dict:
    import torch

    from nm16_dev.kernel_testing import layer_args, random_layer, reference_linear
    from vllm_nm16 import backends, kernels
    from vllm_nm16 import format as fmt
    from vllm_nm16.kernels import gluon_nm16

    t0 = time.time()
    dev = torch.device(device)
    wdt, xdt = getattr(torch, c["wdtype"]), getattr(torch, c["xdtype"])
    n, m, N, K, M, B, k = (c[key] for key in ("n", "m", "N", "K", "M", "B", "k"))
    g = torch.Generator(device=dev).manual_seed(c["seed"])
    t = random_layer(N, K, n=n, m=m, outlier_block=B, outliers_per_block=k, scale=c["scale"], shift=c["shift"],
                     dtype=wdt, device=dev, generator=g)
    v, mk, ov, oi, sc, sh = layer_args(t)
    x = torch.randn(M, K, device=dev, generator=g).to(xdt)
    bias = torch.randn(N, device=dev, generator=g).to(xdt) if c["bias"] else None
    ref = reference_linear(x, v, mk, ov, oi, sc, sh, bias, n=n, m=m, outlier_block=B, outliers_per_block=k)
    ref_norm = float(ref.norm())
    spec = fmt.NM16Spec(n=n, m=m, outlier_block=B, outliers_per_block=k, has_scale=c["scale"], has_shift=c["shift"])
    geom = backends.LayerGeometry.from_spec(spec, in_features=K, out_features=N, act_dtype=xdt)
    lv, lov = v, ov
    if c["cast_at_load"]:  # linear.py: checkpoint values are cast to the activation dtype on load
        lv = v.to(xdt)
        lov = ov.to(xdt) if ov is not None else None
    row = dict(c, checks={})

    def check(name: str, w: dict, **kw) -> None:
        y = torch.full((M, N), float("nan"), dtype=xdt, device=dev)
        r: dict = {}
        try:
            if "config" not in kw:
                r["kernel"] = kernels.choose_config(x, w["values"], w["positions"], n=n, m=m, out_features=N,
                                                    outlier_block=B, allow_gluon=kw["allow_gluon"])["kernel"]
            else:
                r["kernel"] = kw["config"]["kernel"]
            kernels.nm16_linear(x, w["values"], w["positions"], w["outlier_values"], w["outlier_index"], w["scale"],
                                w["shift"], bias, n=n, m=m, outlier_block=B, outliers_per_block=k, in_features=K,
                                out_features=N, out=y, **kw)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            r["finite"] = bool(torch.isfinite(y).all())
            r["rel_err"] = float((y.double() - ref).norm()) / ref_norm if r["finite"] else None
        except Exception as e:  # noqa: BLE001  (recorded: a raising backend is a failed check)
            r["error"] = f"{type(e).__name__}: {str(e)[:1000]}"
        r["ok"] = "error" not in r and r["finite"] and r["rel_err"] <= TOLERANCE[c["xdtype"]]
        row["checks"][name] = r

    w_gl = backends.BACKENDS["gluon"].process_weights(geom, lv, mk, lov, oi, sc, sh)
    check("dispatch", w_gl, allow_gluon=True)
    w_tr = backends.BACKENDS["triton"].process_weights(geom, lv, mk, lov, oi, sc, sh)
    check("triton", w_tr, allow_gluon=False)
    ok, why = gluon_nm16.can_implement(min(M, gluon_nm16.MAX_M), N, K, n, m, x, w_gl["values"], w_gl["positions"])
    if ok:
        check("gluon", w_gl, config={"kernel": "gluon"})
    else:
        row["gluon_skipped"] = why
    row["time_s"] = round(time.time() - t0, 3)
    del t, v, mk, ov, oi, x, ref, w_gl, w_tr, lv, lov
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def worker_main(device: str) -> None:
    """Read one case (JSON) per stdin line, print one result line per case."""
    import torch

    from vllm_nm16 import kernels

    if device == "cuda":
        kernels.prepare_device(torch.device(device))
    print("FUZZ_READY", flush=True)
    for line in sys.stdin:
        c = json.loads(line)
        try:
            row = run_case(c, device)
        except Exception as e:  # noqa: BLE001  (e.g. out of memory while making the layer)
            row = dict(c, checks={}, error=f"{type(e).__name__}: {str(e)[:1000]}")
        print(RESULT + json.dumps(row), flush=True)


# ------------------------------------------------------------------------------------------------ the worker pool
class Worker:
    def __init__(self, wid: int, logdir: Path, env: dict, device: str) -> None:
        self.wid, self.logdir, self.env, self.restarts, self.device = wid, logdir, env, 0, device
        self.case: dict | None = None
        self.started = 0.0
        self._start()

    def _start(self) -> None:
        self.log = self.logdir / f"worker{self.wid}.{self.restarts}.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--device", self.device]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log, "w"),
                                     text=True, env=self.env, cwd=ROOT)

    def restart(self) -> None:
        self.kill()
        self.restarts += 1
        self._start()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    def run(self, c: dict) -> dict | None:
        """Send one case; its result row, or None if the worker died (or was killed by the watchdog)."""
        self.case, self.started = c, time.time()
        try:
            self.proc.stdin.write(json.dumps(c) + "\n")
            self.proc.stdin.flush()
            for line in self.proc.stdout:
                if line.startswith(RESULT):
                    return json.loads(line[len(RESULT):])
        except (BrokenPipeError, OSError):
            pass
        finally:
            self.case = None
        return None


def run_pool(cases: list[dict], workers: int, time_budget: float, case_timeout: float,
             device: str) -> tuple[list[dict], list]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    logdir = Path(tempfile.mkdtemp(prefix="nm16_fuzz_"))
    deadline = time.time() + time_budget
    queue = list(reversed(cases))
    rows: list[dict] = []
    lock = threading.Lock()
    pool = [Worker(i, logdir, env, device) for i in range(workers)]
    stop = threading.Event()

    def feed(w: Worker) -> None:
        while not stop.is_set():
            with lock:
                if not queue or time.time() > deadline:
                    return
                c = queue.pop()
            row = w.run(c)
            if row is None and stop.is_set():  # killed at the hard stop: not a result, the case counts as not run
                return
            if row is None:  # died or killed: the case is a failure, start a fresh worker for the rest
                try:
                    rc = w.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    rc = None
                why = "timeout" if time.time() - w.started > case_timeout else f"worker died (rc {rc})"
                row = dict(c, checks={}, error=f"{why}: {w.log_tail()}")
                with lock:
                    if sum(x.restarts for x in pool) >= MAX_RESTARTS:  # broken setup (no GPU, import error...)
                        stop.set()
                if not stop.is_set():
                    w.restart()
            with lock:
                rows.append(row)
                report(row)

    threads = [threading.Thread(target=feed, args=(w,), daemon=True) for w in pool]
    for th in threads:
        th.start()
    while any(th.is_alive() for th in threads):
        time.sleep(1.0)
        now = time.time()
        for w in pool:
            if w.case is not None and now - w.started > case_timeout:
                w.kill()  # the feeding thread sees EOF, records a timeout and restarts the worker
        if now > deadline + HARD_STOP_GRACE_S:
            stop.set()
            for w in pool:
                w.kill()
            break
    for th in threads:
        th.join(timeout=10)
    for w in pool:
        if w.proc.stdin:
            try:
                w.proc.stdin.close()
            except OSError:
                pass
        w.kill()
    done = {r["idx"] for r in rows}
    return rows, [c["idx"] for c in cases if c["idx"] not in done]


# ------------------------------------------------------------------------------------------------------- reporting
def failures(row: dict) -> list[str]:
    out = []
    if "error" in row:
        out.append(f"case: {row['error'][:300]}")
    for name, r in row["checks"].items():
        if not r["ok"]:
            out.append(f"{name} ({r.get('kernel')}): " + (r["error"][:300] if "error" in r else
                                                          f"finite={r['finite']} rel_err={r['rel_err']}"))
    return out


def describe(c: dict) -> str:
    out = f"B={c['B']} k={c['k']}" if c["k"] else "no outliers"
    flags = "".join(f for f, on in (("s", c["scale"]), ("h", c["shift"]), ("b", c["bias"])) if on) or "-"
    dt = c["wdtype"] if c["wdtype"] == c["xdtype"] else \
        f"{c['wdtype']}>{c['xdtype']}{'' if c['cast_at_load'] else ' (no cast)'}"
    return f"#{c['idx']} {c['n']}:{c['m']} N={c['N']} K={c['K']} M={c['M']} {out} {flags} {dt}"


def report(row: dict) -> None:
    for f in failures(row):
        print(f"MISMATCH {describe(row)}: {f}", flush=True)


def summarize(rows: list[dict], not_run: list[int], args, wall_s: float, env_info: dict) -> dict:
    rows = sorted(rows, key=lambda r: r["idx"])
    checks = [(r, name, ch) for r in rows for name, ch in r["checks"].items()]
    mismatches = [{"idx": r["idx"], "case": describe(r), "what": f} for r in rows for f in failures(r)]
    max_err: dict[str, float | None] = {d: None for d in TOLERANCE}
    by_backend: dict[str, float] = {}
    for r, name, ch in checks:
        e = ch.get("rel_err")
        if e is not None:
            d = r["xdtype"]
            max_err[d] = e if max_err[d] is None else max(max_err[d], e)
            by_backend[name] = max(by_backend.get(name, 0.0), e)
    worst = max((ch["rel_err"] / TOLERANCE[r["xdtype"]] for r, _, ch in checks if ch.get("rel_err") is not None),
                default=None)
    return {
        "cases": len(rows),
        "cases_planned": args.cases if not args.only else len(args.only),
        "not_run": not_run,
        "checks": len(checks),
        "checks_by_backend": dict(Counter(name for _, name, _ in checks)),
        "kernels": dict(Counter(f"{name}:{ch.get('kernel')}" for _, name, ch in checks)),
        "mismatches": len(mismatches),
        "mismatch_list": mismatches,
        "max_rel_err": max_err,
        "max_rel_err_by_backend": by_backend,
        "max_err_over_tolerance": worst,
        "tolerance": TOLERANCE,
        "seed": args.seed,
        "max_weight_mb": args.max_weight_mb,
        "workers": args.workers,
        "wall_s": round(wall_s, 1),
        "command": "python3 " + " ".join(sys.argv),
        **commit_record(args.commit),
        **env_info,
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=500)
    ap.add_argument("--commit", help="record this commit instead of asking git (a tree copied without its history)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-weight-mb", type=float, default=600.0,
                    help="cap on a case's dense bf16 weight (N * K * 2 bytes), in MB")
    ap.add_argument("--workers", type=int, default=8, help="GPU worker processes (0: run in this process)")
    ap.add_argument("--time-budget", type=float, default=420.0,
                    help=f"seconds after which no new case starts (running ones get {HARD_STOP_GRACE_S} s more)")
    ap.add_argument("--case-timeout", type=float, default=180.0, help="seconds one case may take (compiles included)")
    ap.add_argument("--only", type=lambda s: [int(i) for i in s.split(",")], default=None,
                    help="comma-separated case indices to run (replay)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fuzz_h200.json"))
    ap.add_argument("--dry-run", action="store_true", help="list the cases, run nothing (no GPU needed)")
    ap.add_argument("--device", default="cuda",
                    help="torch device (cpu + TRITON_INTERPRET=1: a plumbing check of the Triton paths on tiny cases)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args.device)

    cases = make_cases(args.seed, args.cases, int(args.max_weight_mb * 1e6 / 2))
    if args.only:
        cases = [c for c in cases if c["idx"] in set(args.only)]
    if args.dry_run:
        for c in cases:
            print(f"{describe(c)}  ({weight_mb(c):.0f} MB packed)")
        pat = Counter(f"{c['n']}:{c['m']}" for c in cases)
        gl = sum(1 for c in cases if (c["n"], c["m"]) == (8, 16) and (c["cast_at_load"] or c["wdtype"] == c["xdtype"]))
        print(f"dry run: {len(cases)} cases, patterns {dict(pat)}, outliers {sum(c['k'] > 0 for c in cases)}, "
              f"M <= 32: {sum(c['M'] <= 32 for c in cases)}, M > 256: {sum(c['M'] > 256 for c in cases)}, "
              f"mixed dtypes {sum(c['wdtype'] != c['xdtype'] for c in cases)}, gluon-forced checks {gl}, "
              f"max N*K {max(c['N'] * c['K'] for c in cases) / 1e6:.0f}M, "
              f"max packed weights {max(weight_mb(c) for c in cases):.0f} MB, "
              f"K % 1024 != 0: {sum(c['K'] % 1024 != 0 for c in cases)}")
        return None

    import torch
    import triton

    env_info = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
                "torch": torch.__version__, "triton": triton.__version__}
    t0 = time.time()
    if args.workers == 0:
        sys.path.insert(0, str(ROOT))
        from vllm_nm16 import kernels

        if args.device == "cuda":
            kernels.prepare_device(torch.device("cuda"))
        rows, not_run = [], []
        for c in cases:
            if time.time() - t0 > args.time_budget:
                not_run.append(c["idx"])
                continue
            rows.append(run_case(c, args.device))
            report(rows[-1])
    else:
        rows, not_run = run_pool(cases, args.workers, args.time_budget, args.case_timeout, args.device)
    res = summarize(rows, not_run, args, time.time() - t0, env_info)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    fmt_err = lambda e: "n/a" if e is None else f"{e:.2e}"  # noqa: E731
    print(f"fuzz: {res['cases']}/{res['cases_planned']} cases ({res['checks']} checks: "
          f"{', '.join(f'{k} {v}' for k, v in res['checks_by_backend'].items())}), {res['mismatches']} mismatches, "
          f"max rel err " + ", ".join(f"{d} {fmt_err(e)} (tol {TOLERANCE[d]:g})" for d, e in res["max_rel_err"].items())
          + f", not run {len(not_run)}, {res['wall_s']} s, seed {args.seed} -> {args.out}", flush=True)
    sys.exit(1 if res["mismatches"] or not_run else 0)


if __name__ == "__main__":
    main()
