"""Issue 12 (scale) tooling on the CPU, no vLLM engine: ``benchmarks/scale_report.py`` merges synthetic raw results
correctly (and refuses what it must), the vLLM log readers of ``benchmarks/common.py``, ``bench_e2e.run_child``'s
timeout (the child's whole process group goes), and the 70B preset + synthetic tokenizer of the config-only folders.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_e2e  # noqa: E402
import common  # noqa: E402
import scale_report  # noqa: E402

SETTINGS_70B = {"batches": [1, 16, 64], "input_len": 128, "output_len": 128, "iters": 2, "warmup": 1,
                "tp_prompts": 200, "tp_input": 512, "tp_output": 128, "max_model_len": 1024, "gpu_mem": 0.85,
                "load_format": "dummy", "skip_tokenizer_init": True, "tp": 1}
ENV = {"argv": ["benchmarks/bench_e2e.py", "--only", "nm16"], "gpu": "NVIDIA H200", "vllm": "0.26.0", "commit": None}

LOG_026 = """\
(EngineCore pid=1265) INFO 12-01 12:16:10 [model_runner.py:305] Model loading took 9.61 GiB and 4.550965 seconds
(EngineCore pid=1265) INFO 12-01 12:16:39 [kv_cache_utils.py:2177] GPU KV cache size: 878,304 tokens
"""
FAILED_LOG = """\
(EngineCore pid=77) INFO 12-01 13:00:00 [model_runner.py:305] Model loading took 131.42 GiB and 20.1 seconds
(EngineCore pid=77) ERROR 12-01 13:01:00 [core.py:1000] EngineCore failed to start.
(EngineCore pid=77) ERROR 12-01 13:01:00 [core.py:1000] Traceback (most recent call last):
(EngineCore pid=77) ERROR 12-01 13:01:00 [core.py:1000]     raise ValueError(
(EngineCore pid=77) ERROR 12-01 13:01:00 [core.py:1000] ValueError: No available memory for the cache blocks. Try \
increasing `gpu_memory_utilization` when initializing the engine.
Process EngineCore:
Traceback (most recent call last):
ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when initializing the \
engine.
Traceback (most recent call last):
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _nm16_70b() -> dict:
    return {"model": "/tmp/llama70b-nm16-cfg", "quantization": "nm16", "startup_s": 190.0, "complete": True,
            "latency": {"1": {"median_s": 4.0}, "16": {"median_s": 8.0}, "64": {"median_s": 20.0}},
            "throughput": {"output_tokens_per_s": 1234.5, "total_tokens_per_s": 6000.0}, "started": True,
            "weights_gib": 79.3, "kv_tokens": 115_000, "label": "70b", "settings": SETTINGS_70B,
            "env": {**ENV, "commit": "a" * 40}}


def _dense_70b_failed() -> dict:
    return {"model": "/tmp/llama70b-cfg", "quantization": None, "started": False, "complete": False,
            "weights_gib": 131.42, "kv_tokens": None, "label": "70b", "returncode": 1, "timed_out": False,
            "error": "ValueError: No available memory for the cache blocks.", "start_only": True,
            "settings": SETTINGS_70B, "env": ENV}


def _merged_8b() -> dict:
    st = {k: v for k, v in SETTINGS_70B.items() if k != "tp"}  # recorded before the tp setting existed
    st.update(output_len=256, iters=3, tp_prompts=500)

    def raw(q, lat, thr, gib):
        return {"model": "/tmp/llama8b-cfg", "quantization": q, "startup_s": 70.0, "weights_gib": gib,
                "latency": {str(b): {"median_s": s} for b, s in zip((1, 16, 64), lat)},
                "throughput": {"output_tokens_per_s": thr}, "settings": st}

    return {"env": {"dense": {**ENV, "argv": ["bench_e2e.py", "--only", "dense"]}, "nm16": ENV}, "settings": st,
            "rows": [], "dense_raw": raw(None, (1.28, 1.38, 1.77), 6814.0, 14.96),
            "nm16_raw": raw("nm16", (1.27, 2.28, 4.59), 5306.0, 9.61)}


def _serve() -> dict:
    return {"kind": "serve", "label": "70b", "engine": "nm16", "tp": 1, "started": True, "ready_s": 200.0,
            "weights_gib": 79.3, "kv_tokens": 110_000,
            "chat": {"content": " w5 w77", "usage": {"completion_tokens": 32}},
            "chat_answered": True, "completion_answered": True, "cmd": "vllm serve /tmp/llama70b-nm16-cfg ..."}


@pytest.fixture
def raw(tmp_path):
    d = tmp_path / "raw"
    _write(d / "70b_nm16_tp1" / "e2e_nm16.json", _nm16_70b())
    _write(d / "70b_dense_tp1_gm0.85" / "e2e_dense.json", _dense_70b_failed())
    _write(d / "serve" / "serve_70b_nm16_tp1.json", _serve())
    (d / "70b_nm16_tp1" / "e2e_nm16.log").write_text("not json")
    e2e = _write(tmp_path / "e2e_h200.json", _merged_8b())
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "e2e_nm16.log").write_text(LOG_026)
    (logs / "e2e_dense.log").write_text(LOG_026.replace("878,304", "1,234,567"))
    return d, e2e, logs


