"""Greedy tokens of an nm16 checkpoint with tensor parallelism vs without (issue 12 item 3): TP=1 and TP=N engines,
each in a fresh process, the same prompts, fp32 by default; writes which prompts match token for token and, where
they differ, the first differing step with the runner-up logprob gap (in fp32 the all-reduce only changes the
summation order, so a near-tie is the only honest way to differ).

    python benchmarks/gpu/tp_greedy.py CKPT --tp 2 --out OUT.json                  # GPU host with >= 2 GPUs
    VLLM_CPU_OMP_THREADS_BIND="0|1" python benchmarks/gpu/tp_greedy.py CKPT --tp 2 --enforce-eager --out OUT.json

Exit code 0 when every prompt matches, 1 otherwise (2 when an engine failed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import commit_record  # noqa: E402  (benchmarks/common.py: no heavy imports)
from smollm_check import PROMPTS  # noqa: E402  (beside this file; the same prompts as the single-GPU check)


def child(spec_path: str, out_path: str) -> None:
    """One engine (in its own process: CUDA must not be initialised before vLLM starts its workers)."""
    from vllm import SamplingParams

    from vllm_nm16.engine import open_llm

    spec = json.loads(Path(spec_path).read_text())
    t0 = time.time()
    with open_llm(**spec["engine"]) as llm:
        start_s = time.time() - t0
        outs = llm.generate(spec["prompts"], SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"],
                                                            ignore_eos=True, logprobs=2), use_tqdm=False)
        res = {"start_s": round(start_s, 1),
               "tokens": [list(o.outputs[0].token_ids) for o in outs],
               "logprobs": [[{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]
                            for o in outs]}
    Path(out_path).write_text(json.dumps(res))


def first_difference(a: list[int], b: list[int], lp_a: list[dict]) -> dict | None:
    """Where two greedy sequences part, with how close the reference's top two candidates were there."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            top = sorted(lp_a[i].values(), reverse=True)
            return {"step": i, "tp1_token": x, "tpn_token": y,
                    "tp1_top2_gap": (top[0] - top[1]) if len(top) > 1 else None}
    return None if len(a) == len(b) else {"step": min(len(a), len(b)), "length_differs": True}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--gpu-mem", type=float, default=0.3, help="gpu_memory_utilization (GPU only)")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--commit", help="record this commit instead of asking git (a tree copied without its history)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return 0
    if not (args.ckpt / "config.json").is_file():
        ap.error(f"{args.ckpt}: no config.json (an nm16 checkpoint folder is expected)")
    if args.tp < 2:
        ap.error("--tp must be >= 2 (TP=1 is the reference)")
    import torch

    on_gpu = torch.cuda.is_available()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"ckpt": str(args.ckpt), "tp": args.tp, "dtype": args.dtype, "prompts": PROMPTS,
                    "max_tokens": args.max_tokens, "command": "python3 " + " ".join(sys.argv),
                    **commit_record(args.commit)}
    runs = {}
    for tp in (1, args.tp):
        engine = {"model": str(args.ckpt), "quantization": "nm16", "dtype": args.dtype, "seed": 0,
                  "max_model_len": args.max_model_len, "tensor_parallel_size": tp,
                  "enforce_eager": args.enforce_eager}
        if on_gpu:
            engine["gpu_memory_utilization"] = args.gpu_mem
        if tp > 1:
            engine["distributed_executor_backend"] = "mp"
        spec = args.out.with_name(f"{args.out.stem}_tp{tp}_spec.json")
        res_file = args.out.with_name(f"{args.out.stem}_tp{tp}.json")
        spec.write_text(json.dumps({"engine": engine, "prompts": PROMPTS, "max_tokens": args.max_tokens}))
        res_file.unlink(missing_ok=True)
        with open(args.out.with_name(f"{args.out.stem}_tp{tp}.log"), "w") as log:
            rc = subprocess.run([sys.executable, __file__, str(args.ckpt), "--out", str(args.out), "--child",
                                 str(spec), str(res_file)], stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ)).returncode
        report[f"tp{tp}_rc"] = rc
        if not res_file.is_file():  # the results file is the verdict (an abort at exit after it is recorded)
            report["error"] = f"TP={tp} engine failed (rc {rc}); see {args.out.stem}_tp{tp}.log"
            args.out.write_text(json.dumps(report, indent=2))
            print(report["error"], file=sys.stderr)
            return 2
        runs[tp] = json.loads(res_file.read_text())
        report[f"tp{tp}_start_s"] = runs[tp]["start_s"]
    a, b = runs[1], runs[args.tp]
    report["equal"] = [x == y for x, y in zip(a["tokens"], b["tokens"])]
    report["first_difference"] = [first_difference(x, y, lp) for x, y, lp in zip(a["tokens"], b["tokens"],
                                                                                a["logprobs"])]
    report["tokens_tp1"], report[f"tokens_tp{args.tp}"] = a["tokens"], b["tokens"]
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("tp", "dtype", "equal", "first_difference")}, indent=1))
    return 0 if all(report["equal"]) else 1


if __name__ == "__main__":
    sys.exit(main())
