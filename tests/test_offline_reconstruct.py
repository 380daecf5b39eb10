"""Block-wise reconstruction (``--reconstruct STEPS``): it lowers the block output error against the dense block on
the calibration data, leaves every mask (and so every pruned zero) as it was, is deterministic for a seed, is
recorded in the checkpoint, and a bad value is refused before any model is loaded."""

from __future__ import annotations

import json

import pytest
import torch

from offline import cli
from offline.nm16_loading import read_safetensors_folder, validate_checkpoint
from vllm_nm16 import format as fmt

FAST = ["--nsamples", "4", "--seqlen", "32", "--quiet", "--threads", "1"]
STEPS = "40"


def _compress(src, out, *extra) -> int:
    return cli.compress_main([str(src), str(out), *FAST, *extra])


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)   # --threads 1 must not leak into other test modules


@pytest.fixture(scope="module")
def ckpts(tiny_llama, tmp_path_factory):
    """The default recipe with variance correction and the mean shift (every stored part: values, outliers, scale,
    shift), without and with reconstruction, and the latter once more (determinism)."""
    root = tmp_path_factory.mktemp("recon")
    out = {}
    for name, extra in (("off", ["--reconstruct", "0"]), ("on", ["--reconstruct", STEPS]),
                        ("again", ["--reconstruct", STEPS])):
        # (variance correction on: the scales are among what reconstruction tunes)
        assert _compress(tiny_llama, root / name, "--mean-shift", "--variance-correction", "channel", *extra) == 0
        out[name] = root / name
    return out


def _calibration(model_dir, calib_text):
    from transformers import AutoTokenizer

    from offline.calibration import calibration_samples

    return calibration_samples(AutoTokenizer.from_pretrained(model_dir), calib_text, 4, 32, 0)


