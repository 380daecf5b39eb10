"""benchmarks/ablation.py: row names -> recipes (no model is run)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from offline.recipe import Recipe

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))  # ablation.py imports common.py beside it, as it does when run as a script
_spec = importlib.util.spec_from_file_location("ablation", BENCH / "ablation.py")
ablation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablation)


def test_rows_are_one_change_from_the_default():
    default = dataclasses.asdict(Recipe())
    assert ablation.row_recipe("dense") is None
    assert ablation.row_recipe("default") == default
    assert ablation.row_recipe("default -outliers") == {**default, "outliers": None}
    assert ablation.row_recipe("default -variance_correction") == {**default, "variance_correction": "none"}
    assert ablation.row_recipe("default -equalize") == {**default, "equalize": None}
    assert ablation.row_recipe("default +mean_shift") == {**default, "mean_shift": True}
    assert ablation.row_recipe("default nsamples=128 outliers=6/192 equalize=0.25") == {
        **default, "nsamples": 128, "outliers": "6/192", "equalize": 0.25}
    assert ablation.row_recipe("default outliers=none equalize=none") == {**default, "outliers": None,
                                                                          "equalize": None}


@pytest.mark.parametrize("row", ["sparse", "default -nothing", "default +equalize", "default calib=x",
                                 "default bogus=1", "default nsamples=0", "default equalize=2"])
def test_bad_rows_are_refused(row):
    with pytest.raises(ValueError):
        ablation.row_recipe(row)


def test_merge_adds_each_run_once(tmp_path):
    import json

    run = lambda row, ppl: {"row": row, "perplexity": ppl, "settings": {"text": "t"}, "commit": "abc"}  # noqa: E731
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "sub" / "out.json"
    a.write_text(json.dumps({"runs": [run("dense", 10.0)]}))
    b.write_text(json.dumps({"runs": [run("default", 14.0), run("dense", 10.0)]}))
    assert ablation.main(["--merge", str(a), str(b), "--out", str(out)]) == 0
    assert [r["row"] for r in json.loads(out.read_text())["runs"]] == ["dense", "default"]
    assert ablation.main(["--merge", str(b), "--out", str(out)]) == 0   # again: nothing new
    assert len(json.loads(out.read_text())["runs"]) == 2
