"""Kill ``nm16-compress`` at many points, fast: run as ``python tests/compress_kill_driver.py JOB.json RESULT.json``.

The driver imports the compressor (torch, transformers) once and then, for each scenario, forks a child that runs
``offline.cli.compress_main(argv)`` -- the CLI's code, in a process that has done no torch work before the fork -- and
SIGKILLs it either at a named fault point (``NM16_FAULT=kill:<glob>``, see ``offline.faults``) or after a delay. After
each child is reaped it records what is at the output path. A scenario ``{"log": true}`` runs to the end and lists the
fault points it passed, with its duration (the tests pick kill points and delays from it).

JOB: ``{"scenarios": [{"argv": [...], "out": "<output path>", and one of "fault": "kill:<glob>", "delay": seconds,
"delay_frac": fraction of the duration of the last "log" scenario, "log": true; "reset": true to remove a completed
output afterwards}, ...]}``. RESULT: one record per scenario (how the child ended, what is at and next to the output
path).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path


def _digest(out: Path) -> str | None:
    """sha256 over the output's files (but the report, which holds timings); no torch work in the driver."""
    if not out.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(out.iterdir()):
        if f.name != "nm16_report.json":
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _state(out: Path) -> dict:
    return {"out_exists": out.exists(), "out_digest": _digest(out),
            "out_files": sorted(p.name for p in out.iterdir()) if out.is_dir() else [],
            "temporaries": sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))}


def _run(argv: list[str], env: dict, delay: float | None) -> tuple[dict, float]:
    t0 = time.time()
    pid = os.fork()
    if pid == 0:  # child: the CLI, quiet
        try:
            os.environ.update(env)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            from offline import cli

            code = cli.compress_main(argv)
        except BaseException:  # noqa: BLE001
            code = 99
        os._exit(code)
    if delay is not None:
        end = t0 + delay
        while time.time() < end:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.01)
        else:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
    else:
        _, status = os.waitpid(pid, 0)
    rec = {"killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL,
           "rc": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}
    return rec, time.time() - t0


def main(job_path: str, result_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    # Import what the children need before forking, so each child only does the work.
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import offline.api  # noqa: F401
    import offline.compressor  # noqa: F401
    from offline import cli  # noqa: F401

    results = []
    logged = None
    for sc in job["scenarios"]:
        out = Path(sc["out"])
        delay = sc.get("delay")
        if "delay_frac" in sc:
            delay = sc["delay_frac"] * logged
        env = {"NM16_FAULT": sc["fault"]} if "fault" in sc else {}
        log = None
        if sc.get("log"):
            log = Path(tempfile.mkstemp(prefix="nm16-points-")[1])
            env["NM16_FAULT_LOG"] = str(log)
        rec, secs = _run(sc["argv"], env, delay)
        rec.update(scenario={k: v for k, v in sc.items() if k != "argv"}, delay=delay, seconds=round(secs, 3),
                   **_state(out))
        if log is not None:
            rec["points"] = log.read_text().split()
            log.unlink()
            logged = secs
        results.append(rec)
        if sc.get("reset") and out.exists():  # a run that completed: clear the way for the next one
            import shutil

            shutil.rmtree(out)
    Path(result_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