def _report(tmp_path, *args) -> dict:
    out = tmp_path / "scale.json"
    assert scale_report.main([*map(str, args), "--json", str(out), "--commit", "b" * 40]) == 0
    return json.loads(out.read_text())


def _row(report, model, engine, bench, batch=None, tp=1):
    hits = [r for r in report["rows"] if (r["model"], r["engine"], r["bench"], r["tp"]) == (model, engine, bench, tp)
            and (batch is None or r["batch"] == batch)]
    assert len(hits) == 1, (model, engine, bench, batch, hits)
    return hits[0]


def test_merge_rows(tmp_path, raw):
    d, e2e, logs = raw
    rep = _report(tmp_path, d, "--e2e-8b", e2e, "--e2e-8b-logs", logs, "--e2e-8b-commit", "c" * 40)
    # 70B nm16: tokens/s = batch x output_len / median; throughput = output tokens/s; figures carried
    for b, med in ((1, 4.0), (16, 8.0), (64, 20.0)):
        r = _row(rep, "70b", "nm16", "latency", b)
        assert r["tokens_per_s"] == pytest.approx(b * 128 / med) and r["tokens_per_s_per_gpu"] == r["tokens_per_s"]
        assert (r["gpus"], r["weights_gib"], r["kv_tokens"], r["started"], r["error"]) == (1, 79.3, 115_000, True,
                                                                                            None)
        assert r["commit"] == "a" * 40  # recorded by the run itself wins over --commit
        assert r["command"].startswith("python3 benchmarks/bench_e2e.py")
    t = _row(rep, "70b", "nm16", "throughput")
    assert (t["batch"], t["tokens_per_s"]) == (200, 1234.5)
    # dense 70B did not start: one startup row, its error, no speed, no made-up latency rows
    s = _row(rep, "70b", "dense", "startup")
    assert (s["started"], s["tokens_per_s"], s["weights_gib"], s["gpu_mem"]) == (False, None, 131.42, 0.85)
    assert "No available memory" in s["error"] and s["commit"] == "b" * 40
    assert not [r for r in rep["rows"] if r["model"] == "70b" and r["engine"] == "dense" and r["bench"] != "startup"]
    # 8B TP=1 from the merged file: engines not swapped, its own output length, KV tokens from its logs, its commit
    assert _row(rep, "8b", "dense", "latency", 64)["tokens_per_s"] == pytest.approx(64 * 256 / 1.77)
    assert _row(rep, "8b", "nm16", "latency", 64)["tokens_per_s"] == pytest.approx(64 * 256 / 4.59)
    assert _row(rep, "8b", "nm16", "throughput")["tokens_per_s"] == 5306.0
    assert _row(rep, "8b", "dense", "throughput")["batch"] == 500
    assert _row(rep, "8b", "nm16", "latency", 1)["kv_tokens"] == 878_304
    assert _row(rep, "8b", "dense", "latency", 1)["kv_tokens"] == 1_234_567
    assert _row(rep, "8b", "dense", "latency", 1)["weights_gib"] == 14.96
    assert {r["commit"] for r in rep["rows"] if r["model"] == "8b"} == {"c" * 40}
    assert len(rep["rows"]) == 4 + 1 + 4 + 4
    # TP=2 was not run: no row says otherwise, the plan lists it as not measured
    assert all(r["tp"] == 1 and r["gpus"] == 1 for r in rep["rows"])
    assert {(m["model"], m["engine"], m["tp"]) for m in rep["not_measured"]} == {
        ("70b", "dense", 2), ("8b", "nm16", 2), ("8b", "dense", 2)}
    (sv,) = rep["serve"]
    assert (sv["model"], sv["engine"], sv["started"], sv["chat_answered"], sv["chat"]) == ("70b", "nm16", True, True,
                                                                                            " w5 w77")


