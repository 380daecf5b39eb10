"""The default model and corpus built by `make setup` (offline/assets.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from offline import assets


def test_split_corpus_by_year(tmp_path):
    speeches = []
    for name, text in [("1999-Clinton-1.txt", "old speech"), ("2000-Clinton-2.txt", "new speech"),
                       ("1790-Washington-1.txt", "first"), ("2026-Someone-1.txt", "  \n")]:
        p = tmp_path / name
        p.write_text(text)
        speeches.append((int(name[:4]), p))
    calib, evals = assets.split_corpus(sorted(speeches, key=lambda yp: yp[1].name))
    assert calib == "first\n\nold speech\n"
    assert evals == "new speech\n"  # empty speeches are dropped


def test_split_corpus_refuses_empty_side(tmp_path):
    p = tmp_path / "1800-A-1.txt"
    p.write_text("x")
    with pytest.raises(SystemExit, match="empty side"):
        assets.split_corpus([(1800, p)])


def test_installed_corpus_split_is_disjoint_and_complete(calib_text, eval_text):
    speeches = assets.find_speeches()
    years = [y for y, _ in speeches]
    assert min(years) == 1790 and max(years) >= 2020
    calib, evals = calib_text.read_text(), eval_text.read_text()
    for year, path in speeches:
        body = path.read_text(encoding="utf-8").strip()
        if not body:
            continue
        # Every speech lands in exactly one split, chosen by its year.
        assert (body in calib) == (year < assets.SPLIT_YEAR), path.name
        assert (body in evals) == (year >= assets.SPLIT_YEAR), path.name


def test_default_model_is_a_bf16_safetensors_llama(default_model):
    cfg = json.loads((default_model / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)
    assert "quantization_config" not in cfg
    assert (default_model / "model.safetensors").is_file() and (default_model / "tokenizer.json").is_file()
    from safetensors import safe_open

    with safe_open(default_model / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}


def test_default_model_perplexity_is_sane(default_model, eval_text):
    """One 512-token window of the evaluation split: a working 135M model sits far below uniform (49152)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model)
    model = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32).eval()
    ids = tok(eval_text.read_text()[:20000], return_tensors="pt").input_ids[:, :512]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert 5 < math.exp(loss) < 60, math.exp(loss)


def test_validation_split_cuts_the_calibration_side(tmp_path):
    speeches = []
    for name in ("1790-Washington-1.txt", "1989-Reagan-1.txt", "1990-Bush-1.txt", "1999-Clinton-1.txt",
                 "2000-Clinton-2.txt"):
        p = tmp_path / name
        p.write_text(name[:4])
        speeches.append((int(name[:4]), p))
    train, valid = assets.validation_split(speeches)
    assert train == "1790\n\n1989\n"
    assert valid == "1990\n\n1999\n"  # the evaluation years (2000 on) are in neither
    with pytest.raises(SystemExit, match="empty"):
        assets.validation_split(speeches, start_year=2000)


def test_installed_validation_split_is_disjoint_from_eval(calib_text, eval_text):
    """Built by `make setup` beside the calibration and evaluation splits (build_corpus adds it to an old cache)."""
    calib_p, eval_p = assets.build_corpus()
    train = assets.default_calib_train_path().read_text()
    valid = assets.default_valid_path().read_text()
    evals = eval_p.read_text()
    # calib-train + valid is exactly the default calibration split, cut at VALID_START_YEAR.
    assert train.rstrip("\n") + "\n\n" + valid == calib_p.read_text()
    for year, path in assets.find_speeches():
        body = path.read_text(encoding="utf-8").strip()
        if body:
            assert (body in valid) == (assets.VALID_START_YEAR <= year < assets.SPLIT_YEAR), path.name
            assert body not in valid or body not in evals
