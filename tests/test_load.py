"""The load test in small (issue 14): ``benchmarks/load_test.py`` against ``vllm serve`` of a tiny nm16 checkpoint on
the CPU build (eager mode, fp32): after a warm-up round, two identical rounds of 40 mixed requests at concurrency 8
(chat/completions, streaming or not, prompts of 1-400 tokens, max_tokens 1-64, temperature 0 and 0.8 with a seed, some
n=2, some cancelled mid-stream) while bad requests are sent. Required: no failed request, every greedy answer identical
to the same request sent alone and to the first round's, each bad request a 4xx, a client disconnecting mid-stream
harmless, the server healthy afterwards, its memory growth bounded (over the whole run, and - the steady state -
between the end of the first round and the end of the second), and a clean stop. About 100 s on 2 CPU cores (most of
it: vLLM's start)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.ckpt_factory import nm16_checkpoint

ROOT = Path(__file__).resolve().parent.parent
RSS_GROWTH_MB = 300  # bound on the server group's memory growth from after the warm-up to the end (measured: +7 MiB)
RSS_STEADY_MB = 64  # bound on its growth between the end of round 1 and the end of round 2 (measured: +0.3 MiB)


def test_load_small(make_llama, eval_text, tmp_path):
    src = make_llama(hidden=128, intermediate=256, layers=1, heads=2, kv_heads=2, seed=4)
    ckpt = nm16_checkpoint(src, "load", outlier_block=32, outliers_per_block=2, has_scale=True, root=tmp_path)
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_test.py"), "--model", str(ckpt),
                           "--requests", "40", "--concurrency", "8", "--rounds", "2", "--enforce-eager",
                           "--dtype", "float32",
                           "--text", str(eval_text), "--time-limit", "600", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
    res = json.loads(out.read_text())
    print(json.dumps({k: v for k, v in res.items() if k not in ("config", "failure_details", "mismatch_details")}))
    assert res["requests"] == 40 and res["rounds"] == 2 and res["failures"] == 0, res["failure_details"]
    assert res["warmup_requests"] == 16 and res["warmup_failures"] == 0
    assert res["cancelled"] >= 1
    assert res["greedy_checked"] >= 10 and res["greedy_mismatches"] == 0, res["mismatch_details"]
    assert res["healthy_after"]
    bad = res["bad_requests"]
    assert bad.pop("disconnect_mid_stream") == 200
    assert bad and all(400 <= s < 500 for s in bad.values()), bad
    assert res["greedy_round_mismatches"] == 0, res["round_mismatch_details"]
    assert res["rss_mb_after"] - res["rss_mb_before"] < RSS_GROWTH_MB, res
    assert len(res["rss_mb_rounds"]) == 2 and res["rss_growth_between_rounds_mb"] < RSS_STEADY_MB, res
    assert res["p50_s"] > 0 and res["tokens_per_s"] > 0
    assert res["server_exit_code"] in (0, -2, 130) and res["server_leftover_pids"] == [], res
