"""nm16-compress on small random Llamas: the checkpoint is valid and unpacks to the masked weights, matches the
in-memory compressed model, and every bad input gets a one-line error, exit code != 0 and leaves nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from offline import cli
from offline.nm16_loading import read_safetensors_folder, validate_checkpoint
from vllm_nm16 import format as fmt

FAST = ["--nsamples", "4", "--seqlen", "32", "--quiet"]


def _compress(src, out, *extra, calib=None) -> int:
    argv = [str(src), str(out), *FAST, *extra]
    if calib is not None:
        argv += ["--calib", str(calib)]
    return cli.compress_main(argv)


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists(), f"{out} was left behind"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert not leftovers, f"temporary folders left behind: {leftovers}"


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_magnitude_checkpoint_unpacks_to_masked_weights(tiny_llama, tmp_path):
    out = tmp_path / "ckpt"
    assert _compress(tiny_llama, out, "--method", "magnitude", "--outliers", "none",
                     "--variance-correction", "none", "--equalize", "none", "--reconstruct", "0") == 0
    assert validate_checkpoint(out) == 2 * 7
    spec = fmt.read_spec(out)
    assert (spec.n, spec.m, spec.has_outliers, spec.has_scale) == (8, 16, False, False)
    assert "lm_head" in spec.ignore and spec.recipe["method"] == "magnitude"
    src = load_file(str(tiny_llama / "model.safetensors"))
    layers = fmt.split_layer_tensors(read_safetensors_folder(out))
    for prefix, tensors in layers.items():
        w = src[f"{prefix}.weight"]
        up = fmt.unpack(tensors, spec)
        assert torch.equal(up.keep, fmt.nm_keep_topk(w.float().abs(), 8, 16)), prefix
        assert torch.equal(up.weight_nm, w * up.keep), prefix
    report = json.loads((out / "nm16_report.json").read_text())
    assert set(report["layers"]) == set(layers)
    assert report["totals"]["linear_ratio_bitmask"] == pytest.approx(9 / 16)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file() == (tiny_llama / name).is_file()


def test_outliers_are_exact_original_weights(tiny_llama, tmp_path):
    out = tmp_path / "ckpt"
    assert _compress(tiny_llama, out, "--method", "wanda", "--outliers", "2/64", "--variance-correction", "none",
                     "--equalize", "none", "--reconstruct", "0") == 0
    spec = fmt.read_spec(out)
    assert (spec.outlier_block, spec.outliers_per_block) == (64, 2)
    src = load_file(str(tiny_llama / "model.safetensors"))
    for prefix, tensors in fmt.split_layer_tensors(read_safetensors_folder(out)).items():
        up = fmt.unpack(tensors, spec)
        w = src[f"{prefix}.weight"]
        pos = up.outliers != 0
        assert int(pos.sum()) == w.shape[0] * w.shape[1] // 64 * 2
        assert torch.equal(up.outliers[pos], w[pos])
        assert not (up.weight_nm.ne(0) & pos).any(), "a weight is stored both as outlier and as N:M value"


@pytest.mark.parametrize("pattern", ["2:4", "16:32"])
def test_full_recipe_checkpoint_matches_in_memory_model(tiny_llama, tmp_path, calib_text, pattern):
    """The packed checkpoint, unpacked by the evaluator, computes what the in-memory compressed model computes (the
    quality matrix measures the latter), including outliers, variance scales and the mean shift."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offline.calibration import calibration_samples
    from offline.compressor import Recipe, compress_model
    from offline.evaluate import load_hf_model

    out = tmp_path / "ckpt"
    full = ("--variance-correction", "channel", "--equalize", "0.5", "--mean-shift", "--reconstruct", "0")
    assert _compress(tiny_llama, out, "--pattern", pattern, *full) == 0
    validate_checkpoint(out)
    spec = fmt.read_spec(out)
    assert spec.has_outliers and spec.has_scale and spec.has_shift and spec.recipe["equalize"] == 0.5

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    samples = calibration_samples(AutoTokenizer.from_pretrained(tiny_llama), calib_text, 4, 32, 0)
    compress_model(model, samples, Recipe(pattern=pattern, variance_correction="channel", equalize=0.5, mean_shift=True,
                                          reconstruct=0), progress=False)
    loaded = load_hf_model(out)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    # Differences: bf16 storage of the folded norms (the in-memory model keeps them in fp32).
    assert (a - b).abs().max() < 0.02 * a.abs().max()


def test_unstructured_pattern_writes_dense_folder(tiny_llama, tmp_path):
    out = tmp_path / "dense"
    assert _compress(tiny_llama, out, "--pattern", "unstructured", "--outliers", "none") == 0
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    state = load_file(str(out / "model.safetensors"))
    w = state["model.layers.0.mlp.up_proj.weight"]
    assert abs(float((w == 0).float().mean()) - 0.5) < 0.01
    assert json.loads((out / "nm16_report.json").read_text())["format"] == "dense-effective"