def test_merge_without_8b_and_partial_run(tmp_path):
    run = _nm16_70b()
    run.update(complete=False, throughput={}, error="timed out after 510 s")
    del run["latency"]["64"]
    p = _write(tmp_path / "e2e_nm16.json", run)
    rep = _report(tmp_path, p)
    assert [(r["bench"], r["batch"]) for r in rep["rows"]] == [("latency", 1), ("latency", 16)]
    assert all(r["error"] == "timed out after 510 s" and not r["complete"] for r in rep["rows"])
    assert not any(r["model"] == "8b" for r in rep["rows"])
    # started but nothing measured (e.g. --start-only): one startup row, started true
    only = {**_nm16_70b(), "latency": {}, "throughput": {}, "start_only": True}
    rep = _report(tmp_path, _write(tmp_path / "o" / "e2e_nm16.json", only))
    (r,) = rep["rows"]
    assert (r["bench"], r["started"], r["kv_tokens"], r["startup_s"]) == ("startup", True, 115_000, 190.0)


def test_commit_of_overrides_what_a_file_says(tmp_path, raw):
    d, _, _ = raw
    nm16, serve = d / "70b_nm16_tp1" / "e2e_nm16.json", d / "serve" / "serve_70b_nm16_tp1.json"
    rep = _report(tmp_path, d, "--commit-of", f"{nm16}=" + "d" * 40, "--commit-of", f"{serve}=" + "e" * 40)
    assert {r["commit"] for r in rep["rows"] if r["engine"] == "nm16"} == {"d" * 40}  # over the file's own "a" * 40
    assert _row(rep, "70b", "dense", "startup")["commit"] == "b" * 40                 # --commit where not named
    assert rep["serve"][0]["commit"] == "e" * 40
    with pytest.raises(SystemExit, match="FILE=SHA"):
        _report(tmp_path, d, "--commit-of", f"{tmp_path / 'nope.json'}=" + "d" * 40)


def test_refuses_duplicates_and_unlabelled(tmp_path, raw):
    d, e2e, _ = raw
    with pytest.raises(SystemExit, match="two results"):
        _report(tmp_path, d, d / "70b_nm16_tp1" / "e2e_nm16.json")
    unlabelled = {**_nm16_70b(), "label": None}
    with pytest.raises(SystemExit, match="no model label"):
        _report(tmp_path, _write(tmp_path / "u" / "e2e_nm16.json", unlabelled))
    with pytest.raises(SystemExit, match="no results"):
        _report(tmp_path, _write(tmp_path / "x.json", {}))


def test_plot(tmp_path, raw):
    pytest.importorskip("matplotlib")
    d, e2e, logs = raw
    png = tmp_path / "scale.png"
    _report(tmp_path, d, "--e2e-8b", e2e, "--plot", png)
    assert png.stat().st_size > 10_000


