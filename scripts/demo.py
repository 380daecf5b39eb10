"""The main job, end to end (``make demo``): compress the default model with the default recipe, serve it with
``vllm serve <ckpt> --quantization nm16`` on 127.0.0.1, talk to it with the ``openai`` client (a chat completion and a
streamed completion), print the answers beside the dense model's answers to the same prompts with the same sampling
settings (the model's generation_config.json recommendation where it has one, else greedy; the dense model runs in
transformers, fp32), tokens/s, bytes saved and perplexity dense vs nm16, and stop the server cleanly. About 35-40
minutes on 2 CPU cores (most of it: compression with the default recipe's block-wise reconstruction, ~20-25 min, and
vLLM's CPU compile warm-up).

    python scripts/demo.py [--model DIR] [--out DIR] [--recompress] [--eval-tokens N]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


QUESTION = "What are the three branches of the United States government?"
PROMPT = "Mr. Speaker, Mr. Vice President, members of Congress, my fellow Americans:"
CHAT_TOKENS, STREAM_TOKENS = 64, 96
SEED = 0
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def say(msg: str = "") -> None:
    print(msg, flush=True)


def stage(title: str) -> None:
    say(f"\n=== {title} " + "=" * max(0, 100 - len(title)))


def get_checkpoint(model: Path, out: Path, recompress: bool) -> Path:
    import offline
    from offline.nm16_loading import validate_checkpoint

    if out.exists() and not recompress:
        try:
            n = validate_checkpoint(out)
            say(f"reusing {out} ({n} packed layers, valid; --recompress to redo)")
            return out
        except Exception as e:  # noqa: BLE001 - anything wrong with it: make a new one
            say(f"existing {out} is not usable ({e}); compressing again")
    t0 = time.time()
    offline.compress(model, out, overwrite=True)  # the default recipe (see nm16-compress --help)
    say(f"compressed in {time.time() - t0:.0f} s -> {out}")
    return out


def bytes_report(model: Path, ckpt: Path) -> None:
    from vllm_nm16 import format as fmt

    spec = fmt.read_spec(ckpt)
    from safetensors import safe_open

    dense_lin = packed_lin = 0.0
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for key in fh.keys():
                if key.endswith("." + fmt.MASK):
                    out_f, groups = fh.get_slice(key).get_shape()
                    b = fmt.layer_bytes(spec, out_f, groups * spec.m)
                    dense_lin += b["dense"]
                    packed_lin += b["total"]
    size = lambda d: sum(p.stat().st_size for p in d.glob("*.safetensors"))  # noqa: E731
    say(f"recipe: {spec.pattern}, outliers {spec.outliers_per_block}/{spec.outlier_block}, scale={spec.has_scale}, "
        f"shift={spec.has_shift}, {len(spec.ignore)} layer(s) kept dense")
    say(f"packed linear layers: {dense_lin / 2**20:.1f} MiB dense -> {packed_lin / 2**20:.1f} MiB nm16 "
        f"({1 - packed_lin / dense_lin:.1%} saved, {8 * packed_lin / (dense_lin / 2):.2f} bits/weight)")
    say(f"whole checkpoint (embeddings stay dense): {size(model) / 2**20:.1f} MiB -> {size(ckpt) / 2**20:.1f} MiB "
        f"({1 - size(ckpt) / size(model):.1%} saved)")


def sampling_settings(model: Path) -> dict:
    """The sampling settings both models answer with: the ones the model's generation_config.json recommends
    (``do_sample`` with its temperature / top_p / top_k / min_p; a repetition_penalty applies to greedy decoding too),
    else greedy. Only the keys the config sets are returned besides ``temperature`` (0 = greedy)."""
    import json

    path = model / "generation_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    settings: dict = {"temperature": 0.0}
    if cfg.get("do_sample"):
        settings["temperature"] = float(cfg.get("temperature", 1.0))
        for key in ("top_p", "top_k", "min_p"):
            if cfg.get(key) is not None:
                settings[key] = cfg[key]
    if cfg.get("repetition_penalty") not in (None, 1, 1.0):
        settings["repetition_penalty"] = float(cfg["repetition_penalty"])
    return settings


def describe(settings: dict) -> str:
    if settings["temperature"] == 0:
        how = "greedy"
    else:
        how = "sampling " + ", ".join(f"{k}={settings[k]}" for k in SAMPLING_KEYS if k in settings) + f", seed {SEED}"
    if settings["temperature"] == 0 and "repetition_penalty" in settings:
        how += f", repetition_penalty={settings['repetition_penalty']}"
    return how


def openai_kwargs(settings: dict) -> dict:
    """The settings as openai-client arguments (vLLM reads top_k, min_p and repetition_penalty from extra_body)."""
    kw: dict = {"temperature": settings["temperature"], "seed": SEED}
    if "top_p" in settings:
        kw["top_p"] = settings["top_p"]
    extra = {k: settings[k] for k in ("top_k", "min_p", "repetition_penalty") if k in settings}
    if extra:
        kw["extra_body"] = extra
    return kw


def hf_generate_kwargs(settings: dict) -> dict:
    """The same settings as transformers ``generate`` arguments (explicit neutral values where the config sets none,
    so transformers' own defaults, e.g. top_k=50, do not apply)."""
    if settings["temperature"] == 0:
        kw: dict = {"do_sample": False}
    else:
        kw = {"do_sample": True, "temperature": settings["temperature"], "top_p": settings.get("top_p", 1.0),
              "top_k": settings.get("top_k", 0)}
        if "min_p" in settings:
            kw["min_p"] = settings["min_p"]
    if "repetition_penalty" in settings:
        kw["repetition_penalty"] = settings["repetition_penalty"]
    return kw


def dense_answers(model: Path, settings: dict) -> dict[str, str]:
    """The dense model's answers to the demo's chat question and completion prompt (transformers, fp32, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    gen = hf_generate_kwargs(settings)
    chat_text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                        add_generation_prompt=True)
    answers = {}
    for key, text, special, n in (("chat", chat_text, False, CHAT_TOKENS), ("completion", PROMPT, True, STREAM_TOKENS)):
        ids = tok(text, return_tensors="pt", add_special_tokens=special)
        torch.manual_seed(SEED)
        with torch.no_grad():
            out = lm.generate(**ids, max_new_tokens=n, **gen,
                              pad_token_id=tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id)
        answers[key] = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def talk(base_url: str, name: str, settings: dict, dense: dict[str, str]) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=600)
    say(f"/v1/models: {[m.id for m in client.models.list().data]}")
    say(f"both models: {describe(settings)}")
    kw = openai_kwargs(settings)

    t0 = time.time()
    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=CHAT_TOKENS, **kw)
    dt = time.time() - t0
    say(f"\n[chat] user: {QUESTION}\n[chat] nm16 : {chat.choices[0].message.content.strip()}")
    say(f"[chat] dense: {dense['chat'].strip()}")
    say(f"[chat] nm16: {chat.usage.completion_tokens} tokens in {dt:.1f} s")

    sys.stdout.write(f"\n[stream] prompt: {PROMPT}\n[stream] nm16 : ")
    sys.stdout.flush()
    t0 = time.time()
    first = None
    n = 0
    for chunk in client.completions.create(model=name, prompt=PROMPT, max_tokens=STREAM_TOKENS, stream=True,
                                           stream_options={"include_usage": True}, **kw):
        if chunk.choices and chunk.choices[0].text:
            first = first or time.time()
            sys.stdout.write(chunk.choices[0].text)
            sys.stdout.flush()
        if chunk.usage:
            n = chunk.usage.completion_tokens
    end = time.time()
    say(f"\n[stream] dense: {dense['completion'].strip()}")
    say(f"[stream] nm16: {n} tokens, first after {first - t0:.2f} s, "
        f"{(n - 1) / max(end - first, 1e-9):.1f} tokens/s while streaming (1 request)")

    # Throughput with 4 concurrent requests (vLLM batches them).
    results: list[int] = []

    def one(i: int) -> None:
        r = client.completions.create(model=name, prompt=f"{PROMPT} ({i})", max_tokens=64, temperature=0,
                                      extra_body={"ignore_eos": True})
        results.append(r.usage.completion_tokens)

    t0 = time.time()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.time() - t0
    say(f"[batch] 4 concurrent requests: {sum(results)} tokens in {dt:.1f} s = {sum(results) / dt:.1f} tokens/s")


def perplexity(model: Path, ckpt: Path, eval_text: Path, tokens: int) -> None:
    from offline.evaluate import perplexity_hf

    for label, path in (("dense", model), ("nm16", ckpt)):
        r = perplexity_hf(path, eval_text, max_tokens=tokens)
        say(f"perplexity {label:5s}: {r['perplexity']:.3f}  ({r['tokens']} tokens of {eval_text.name}, "
            f"{r['seconds']:.0f} s)")
    say("(transformers fp32 on the unpacked checkpoint; tests/test_eval_vllm.py checks that `nm16-eval --engine vllm` "
        "agrees with it within 1%)")


def main(argv: list[str] | None = None) -> int:
    from offline.assets import default_eval_path, default_model_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="dense HF folder (default: the default model)")
    ap.add_argument("--out", type=Path, default=None, help="checkpoint folder (default: .cache/demo/<model>-nm16)")
    ap.add_argument("--recompress", action="store_true", help="compress even if a valid checkpoint exists")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="perplexity on the first N eval tokens")
    ap.add_argument("--port", type=int, default=None, help="server port (default: a free one)")
    args = ap.parse_args(argv)

    model = args.model or default_model_dir()
    eval_text = default_eval_path()
    for p in (model, eval_text):
        if not Path(p).exists():
            say(f"error: {p} is missing: run `make setup` first")
            return 2
    out = args.out or ROOT / ".cache" / "demo" / f"{Path(model).name}-nm16"
    t_start = time.time()

    stage("1. compress (default recipe)")
    ckpt = get_checkpoint(Path(model), out, args.recompress)
    bytes_report(Path(model), ckpt)

    stage("2. the dense model's answers (transformers), to print beside nm16's")
    settings = sampling_settings(Path(model))
    t0 = time.time()
    dense = dense_answers(Path(model), settings)
    say(f"{describe(settings)}; {time.time() - t0:.0f} s")

    stage("3. vllm serve <ckpt> --quantization nm16")
    from vllm_nm16 import compat
    from nm16_dev.server import VLLMServer

    log = out.parent / "vllm-serve.log"
    srv = VLLMServer(ckpt, ["--quantization", "nm16", "--max-model-len", "1024", "--kv-cache-memory-bytes", str(compat.KV_CACHE_BYTES),
                            "--max-num-seqs", "8"], log_path=log, port=args.port, served_model_name="nm16-demo")
    say(" ".join(srv.cmd))
    say(f"(log: {log}; waiting for /health -- vLLM compiles the model for CPU first)")
    t0 = time.time()
    try:
        srv.start(timeout=1200)
        say(f"healthy after {time.time() - t0:.0f} s at {srv.base_url}")
        stage("4. OpenAI API: nm16 (served) beside dense")
        talk(srv.base_url, srv.name, settings, dense)
    finally:
        stage("5. stop the server")
        rc = srv.stop()
        say(f"vllm serve exited with {rc}; processes left: {srv.leftover or 'none'}")

    stage("6. perplexity dense vs nm16")
    perplexity(Path(model), ckpt, eval_text, args.eval_tokens)
    say(f"\ndemo done in {time.time() - t_start:.0f} s")
    return 0 if not srv.leftover else 1


if __name__ == "__main__":
    sys.exit(main())
