"""`vllm serve` of a config-only folder with dummy weights, answered through the openai client (issue 12: the
70B-shaped nm16 model on one H200).

The folder has no weight files (``make_random_llama.py --config-only``, ``pack_random_nm16.py --config-only``) and is
served with ``--load-format dummy``: vLLM draws random dense weights, the nm16 plugin fills every packed layer with a
valid random nm16 layer. With a tokenizer in the folder (``make_random_llama.py --synthetic-tokenizer`` makes one with
no files: byte-level, the whole vocabulary, Llama-3 special ids and chat template) the server answers:

* a completion whose prompt is a list of token ids (``prompt=[ids]``), tokens returned (``return_token_ids``);
* a chat request (``client.chat.completions.create``): the chat template, tokenization, generation and
  detokenization all run; the answer is random words (the weights are random).

``--skip-tokenizer-init`` serves without a tokenizer: then only the token-id completion is possible (a chat request
needs the chat template and a tokenizer, so it is recorded as not attempted).

Recorded: ``ready_s`` (``vllm serve`` start to ``/health`` answering), ``weights_gib`` and ``kv_tokens`` (vLLM's
"Model loading took X GiB" / "GPU KV cache size: N tokens" log lines), the answers, and for a server that never got
ready ``started: false`` with vLLM's error from the log.

    python benchmarks/gpu/serve_dummy.py CFG_DIR --quantization nm16 --label 70b --out OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: common.py
from common import error_from_log, kv_tokens_from_log, weights_gib_from_log  # noqa: E402

CHAT = [{"role": "user", "content": "Name three colors."}]
PROMPT_IDS = [128000, 791, 6460, 315, 9822, 374]  # any ids < vocab: the weights are random
MAX_TOKENS = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_cmd(args: argparse.Namespace, port: int) -> list[str]:
    cmd = ["vllm", "serve", str(args.model), "--load-format", "dummy", "--host", "127.0.0.1", "--port", str(port),
           "--gpu-memory-utilization", str(args.gpu_mem), "--max-model-len", str(args.max_model_len)]
    if args.quantization != "none":
        cmd += ["--quantization", args.quantization]
    if args.tp != 1:
        cmd += ["--tensor-parallel-size", str(args.tp)]
    if args.skip_tokenizer_init:
        cmd += ["--skip-tokenizer-init"]
    return cmd


def wait_ready(proc: subprocess.Popen, port: int, timeout: float) -> str | None:
    """None once /health answers; else why not ("exited with N" / "not ready after S s")."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            return f"vllm serve exited with {proc.returncode}"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return None
        except OSError:
            time.sleep(2)
    return f"vllm serve not ready after {timeout:.0f} s"


def query(port: int, model: str, with_chat: bool) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    out: dict = {}
    t = time.perf_counter()
    try:
        r = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
        c = r.choices[0].model_dump()
        out["completion"] = {"text": c.get("text"), "token_ids": c.get("token_ids"),
                             "finish_reason": c.get("finish_reason"),
                             "usage": r.usage.model_dump() if r.usage else None, "s": time.perf_counter() - t}
    except Exception as e:  # noqa: BLE001 - recorded: any failure of the request is the finding
        out["completion"] = {"error": repr(e)}
    if not with_chat:
        out["chat"] = {"error": "not attempted: served with --skip-tokenizer-init (a chat request needs the chat "
                                "template and a tokenizer)"}
        return out
    t = time.perf_counter()
    try:
        r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body={"ignore_eos": True})
        out["chat"] = {"content": r.choices[0].message.content, "finish_reason": r.choices[0].finish_reason,
                       "usage": r.usage.model_dump() if r.usage else None, "s": time.perf_counter() - t}
    except Exception as e:  # noqa: BLE001 - recorded: any failure of the request is the finding
        out["chat"] = {"error": repr(e)}
    return out


def answered(part: dict) -> bool:
    """An answer came back with at least one generated token."""
    return "error" not in part and bool((part.get("usage") or {}).get("completion_tokens"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="config-only folder (served with --load-format dummy)")
    ap.add_argument("--quantization", default="nm16", help="nm16, or none for the dense model")
    ap.add_argument("--label", required=True, help="model label in the result, e.g. 70b")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tp", type=int, default=1, help="--tensor-parallel-size")
    ap.add_argument("--gpu-mem", type=float, default=0.85)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--skip-tokenizer-init", action="store_true")
    ap.add_argument("--ready-timeout", type=float, default=450, help="seconds to wait for /health")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    engine = "dense" if args.quantization == "none" else args.quantization
    stem = f"serve_{args.label}_{engine}_tp{args.tp}"
    log_path = args.out / f"{stem}.log"
    port = free_port()
    cmd = serve_cmd(args, port)
    res: dict = {"kind": "serve", "label": args.label, "engine": engine, "tp": args.tp, "gpu_mem": args.gpu_mem,
                 "max_model_len": args.max_model_len, "cmd": " ".join(cmd), "argv": sys.argv}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        why = wait_ready(proc, port, args.ready_timeout)
        res["ready_s"] = time.perf_counter() - t0
        res["started"] = why is None
        if why is None:
            res.update(query(port, str(args.model), with_chat=not args.skip_tokenizer_init))
            res["completion_answered"] = answered(res["completion"])
            res["chat_answered"] = answered(res["chat"])
    finally:
        for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                pass
    text = log_path.read_text(errors="replace")
    res.update(weights_gib=weights_gib_from_log(text), kv_tokens=kv_tokens_from_log(text),
               enforce_eager="enforce_eager=True" in text,
               log_graph_lines=[ln[-200:] for ln in text.splitlines() if "Graph capturing finished" in ln
                                or "torch.compile took" in ln][:4])
    if not res["started"]:
        cause, lines = error_from_log(text)
        res.update(error=f"{why}: {cause}" if cause else why, error_lines=lines[-10:])
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    print(json.dumps({k: res.get(k) for k in ("started", "ready_s", "weights_gib", "kv_tokens", "completion_answered",
                                              "chat_answered", "error")}, indent=1))
    print("chat:", (res.get("chat") or {}).get("content") or (res.get("chat") or {}).get("error"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
