"""nm16-compress under faults (issue 14): a truncated or NaN/Inf-holding input is refused naming the tensor; a full
disk while writing leaves nothing (or the old output, untouched) and says so; SIGKILL at any of 20 points (named fault
points across calibration, per-layer work and writing, plus random delays) never leaves a folder at the output path
(or, with --overwrite, leaves the old complete checkpoint), and a re-run then succeeds and clears what the killed runs
left next to it. The existing-output refusal (--overwrite) is tested in test_offline_compress.py."""

from __future__ import annotations

import errno
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from offline import cli
from offline.nm16_loading import validate_checkpoint

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--nsamples", "4", "--seqlen", "32", "--quiet"]


def _compress(src, out, *extra) -> int:
    return cli.compress_main([str(src), str(out), *FAST, *extra])


def _error(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("cut", [1, 5000, 10**9])
def test_truncated_input_is_refused_naming_the_tensor(tiny_llama, tmp_path, capsys, cut):
    src = _copy(tiny_llama, tmp_path / "src")
    f = src / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    size = len(data) - min(cut, len(data) - 8 - n)  # 10**9: every tensor's data is gone, the header is intact
    f.write_bytes(data[:size])
    data_len = size - 8 - n
    first_cut = min((v["data_offsets"][0], k) for k, v in header.items()
                    if k != "__metadata__" and v["data_offsets"][1] > data_len)[1]
    out = tmp_path / "out"
    assert _compress(src, out) == 2
    err = _error(capsys)
    assert "truncated" in err and f"tensor {first_cut} " in err, err
    assert not out.exists() and not _leftovers(out)


def test_truncated_header_is_refused(tiny_llama, tmp_path, capsys):
    src = _copy(tiny_llama, tmp_path / "src")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])  # inside the JSON header
    out = tmp_path / "out"
    assert _compress(src, out) == 2
    err = _error(capsys)
    assert "model.safetensors" in err and "truncated" in err, err
    assert not out.exists() and not _leftovers(out)


@pytest.mark.parametrize("name,value", [("model.layers.0.self_attn.k_proj.weight", float("inf")),
                                        ("model.embed_tokens.weight", float("-inf")),
                                        ("model.norm.weight", float("nan"))])
