"""End to end on the default model through the console scripts: nm16-compress with the default recipe (small
calibration) -> a valid checkpoint with its report -> nm16-eval prints `perplexity: <float>` last; plus the evaluation
protocol (every token scored exactly once)."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offline.evaluate import make_windows
from offline.nm16_loading import validate_checkpoint
from vllm_nm16 import format as fmt

VENV_BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"



@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 300), seqlen=st.integers(2, 64), data=st.data())
def test_windows_score_each_token_at_most_once(n, seqlen, data):
    """Scored tokens come in order, none twice; a token is left out only when it opens a window and so has no
    context (with stride < seqlen every token but the first is scored, each with >= seqlen - stride context)."""
    stride = data.draw(st.integers(1, seqlen))
    ids = list(range(n))
    windows = make_windows(ids, seqlen, stride)
    scored = []
    for w in windows:
        assert 2 <= len(w.ids) <= seqlen and len(w.ids) > max(w.score_from, 1), "every window scores something"
        if w is not windows[0]:
            assert w.score_from >= seqlen - stride
        scored += w.ids[max(w.score_from, 1):]
    assert scored == sorted(set(scored)), "a token scored twice or out of order"
    # Only tokens that open a window (positions k * stride) and so have no context may be left out.
    assert all(p % stride == 0 for p in set(ids[1:]) - set(scored)), "a token with context was left out"
    if stride < seqlen:
        assert scored == ids[1:]


@pytest.fixture(scope="module")
def default_ckpt(default_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "smollm2-nm16"
    proc = subprocess.run([str(VENV_BIN / "nm16-compress"), str(default_model), str(out), "--nsamples", "4",
                           "--seqlen", "128"], capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_default_recipe_checkpoint(default_ckpt, default_model):
    out, proc = default_ckpt
    assert validate_checkpoint(out) == 30 * 7
    spec = fmt.read_spec(out)
    cfg = json.loads((default_model / "config.json").read_text())
    # The default recipe: 8:16, SparseGPT, structured outliers (1 per 64 weights, largest block dividing the model),
    # block-wise reconstruction (200 steps); no variance correction, no equalization (chosen on the validation split).
    assert (spec.n, spec.m) == (8, 16) and spec.has_outliers and not spec.has_scale and not spec.has_shift
    assert all(f % spec.outlier_block == 0 for f in (cfg["hidden_size"], cfg["intermediate_size"]))
    assert spec.outlier_block // spec.outliers_per_block == 64
    assert spec.recipe["method"] == "sparsegpt" and spec.recipe["equalize"] is None
    assert spec.recipe["variance_correction"] == "none" and spec.recipe["reconstruct"] == 200
    assert spec.ignore == ("lm_head",)
    report = json.loads((out / "nm16_report.json").read_text())
    totals = report["totals"]
    assert len(report["layers"]) == 210
    assert 0.5625 < totals["linear_ratio_bitmask"] < 0.6 and totals["model_ratio_bitmask"] < 0.75
    assert totals["linear_bytes_per_weight_combinatorial"] < totals["linear_bytes_per_weight_bitmask"]
    for layer in report["layers"].values():
        assert 0 < layer["rel_error_before_correction"] < 1 and math.isfinite(layer["rel_error_after_correction"])
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file()
    # Progress bars per block and the summary table.
    assert "block" in proc.stderr and "down_proj" in proc.stdout and "bytes/weight" in proc.stdout


def test_nm16_eval_prints_perplexity_last(default_ckpt, eval_text, tmp_path):
    out, _ = default_ckpt
    js = tmp_path / "ppl.json"
    proc = subprocess.run([str(VENV_BIN / "nm16-eval"), str(out), "--text", str(eval_text), "--max-tokens", "1024",
                           "--json", str(js)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"perplexity: (\S+)", last)
    assert m, last
    ppl = float(m.group(1))
    res = json.loads(js.read_text())
    expected_tokens = sum(len(w.ids) - max(w.score_from, 1) for w in make_windows(list(range(1024)), 512))
    assert res["tokens"] == expected_tokens and res["engine"] == "hf"
    assert ppl == pytest.approx(math.exp(res["nll_sum"] / res["tokens"]), rel=1e-4)
    # Far better than chance (uniform over the vocabulary): the compressed model still models language.
    assert 1 < ppl < 49152 / 50


def test_nm16_eval_bad_input(tmp_path):
    proc = subprocess.run([str(VENV_BIN / "nm16-eval"), str(tmp_path / "nope")], capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("error:")
