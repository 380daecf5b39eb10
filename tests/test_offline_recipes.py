"""nm16-compress: every pattern the CLI accepts works with the default recipe, every recipe option takes effect, and
combinations the pipeline cannot honour are refused up front (before the model is loaded) with a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from offline import cli
from offline.assets import default_eval_path
from offline.nm16_loading import read_safetensors_folder, validate_checkpoint
from vllm_nm16 import format as fmt

FAST = ["--nsamples", "4", "--seqlen", "32", "--quiet", "--threads", "1"]   # 1 thread: tiny tensors
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
PATTERNS = ["2:4", "4:8", "8:16", "16:32", "unstructured"]
SALIENT = 4          # input columns 0..3 of every linear are made 30x larger: every row's outliers fall in group 0


def _compress(src, out, *extra) -> int:
    return cli.compress_main([str(src), str(out), *FAST, *extra])


@pytest.fixture(autouse=True, scope="module")
def _load_each_tokenizer_once():
    """~20 runs of the CLI in this module: load each model's tokenizer once (the compressor only reads it)."""
    import transformers

    original = transformers.AutoTokenizer.from_pretrained
    cache = {}

    def cached(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = original(path, *args, **kwargs)
        return cache[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(transformers.AutoTokenizer, "from_pretrained", cached)
    threads = torch.get_num_threads()
    yield
    mp.undo()
    torch.set_num_threads(threads)   # --threads 1 must not leak into other test modules


@pytest.fixture(scope="module")
def salient_llama(make_llama):
    """A 1-block random Llama with hidden = intermediate = 192, so that the 'auto' outlier budget resolves to 3/192
    as on SmolLM2-135M (hidden 576), and whose first 4 input columns dominate every linear layer: the 3 outliers of
    every (row, block) land in one group of 4, the case that broke the 2:4 default recipe."""
    src = make_llama(hidden=192, intermediate=192, layers=1, heads=3, kv_heads=1, seed=1)
    path = src / "model.safetensors"
    state = load_file(str(path))
    for n in LINEARS:
        w = state[f"model.layers.0.{n}.weight"]
        w[:, :SALIENT] *= 30
    save_file(state, str(path), metadata={"format": "pt"})
    return src


@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_pattern_works_with_the_default_recipe(salient_llama, tmp_path, pattern):
    out = tmp_path / "ckpt"
    assert _compress(salient_llama, out, "--pattern", pattern) == 0
    report = json.loads((out / "nm16_report.json").read_text())
    assert report["recipe"]["outliers_resolved"] == [3, 192]
    assert {k: report["recipe"][k] for k in ("method", "variance_correction", "equalize", "outlier_structure")} == \
        {"method": "sparsegpt", "variance_correction": "none", "equalize": None, "outlier_structure": "structured"}
    assert len(report["layers"]) == len(LINEARS) and not report["ignore"]
    if pattern == "unstructured":
        assert "quantization_config" not in json.loads((out / "config.json").read_text())
        state = load_file(str(out / "model.safetensors"))
        for n in LINEARS:
            zeros = float((state[f"model.layers.0.{n}.weight"] == 0).float().mean())
            assert abs(zeros - 0.5) < 0.01, (n, zeros)
        return
    n, m = (int(v) for v in pattern.split(":"))
    assert validate_checkpoint(out) == len(LINEARS)
    spec = fmt.read_spec(out)
    assert (spec.n, spec.m, spec.outlier_block, spec.outliers_per_block) == (n, m, 192, 3)
    assert not spec.has_scale and not spec.has_shift  # the default: no variance correction
    for prefix, tensors in fmt.split_layer_tensors(read_safetensors_folder(out)).items():
        up = fmt.unpack(tensors, spec)
        outl = up.outliers != 0
        rows3 = outl[:, :SALIENT].sum(1) == 3
        assert int(rows3.sum()) >= up.keep.shape[0] // 4, f"{prefix}: the outliers are not in the salient group"
        # A group holding more outliers than M - N (3 > 2 in 2:4) pads its N kept slots with outlier positions
        # (stored as zero), so the whole group stays live; with M - N >= 3 kept slots and outliers never meet.
        pad = up.keep & outl
        per_group = (lambda t: t.reshape(t.shape[0], -1, m).sum(-1))
        assert torch.equal(per_group(pad), (per_group(outl) - (m - n)).clamp_min(0)), prefix
        assert not bool(up.weight_nm[pad].ne(0).any()), "a padded slot must hold zero"
        if m == 4:
            assert bool((up.keep | outl)[rows3, :SALIENT].all()), prefix


# ------------------------------------------------------------------------------------------------- recipe options
@pytest.fixture(scope="module")
def baseline(tiny_llama, tmp_path_factory):
    """The default recipe on the 2-block tiny Llama (8:16, auto outliers = 1/64 there)."""
    out = tmp_path_factory.mktemp("baseline") / "ckpt"
    assert _compress(tiny_llama, out) == 0
    return out


def _differs(a: Path, b: Path, suffix: str = fmt.VALUES) -> bool:
    sa, sb = read_safetensors_folder(a), read_safetensors_folder(b)
    keys = [k for k in sa if k.endswith(suffix)]
    assert keys, suffix
    return any(k not in sb or sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k]) for k in keys)