def test_reconstruction_lowers_block_output_error(tiny_llama, calib_text, monkeypatch):
    """In memory, same calibration data: the first block's output (same inputs in both runs: the embeddings) is closer
    to the dense block's with reconstruction, and so are the model's final hidden states; the compressor's own
    per-block numbers agree."""
    from transformers import AutoModelForCausalLM

    from offline.compressor import Recipe, compress_model

    samples = _calibration(tiny_llama, calib_text)

    def load():
        return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()

    dense = load()
    with torch.no_grad():
        ref = dense(input_ids=samples, output_hidden_states=True).hidden_states
    import offline.compressor as compressor

    seen = {}   # (block, layer) -> the pruning's masks and values, as handed to the reconstruction

    def spy(block, inputs, targets, layers, **kw):
        i = len({b for b, _ in seen})
        seen.update({(i, n): (p.mask.clone(), p.outlier_mask.clone(), p.values.clone()) for n, p in layers.items()})
        res = reconstruct(block, inputs, targets, layers, **kw)
        for n, p in res.layers.items():   # what the pruning chose is what comes back
            assert torch.equal(p.mask, seen[i, n][0]) and torch.equal(p.outlier_mask, seen[i, n][1]), n
            assert not bool(p.values[~p.mask].ne(0).any()) and not bool(p.outliers[~p.outlier_mask].ne(0).any())
            assert not torch.equal(p.values, seen[i, n][2]), n
        return res

    reconstruct = compressor.reconstruct_block
    errs = {}
    for steps in (0, int(STEPS)):
        model = load()
        monkeypatch.setattr(compressor, "reconstruct_block", spy)
        spec, results, _, info = compress_model(model, samples,
                                                Recipe(nsamples=4, seqlen=32, reconstruct=steps), progress=False)
        monkeypatch.undo()
        if steps:   # the packed masks are the pruning's
            assert len(seen) == 14
            for (i, n), (mask, outlier_mask, _) in seen.items():
                res = results[f"model.layers.{i}.{n}"]
                up = fmt.unpack(res.tensors, spec)
                b = spec.outlier_block
                idx = res.tensors[fmt.OUTLIER_INDEX].to(torch.int64).reshape(mask.shape[0], -1, spec.outliers_per_block)
                pos = torch.zeros(mask.shape[0], mask.shape[1] // b, b, dtype=torch.bool).scatter_(-1, idx, True)
                assert torch.equal(pos.reshape(mask.shape), outlier_mask), (i, n)
                assert torch.equal(up.keep & ~outlier_mask, mask), (i, n)
                assert torch.equal(up.effective_weight(), res.w_eff), (i, n)
                assert res.parts is None and res.keep is None   # dropped after the block
        with torch.no_grad():
            hs = model(input_ids=samples, output_hidden_states=True).hidden_states
            block0 = model.model.layers[0](ref[0], position_embeddings=model.model.rotary_emb(
                ref[0], torch.arange(samples.shape[1])[None]))
            block0 = block0[0] if isinstance(block0, tuple) else block0
            dense0 = dense.model.layers[0](ref[0], position_embeddings=dense.model.rotary_emb(
                ref[0], torch.arange(samples.shape[1])[None]))
            dense0 = dense0[0] if isinstance(dense0, tuple) else dense0
        errs[steps] = (float((block0 - dense0).pow(2).mean()), float((hs[-1] - ref[-1]).pow(2).mean()))
        if steps:
            rec = info["reconstruction"]
            assert set(rec) == {"model.layers.0", "model.layers.1"}
            for r in rec.values():
                assert r["applied"] and r["rel_error_after"] < 0.8 * r["rel_error_before"], rec
        else:
            assert "reconstruction" not in info
    assert errs[int(STEPS)][0] < 0.8 * errs[0][0], errs
    assert errs[int(STEPS)][1] < errs[0][1], errs


def test_masks_unchanged_and_pruned_positions_zero(ckpts):
    """The first block (same inputs, so same pruning in both runs) has the same masks and outlier positions with and
    without reconstruction; in every layer kept slots that hold an outlier stay zero; the values, outliers, scales
    and shifts did change; the checkpoints validate and record the option. (Later blocks see other inputs once the
    first is reconstructed, so their masks may differ: the in-memory test checks them against the pruning.)"""
    for name in ("off", "on"):
        validate_checkpoint(ckpts[name])
    spec = fmt.read_spec(ckpts["on"])
    assert spec.recipe["reconstruct"] == int(STEPS) and spec.recipe["reconstruct_lr"] == 1e-4
    assert fmt.read_spec(ckpts["off"]).recipe["reconstruct"] == 0
    off = fmt.split_layer_tensors(read_safetensors_folder(ckpts["off"]))
    on = fmt.split_layer_tensors(read_safetensors_folder(ckpts["on"]))
    assert set(on) == set(off) and len(on) == 14
    changed = {s: 0 for s in (fmt.VALUES, fmt.OUTLIER_VALUES, fmt.SCALE, fmt.SHIFT)}
    for prefix in on:
        a, b = off[prefix], on[prefix]
        if prefix.startswith("model.layers.0."):
            assert torch.equal(a[fmt.MASK], b[fmt.MASK]), prefix
            assert torch.equal(a[fmt.OUTLIER_INDEX], b[fmt.OUTLIER_INDEX]), prefix
        ub = fmt.unpack(b, spec)
        slots = ub.keep & (ub.outliers != 0)   # kept N:M slots holding an outlier
        assert not bool(ub.weight_nm[slots].ne(0).any()), prefix
        for s in changed:
            changed[s] += int(not torch.equal(a[s], b[s]))
    assert all(v == 14 for v in changed.values()), changed


def test_deterministic_for_a_seed(ckpts):
    a = read_safetensors_folder(ckpts["on"])
    b = read_safetensors_folder(ckpts["again"])
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = json.loads((ckpts["on"] / "nm16_report.json").read_text())["reconstruction"]
    rb = json.loads((ckpts["again"] / "nm16_report.json").read_text())["reconstruction"]
    assert {k: (v["rel_error_before"], v["rel_error_after"]) for k, v in ra.items()} == \
        {k: (v["rel_error_before"], v["rel_error_after"]) for k, v in rb.items()}


def test_learning_rate_is_used_and_recorded(tiny_llama, ckpts, tmp_path):
    out = tmp_path / "lr"
    assert _compress(tiny_llama, out, "--mean-shift", "--reconstruct", STEPS, "--reconstruct-lr", "3e-4") == 0
    assert fmt.read_spec(out).recipe["reconstruct_lr"] == 3e-4
    a, b = read_safetensors_folder(ckpts["on"]), read_safetensors_folder(out)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith(fmt.VALUES))