def test_log_readers():
    assert common.weights_gib_from_log(LOG_026) == 9.61
    assert common.kv_tokens_from_log(LOG_026) == 878_304
    # later vLLM wording
    later = "Model loading took 9.6 GiB memory and 4.5 seconds\n(EngineCore) INFO [x.py:1] GPU KV cache size: 12 tokens"
    assert (common.weights_gib_from_log(later), common.kv_tokens_from_log(later)) == (9.6, 12)
    assert common.kv_tokens_from_log("nothing") is None and common.weights_gib_from_log("") is None
    cause, lines = common.error_from_log(FAILED_LOG)
    assert cause.startswith("ValueError: No available memory for the cache blocks")
    assert lines[-1].startswith("RuntimeError: Engine core initialization failed") and len(lines) == 2
    oom = FAILED_LOG.replace("ValueError: No available memory", "torch.OutOfMemoryError: CUDA out of memory")
    assert common.error_from_log(oom)[0].startswith("torch.OutOfMemoryError: CUDA out of memory")
    assert common.error_from_log("INFO all good\n") == (None, [])


def test_run_child_timeout_stops_the_process_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            f" open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)")
    t0 = time.monotonic()
    rc, timed_out = bench_e2e.run_child([sys.executable, "-c", code], tmp_path / "child.log", timeout=3)
    assert timed_out and rc != 0 and time.monotonic() - t0 < 30
    assert "started" in (tmp_path / "child.log").read_text()
    gpid = int(pid_file.read_text())
    for _ in range(50):  # the grandchild (an "engine core") went with the group
        try:
            os.kill(gpid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {gpid} survived the timeout")
    rc, timed_out = bench_e2e.run_child([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "c2.log", timeout=30)
    assert (rc, timed_out) == (3, False)


def test_llama3_70b_config_only_with_synthetic_tokenizer(tmp_path):
    from offline.random_model import main as make_random

    out = tmp_path / "cfg70"
    assert make_random([str(out), "--preset", "llama3-70b", "--config-only", "--synthetic-tokenizer"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"]) == (8192, 28672, 80, 64, 8, 128256)
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (128000, 128009)
    assert not list(out.glob("*.safetensors"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 128256 and (tok.bos_token_id, tok.eos_token_id) == (128000, 128009)
    ids = tok.apply_chat_template([{"role": "user", "content": "Name three colors."}], add_generation_prompt=True,
                                  tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[:2] == [128000, 128006] and ids[-3:] == [128007, 10, 10] and 128009 in ids
    assert tok.decode([300, 127999, 128009], skip_special_tokens=True) == " w300 w127999"
    assert tok.decode(tok("héllo wörld")["input_ids"]) == "héllo wörld"


@pytest.mark.parametrize("case", ["failed_start", "timed_out_after_b1", "complete"])
def test_bench_model_records_runs(tmp_path, monkeypatch, case):
    """``bench_e2e.bench_model --record-failure``: the child (faked: it writes its partial result and its log) fails
    before starting, or times out after one measurement, or completes; the result file says which, with vLLM's error,
    the weights / KV tokens of the log and what was measured."""
    args = bench_e2e.build_parser().parse_args(
        ["--only", "dense", "--dense", "/tmp/cfg", "--label", "70b", "--record-failure", "--timeout", "420",
         "--start-only", "--gpu-mem", "0.98", "--load-format", "dummy"])

    def fake_child(cmd, log_file, timeout):
        assert cmd[cmd.index("--gpu-mem") + 1] == "0.98" and "--start-only" in cmd and timeout == 420
        res_file = Path(cmd[cmd.index("--child-json") + 1])
        if case == "failed_start":
            log_file.write_text(FAILED_LOG)
            return 1, False
        log_file.write_text(LOG_026)
        part = {"model": "/tmp/cfg", "quantization": None, "startup_s": 150.0, "complete": case == "complete",
                "latency": {"1": {"median_s": 5.0}}, "throughput": {}}
        res_file.write_text(json.dumps(part))
        return (0, False) if case == "complete" else (-15, True)

    monkeypatch.setattr(bench_e2e, "run_child", fake_child)
    monkeypatch.setattr(bench_e2e, "environment", lambda commit=None: {"argv": ["bench_e2e.py"], "commit": None})
    res = bench_e2e.bench_model("/tmp/cfg", None, args, tmp_path)
    assert json.loads((tmp_path / "e2e_dense.json").read_text()) == json.loads(json.dumps(res))
    assert (res["label"], res["settings"]["gpu_mem"], res["settings"]["tp"], res["start_only"]) == ("70b", 0.98, 1,
                                                                                                   True)
    if case == "failed_start":
        assert (res["started"], res["complete"], res["weights_gib"], res["kv_tokens"]) == (False, False, 131.42, None)
        assert res["error"].startswith("ValueError: No available memory for the cache blocks")
    elif case == "timed_out_after_b1":
        assert (res["started"], res["complete"], res["timed_out"], res["kv_tokens"]) == (True, False, True, 878_304)
        assert res["error"] == "timed out after 420 s" and res["latency"]["1"]["median_s"] == 5.0
    else:
        assert (res["started"], res["complete"], res["weights_gib"]) == (True, True, 9.61) and "error" not in res
    rows = scale_report.run_rows(res, "70b", None)
    assert rows[0]["started"] == res["started"] and rows[0]["gpu_mem"] == 0.98
    assert [r["bench"] for r in rows] == (["startup"] if case == "failed_start" else ["latency"])

    args.record_failure = False  # without --record-failure a failed run stops with an error
    if case != "complete":
        with pytest.raises(SystemExit, match="failed"):
            bench_e2e.bench_model("/tmp/cfg", None, args, tmp_path)


FAKE_VLLM = r'''#!PYTHON
"""A stand-in for `vllm serve` (the OpenAI endpoints serve_dummy.py calls), or a failed start (FAKE_FAIL=1)."""
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

print("(EngineCore pid=1) INFO [model_runner.py:305] Model loading took 79.30 GiB and 40.0 seconds")
if os.path.exists(sys.argv[0] + ".fail"):
    print("(EngineCore pid=1) ERROR [core.py:1] torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB")
    print("RuntimeError: Engine core initialization failed. See root cause above.", flush=True)
    sys.exit(1)
print("(EngineCore pid=1) INFO [kv_cache_utils.py:2177] GPU KV cache size: 115,008 tokens", flush=True)
with open(sys.argv[0] + ".argv", "w") as f:
    json.dump(sys.argv[1:], f)
usage = {"prompt_tokens": 6, "completion_tokens": 32, "total_tokens": 38}


class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def reply(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.reply({})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert req["max_tokens"] == 32 and req["ignore_eos"] is True
        if self.path.endswith("/chat/completions"):
            msg = {"role": "assistant", "content": " w5 w77"}
            self.reply({"id": "c", "object": "chat.completion", "created": 0, "model": req["model"], "usage": usage,
                        "choices": [{"index": 0, "message": msg, "finish_reason": "length"}]})
        else:
            assert all(isinstance(t, int) for t in req["prompt"])
            self.reply({"id": "c", "object": "text_completion", "created": 0, "model": req["model"], "usage": usage,
                        "choices": [{"index": 0, "text": " w9", "token_ids": [9] * 32, "finish_reason": "length"}]})


HTTPServer(("127.0.0.1", int(sys.argv[sys.argv.index("--port") + 1])), H).serve_forever()
'''


@pytest.mark.parametrize("fail", [False, True])
def test_serve_dummy_against_a_fake_server(tmp_path, fail):
    """``benchmarks/gpu/serve_dummy.py`` with a stand-in ``vllm`` on PATH: the command it runs, the token-id completion
    and the chat request through the openai client, the figures of the log, the server stopped; or a failed start
    recorded with its root cause. The result feeds scale_report's ``serve`` list."""
    pytest.importorskip("openai")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "vllm"
    fake.write_text(FAKE_VLLM.replace("PYTHON", sys.executable))
    fake.chmod(0o755)
    if fail:
        (bindir / "vllm.fail").write_text("")
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu" / "serve_dummy.py"), str(tmp_path / "cfg70"), "--label", "70b",
         "--out", str(out), "--ready-timeout", "60"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "serve_70b_nm16_tp1.json").read_text())
    assert (res["kind"], res["label"], res["engine"], res["tp"], res["weights_gib"]) == ("serve", "70b", "nm16", 1,
                                                                                           79.3)
    if fail:
        assert not res["started"] and "exited with 1" in res["error"] and "OutOfMemoryError" in res["error"]
        assert "chat_answered" not in res
    else:
        argv = json.loads((bindir / "vllm.argv").read_text())
        assert argv[:2] == ["serve", str(tmp_path / "cfg70")]
        assert argv[argv.index("--load-format") + 1] == "dummy" and argv[argv.index("--quantization") + 1] == "nm16"
        assert "--skip-tokenizer-init" not in argv
        assert res["started"] and res["kv_tokens"] == 115_008
        assert res["completion_answered"] and res["completion"]["token_ids"] == [9] * 32
        assert res["chat_answered"] and res["chat"]["content"] == " w5 w77"
    (entry,) = scale_report.build([], [{**res, "_file": "x"}], "d" * 40, {})["serve"]
    assert (entry["started"], entry["chat_answered"], entry["commit"]) == (not fail, not fail, "d" * 40)


@pytest.mark.parametrize("n,rounds", [(1, 3), (3, 3), (4, 8), (5, 7)])
def test_interleaved_timing_rotates_fairly(n, rounds):
    """graphs_us_interleaved's order: every item once per round, each round starting one item later, so that over
    whole cycles every item is timed in every position equally often (no item always last)."""
    orders = common.rotations(n, rounds)
    assert len(orders) == rounds
    assert all(sorted(o) == list(range(n)) for o in orders)
    assert [o[0] for o in orders] == [r % n for r in range(rounds)]
    full = orders[: rounds - rounds % n]
    for pos in range(n):
        counts = [sum(o[pos] == i for o in full) for i in range(n)]
        assert len(set(counts)) <= 1


@pytest.mark.parametrize("extra,message", [
    (["--model", "MISSING", "--ppl-tokens", "0"], "--ppl-tokens '0': a positive number of tokens or 'all'"),
    (["--model", "MISSING"], "no config.json there (and no --gguf to make it from)"),
    ([], "--gguf (or --model), --calib and --eval are required"),
])
def test_model_check_refuses_bad_arguments(tmp_path, extra, message):
    """benchmarks/gpu/smollm_check.py (the GPU host's real-model check, now for any model folder) refuses bad
    arguments before it compresses or starts anything."""
    args = [a.replace("MISSING", str(tmp_path / "no-model")) for a in extra]
    if extra:
        args += ["--calib", str(tmp_path / "c.txt"), "--eval", str(tmp_path / "e.txt")]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "smollm_check.py"), "--out",
                           str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_kernel_commit_finds_the_kernels_last_change():
    head = scale_report.git("rev-parse", "HEAD")
    if head is None:
        pytest.skip("not a git checkout")
    kc = scale_report.kernel_commit(head)  # the pathspec from the repository's top, though git runs in benchmarks/
    assert kc and len(kc) == 40
    changed = scale_report.git("show", "--name-only", "--format=", kc) or ""
    assert any(f.startswith("vllm_nm16/kernels/") for f in changed.splitlines()), changed


def test_commit_record_prefers_argument_then_nm16_commit(monkeypatch):
    monkeypatch.setenv("NM16_COMMIT", "f" * 40)
    assert common.commit_record("e" * 40) == {"commit": "e" * 40, "dirty": False, "commit_given": True}
    assert common.commit_record() == {"commit": "f" * 40, "dirty": False, "commit_given": True}
    monkeypatch.delenv("NM16_COMMIT")
    rec = common.commit_record()
    assert "commit_given" not in rec and rec["commit"] == common.git("rev-parse", "HEAD")