def _check_method(out, base, spec, rep):
    assert _differs(out, base) and _differs(out, base, fmt.MASK)


def _check_no_outliers(out, base, spec, rep):
    assert not spec.has_outliers and not any(k.endswith(fmt.OUTLIER_VALUES) for k in read_safetensors_folder(out))


def _check_outliers_2_64(out, base, spec, rep):
    assert (spec.outlier_block, spec.outliers_per_block) == (64, 2)
    o = read_safetensors_folder(out)["model.layers.0.mlp.down_proj.outlier_values"]
    assert o.shape == (64, 128 // 64 * 2)


def _check_unstructured_outliers(out, base, spec, rep):
    from offline import outliers

    assert spec is None and rep["format"] == "dense-effective"
    r = rep["layers"]["model.layers.0.mlp.down_proj"]
    assert r["outliers"] == outliers.unstructured_count_at_equal_bytes(64, 128, 1, 64)


def _scales(out):
    return {k: v for k, v in read_safetensors_folder(out).items() if k.endswith(fmt.SCALE)}


def _check_vc_tensor(out, base, spec, rep):
    scales = _scales(out)
    assert scales and all(torch.all(v == v[0]) for v in scales.values()), "per-tensor: one scale per layer"
    assert not _scales(base), "the default has no variance correction"


def _check_vc_channel(out, base, spec, rep):
    scales = _scales(out)
    assert spec.has_scale and scales and any(not torch.all(v == v[0]) for v in scales.values()), "one per row"


def _check_vc_none(out, base, spec, rep):
    assert not spec.has_scale and not _scales(out)


def _check_mean_shift(out, base, spec, rep):
    shifts = [v for k, v in read_safetensors_folder(out).items() if k.endswith(fmt.SHIFT)]
    assert spec.has_shift and len(shifts) == 14 and any(bool(v.ne(0).any()) for v in shifts)


def _norms(out):
    return {k: v for k, v in read_safetensors_folder(out).items() if k.endswith("layernorm.weight")}


def _check_equalize(out, base, spec, rep):
    assert rep["recipe"]["equalize"] == 0.5
    assert any(not bool((v == 1).all()) for v in _norms(out).values()), "equalization folds 1/s into the norms"
    assert all(bool((v == 1).all()) for v in _norms(base).values()), "the random model's norms are all ones"


def _check_changes_values(key, value):
    def check(out, base, spec, rep):
        assert rep["recipe"][key] == value
        assert _differs(out, base)
    return check


def _check_recorded(key, value):
    def check(out, base, spec, rep):
        assert rep["recipe"][key] == value
    return check


def _check_no_reconstruction_report(rep):
    assert not rep.get("reconstruction"), "reconstruction off: no per-block report"


def _check_reconstruction_report(rep):
    assert set(rep["reconstruction"]) == {"model.layers.0", "model.layers.1"}
    assert all(r["rel_error_after"] <= r["rel_error_before"] for r in rep["reconstruction"].values())


# One run per recipe option (default recipe otherwise), each with a check that fails if the option were ignored.
# Covered elsewhere and left out here: magnitude alone and wanda + explicit k/B outliers (test_offline_compress.py);
# --strict (test_indivisible_layers_stay_dense_with_warning); the unstructured pattern (above).
OPTIONS = {
    "method-wanda": (["--method", "wanda"], _check_method),
    "method-magnitude": (["--method", "magnitude"], _check_method),
    "outliers-none": (["--outliers", "none"], _check_no_outliers),
    "outliers-2/64": (["--outliers", "2/64"], _check_outliers_2_64),
    "outlier-structure-unstructured": (["--outlier-structure", "unstructured"], _check_unstructured_outliers),
    # (reconstruction off: it tunes the scales row by row, so a per-tensor scale would not stay one value)
    "variance-correction-tensor": (["--variance-correction", "tensor", "--reconstruct", "0"], _check_vc_tensor),
    "variance-correction-channel": (["--variance-correction", "channel"], _check_vc_channel),
    # two independent parts of the format in one run: no scale tensor (the default), shift tensors present
    "mean-shift": (["--mean-shift"], lambda *a: (_check_vc_none(*a), _check_mean_shift(*a))),
    "equalize-0.5": (["--equalize", "0.5"], _check_equalize),
    "percdamp": (["--percdamp", "0.5"], _check_changes_values("percdamp", 0.5)),
    "no-true-sequential": (["--no-true-sequential"], _check_changes_values("true_sequential", False)),
    "seed": (["--seed", "1"], _check_changes_values("seed", 1)),
    "calibration-size": (["--nsamples", "2", "--seqlen", "48"], _check_changes_values("seqlen", 48)),
    "calib": (["--calib", str(default_eval_path())], _check_changes_values("calib", str(default_eval_path()))),
    "reconstruct-off": (["--reconstruct", "0"],
                        lambda out, base, spec, rep: (_check_changes_values("reconstruct", 0)(out, base, spec, rep),
                                                      _check_no_reconstruction_report(rep))),
    "reconstruct+lr": (["--reconstruct", "10", "--reconstruct-lr", "2e-4"],
                       lambda out, base, spec, rep: (_check_changes_values("reconstruct", 10)(out, base, spec, rep),
                                                     _check_recorded("reconstruct_lr", 2e-4)(out, base, spec, rep),
                                                     _check_reconstruction_report(rep))),
    # SparseGPT's block size only batches the same updates (rounding changes): check it is accepted and recorded.
    "blocksize+threads+device": (["--blocksize", "32", "--threads", "2", "--device", "cpu"],
                                 _check_recorded("blocksize", 32)),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_recipe_option_takes_effect(tiny_llama, baseline, tmp_path, option):
    extra, check = OPTIONS[option]
    out = tmp_path / "ckpt"
    assert _compress(tiny_llama, out, *extra) == 0
    rep = json.loads((out / "nm16_report.json").read_text())
    spec = None
    if "quantization_config" in json.loads((out / "config.json").read_text()):
        assert validate_checkpoint(out) == 14
        spec = fmt.read_spec(out)
    check(out, baseline, spec, rep)


# ------------------------------------------------------------------------------------------------- refused up front
REFUSED = [
    (["--pattern", "2:4", "--blocksize", "6"], "multiple of M=4"),
    (["--percdamp", "-0.1"], "percdamp"),
    (["--percdamp", "nan"], "percdamp"),
    (["--outliers", "4/65536"], "outlier_block"),
    (["--outliers", "4/100"], "multiple of M=16"),
    (["--pattern", "unstructured", "--mean-shift"], "mean shift"),
    (["--outlier-structure", "unstructured", "--mean-shift"], "mean shift"),
    (["--reconstruct-lr", "0"], "reconstruct-lr"),
    (["--device", "mps"], "only cpu and cuda"),
    (["--device", "nonsense"], "not a torch device"),
]


@pytest.mark.parametrize("extra,needle", REFUSED, ids=[" ".join(e) for e, _ in REFUSED])
def test_bad_combinations_refused_before_loading(tiny_llama, tmp_path, capsys, monkeypatch, extra, needle):
    import transformers

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_load)
    out = tmp_path / "out"
    assert _compress(tiny_llama, out, *extra) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_cuda_refused_without_a_gpu(tiny_llama, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert _compress(tiny_llama, tmp_path / "out", "--device", "cuda") == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--nsamples", "0"], ["--seqlen", "-1"], ["--blocksize", "0"], ["--threads", "0"],
                                   ["--method", "obs"], ["--equalize", "2"],
                                   ["--reconstruct", "-1"]])
def test_bad_values_refused_by_argparse(tiny_llama, tmp_path, capsys, extra):
    with pytest.raises(SystemExit) as e:
        _compress(tiny_llama, tmp_path / "out", *extra)
    assert e.value.code == 2 and extra[0] in capsys.readouterr().err


def test_outlier_block_dividing_no_layer_is_refused(tiny_llama, tmp_path, capsys):
    """4/96 is a valid budget for 8:16, but no in_features of the tiny model (64, 128) is a multiple of 96: nothing
    could be compressed, so the run is refused instead of writing an all-dense 'nm16' checkpoint."""
    out = tmp_path / "out"
    assert _compress(tiny_llama, out, "--outliers", "4/96") == 2
    err = capsys.readouterr().err
    assert "no linear layer can be compressed" in err and "96" in err
    assert not out.exists()