def test_unstructured_pattern_keeps_its_zeros(tiny_llama, tmp_path):
    """Dense output (no nm16 packing): the written weights have exactly the zeros of the run without
    reconstruction."""
    from safetensors.torch import load_file

    outs = {}
    for steps in ("0", "20"):
        outs[steps] = tmp_path / steps
        assert _compress(tiny_llama, outs[steps], "--pattern", "unstructured", "--outliers", "none",
                         "--reconstruct", steps) == 0
    a = load_file(str(outs["0"] / "model.safetensors"))
    b = load_file(str(outs["20"] / "model.safetensors"))
    w = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a[w].eq(0), b[w].eq(0)) and not torch.equal(a[w], b[w])
    assert json.loads((outs["20"] / "nm16_report.json").read_text())["recipe"]["reconstruct"] == 20


def test_reconstruct_block_function_keeps_masks(tiny_llama, calib_text):
    """The plain function: masked entries stay exactly zero, the returned error is below the starting one, the
    block is handed back with its own modules and its parameters' requires_grad as they were."""
    from transformers import AutoModelForCausalLM

    from offline.compressor import capture_block_inputs
    from offline.reconstruct import SparseLinearParts, reconstruct_block

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    xs, kwargs = capture_block_inputs(model, _calibration(tiny_llama, calib_text), 2, "cpu")
    block = model.model.layers[0]
    with torch.no_grad():
        targets = [block(x, **kwargs) for x in xs]
        targets = [t[0] if isinstance(t, tuple) else t for t in targets]
    gen = torch.Generator().manual_seed(0)
    layers = {}
    for n in ("mlp.up_proj", "self_attn.o_proj"):
        w = block.get_submodule(n).weight.detach().float()
        keep = fmt.nm_keep_topk(w.abs(), 8, 16)
        layers[n] = SparseLinearParts((w * keep).bfloat16().float(), keep,
                                      scale=1 + 0.01 * torch.randn(w.shape[0], generator=gen))
        with torch.no_grad():
            block.get_submodule(n).weight.copy_(layers[n].effective_weight())
    originals = {n: block.get_submodule(n) for n in layers}
    res = reconstruct_block(block, xs, targets, layers, steps=30, lr=1e-3, seed=0, kwargs=kwargs)
    assert res.applied and res.rel_error_after < res.rel_error_before
    for n, p in res.layers.items():
        assert block.get_submodule(n) is originals[n]
        assert torch.equal(p.mask, layers[n].mask)
        assert not bool(p.values[~p.mask].ne(0).any())
        assert torch.equal(p.values, p.values.bfloat16().float())   # stored dtype
        assert not torch.equal(p.values, layers[n].values) and not torch.equal(p.scale, layers[n].scale)
    assert all(p.requires_grad for p in block.parameters())


@pytest.mark.parametrize("extra,needle", [(["--reconstruct", "-1"], "--reconstruct"),
                                          (["--reconstruct", "2.5"], "--reconstruct")])
def test_bad_steps_refused_by_argparse(tiny_llama, tmp_path, capsys, extra, needle):
    with pytest.raises(SystemExit) as e:
        _compress(tiny_llama, tmp_path / "out", *extra)
    assert e.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options,needle", [({"reconstruct": -1}, "--reconstruct"),
                                            ({"reconstruct": True}, "--reconstruct"),
                                            ({"reconstruct": 10, "reconstruct_lr": 0.0}, "--reconstruct-lr"),
                                            ({"reconstruct": 10, "reconstruct_lr": float("nan")}, "--reconstruct-lr")])
def test_bad_values_refused_before_loading(tiny_llama, tmp_path, monkeypatch, options, needle):
    import transformers

    import offline
    from offline.api import CompressError

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_load)
    with pytest.raises(CompressError, match=needle):
        offline.compress(tiny_llama, tmp_path / "out", progress=False, **options)
    assert not (tmp_path / "out").exists()