def test_indivisible_layers_stay_dense_with_warning(make_llama, tmp_path, capsys, caplog):
    src = make_llama(hidden=64, intermediate=72, layers=1, heads=4, kv_heads=2)
    out = tmp_path / "ckpt"
    assert _compress(src, out) == 0
    assert "model.layers.0.mlp.down_proj" in caplog.text and "stay dense" in caplog.text
    spec = fmt.read_spec(out)
    assert "model.layers.0.mlp.down_proj" in spec.ignore
    assert spec.has_outliers, "the dense layer must not switch the outlier budget off for the others"
    state = read_safetensors_folder(out)
    assert "model.layers.0.mlp.down_proj.weight" in state
    assert validate_checkpoint(out) == 6
    # Forcing them is an error.
    out2 = tmp_path / "ckpt2"
    assert _compress(src, out2, "--strict") != 0
    _one_line_error(capsys, "model.layers.0.mlp.down_proj", "in_features=72")
    _assert_nothing_left(out2)


# ------------------------------------------------------------------------------------------------- failure modes
def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_and_empty_model_dir(tmp_path, capsys):
    out = tmp_path / "out"
    assert _compress(tmp_path / "nope", out) != 0
    _one_line_error(capsys, "does not exist")
    _assert_nothing_left(out)
    (tmp_path / "empty").mkdir()
    assert _compress(tmp_path / "empty", out) != 0
    _one_line_error(capsys, "no config.json")
    _assert_nothing_left(out)


def test_unsupported_architecture(tiny_llama, tmp_path, capsys):
    src = _copy_model(tiny_llama, tmp_path / "gpt2")
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert _compress(src, out) != 0
    _one_line_error(capsys, "unsupported architecture", "GPT2LMHeadModel", "LlamaForCausalLM")
    _assert_nothing_left(out)


def test_pickle_checkpoint_refused(tiny_llama, tmp_path, capsys):
    src = _copy_model(tiny_llama, tmp_path / "pickle")
    state = load_file(str(src / "model.safetensors"))
    torch.save(state, src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    out = tmp_path / "out"
    assert _compress(src, out) != 0
    _one_line_error(capsys, "pickle", "safetensors")
    _assert_nothing_left(out)


def test_too_little_calibration_text(tiny_llama, tmp_path, capsys):
    calib = tmp_path / "short.txt"
    calib.write_text("Four score and seven years ago. " * 5)
    out = tmp_path / "out"
    assert _compress(tiny_llama, out, calib=calib) != 0
    _one_line_error(capsys, "tokens", "needed", "4 samples x 32")
    _assert_nothing_left(out)


def test_nan_weights_named(tiny_llama, tmp_path, capsys):
    src = _copy_model(tiny_llama, tmp_path / "nan")
    state = load_file(str(src / "model.safetensors"))
    state["model.layers.1.mlp.gate_proj.weight"][3, 5] = float("nan")
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert _compress(src, out) != 0
    _one_line_error(capsys, "model.layers.1.mlp.gate_proj.weight", "NaN")
    _assert_nothing_left(out)


def test_existing_output_needs_overwrite(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _compress(tiny_llama, out, "--method", "magnitude") != 0
    _one_line_error(capsys, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    assert _compress(tiny_llama, out, "--method", "magnitude", "--overwrite") == 0
    assert not (out / "keep.txt").exists() and validate_checkpoint(out) == 14
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_interrupted_run_leaves_nothing(tiny_llama, tmp_path, capsys, monkeypatch):
    import offline.compressor as compressor

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compressor, "compress_model", boom)
    out = tmp_path / "out"
    assert _compress(tiny_llama, out) == 130
    _one_line_error(capsys, "interrupted")
    _assert_nothing_left(out)


def test_input_folder_is_not_modified(tiny_llama, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_llama.iterdir()}
    assert _compress(tiny_llama, tmp_path / "out", "--method", "magnitude") == 0
    assert {p.name: p.stat().st_mtime_ns for p in tiny_llama.iterdir()} == before


def test_bad_options_are_one_line_errors(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    for extra, needle in ((["--pattern", "8:15"], "pattern"), (["--outliers", "300/256"], "outliers"),
                          (["--outliers", "4/100"], "multiple of")):
        assert _compress(tiny_llama, out, *extra) != 0
        _one_line_error(capsys, needle)
        _assert_nothing_left(out)


def test_python_api_returns_checkpoint_path(tiny_llama, tmp_path):
    import offline

    out = offline.compress(tiny_llama, tmp_path / "api", method="magnitude", nsamples=2, seqlen=32, progress=False)
    assert isinstance(out, Path) and validate_checkpoint(out) == 14
    with pytest.raises(offline.CompressError, match="already exists"):
        offline.compress(tiny_llama, out, method="magnitude", nsamples=2, seqlen=32, progress=False)