def test_non_finite_input_is_refused_naming_the_tensor(tiny_llama, tmp_path, capsys, name, value):
    src = _copy(tiny_llama, tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    state[name].view(-1)[7] = value
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert _compress(src, out) == 2
    err = _error(capsys)
    assert name in err and "NaN/Inf" in err, err
    assert not out.exists() and not _leftovers(out)


# ------------------------------------------------------------------------------------------------------ full disk
def _disk_full_after(nbytes: int):
    """A safetensors save_file that writes ``nbytes`` of the file, then fails as a full disk does."""
    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\0" * nbytes)
        raise OSError(errno.ENOSPC, "No space left on device", filename)
    return save_file


def test_disk_full_leaves_nothing_and_says_so(tiny_llama, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _disk_full_after(4096))
    out = tmp_path / "out"
    assert _compress(tiny_llama, out, "--method", "magnitude") == 1
    err = _error(capsys)
    assert "disk full" in err and "nothing was written" in err and str(out) in err and "not created" in err, err
    assert not out.exists() and not _leftovers(out)


def test_disk_full_keeps_the_old_output(tiny_llama, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert _compress(tiny_llama, out, "--method", "magnitude") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setenv("NM16_FAULT", "enospc:report")  # the injected fault, after the shards were written
    assert _compress(tiny_llama, out, "--method", "magnitude", "--overwrite") == 1
    err = _error(capsys)
    assert "disk full" in err and "left unchanged" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not _leftovers(out)


# ---------------------------------------------------------------------------------------------------------- SIGKILL
# 12 named points (calibration, model load, per-layer statistics and layers, each write step, the final rename) + 4
# random delays for a new output; 3 named points for --overwrite of an existing one.
KILL_POINTS = ["calibration", "model-loaded", "stats.model.layers.0.*", "linear.model.layers.0.mlp.down_proj",
               "block.model.layers.0", "linear.model.layers.1.self_attn.v_proj", "shard.model.safetensors",
               "shard.model.safetensors.done", "config", "report", "validated", "rename"]
RANDOM_KILLS = 4
OVERWRITE_KILL_POINTS = ["linear.model.layers.1.self_attn.o_proj", "rename", "exchanged"]


def _drive(scenarios: list[dict], tmp_path: Path) -> list[dict]:
    job, result = tmp_path / "job.json", tmp_path / "result.json"
    job.write_text(json.dumps({"scenarios": scenarios}))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "compress_kill_driver.py"), str(job), str(result)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0 and result.is_file(), proc.stderr[-3000:]
    return json.loads(result.read_text())


def test_sigkill_anywhere_leaves_no_checkpoint_and_rerun_succeeds(tiny_llama, calib_text, tmp_path):
    out = tmp_path / "ckpt"
    calib = tmp_path / "calib.txt"  # a short text: the children tokenize it whole, quickly
    calib.write_text(calib_text.read_text(encoding="utf-8")[:6000], encoding="utf-8")
    argv = [str(tiny_llama), str(out), "--nsamples", "2", "--seqlen", "32", "--quiet", "--threads", "1",
            "--calib", str(calib)]
    rng = random.Random(14)
    scenarios = [{"argv": argv, "out": str(out), "log": True, "reset": True}]
    scenarios += [{"argv": argv, "out": str(out), "fault": f"kill:{p}", "reset": True} for p in KILL_POINTS]
    scenarios += [{"argv": argv, "out": str(out), "delay_frac": round(rng.uniform(0.05, 0.8), 3), "reset": True}
                  for _ in range(RANDOM_KILLS)]
    ow = tmp_path / "ckpt-ow"
    ow_argv = [*argv[:1], str(ow), *argv[2:], "--overwrite"]
    scenarios += [{"argv": ow_argv, "out": str(ow)}]  # the existing checkpoint that --overwrite runs replace
    scenarios += [{"argv": ow_argv, "out": str(ow), "fault": f"kill:{p}"} for p in OVERWRITE_KILL_POINTS]
    recs = _drive(scenarios, tmp_path)

    clean = recs[0]
    assert clean["rc"] == 0 and clean["out_exists"], clean
    points = clean["points"]
    print(f"clean run {clean['seconds']:.2f} s through {len(points)} fault points")
    killed = 0
    for rec in recs[1:1 + len(KILL_POINTS) + RANDOM_KILLS]:
        sc = rec["scenario"]
        if "fault" in sc:
            assert rec["killed"], f"{sc}: the fault point was never reached ({rec})"
        if rec["killed"]:
            killed += 1
            assert not rec["out_exists"], f"killed at {sc}: {out} exists, holding {rec['out_files']}"
        else:  # a random delay longer than the run: it must have completed
            assert rec["rc"] == 0 and rec["out_digest"] == clean["out_digest"], rec
        for t in rec["temporaries"]:  # what a SIGKILL leaves: hidden temporary folders only, never the output
            assert ".nm16-tmp-" in t, rec
    assert killed >= len(KILL_POINTS) + 1, f"only {killed} runs were killed"  # a delay may outlast a fast run

    base = recs[1 + len(KILL_POINTS) + RANDOM_KILLS]
    assert base["rc"] == 0 and base["out_exists"], base
    for rec in recs[2 + len(KILL_POINTS) + RANDOM_KILLS:]:
        assert rec["killed"], rec
        # --overwrite killed anywhere: the output is the old or the new checkpoint, complete (here: identical bytes)
        assert rec["out_digest"] == base["out_digest"], rec

    # The re-run succeeds and clears what the killed runs left next to the output.
    assert cli.compress_main(argv) == 0
    assert validate_checkpoint(out) == 14
    assert not _leftovers(out)
    assert cli.compress_main(ow_argv) == 0
    assert validate_checkpoint(ow) == 14 and not _leftovers(ow)
    assert torch.equal(load_file(str(out / "model.safetensors"))["model.layers.0.mlp.down_proj.weight_values"],
                       load_file(str(ow / "model.safetensors"))["model.layers.0.mlp.down_proj.weight_values"])
