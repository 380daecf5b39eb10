"""The package-level API stays callable: ``offline.evaluate`` is both a function and a submodule name."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_evaluate_function_survives_submodule_import():
    # A fresh interpreter: the submodule import must not replace the function bound on the package.
    code = ("import offline; from offline.evaluate import make_windows; "
            "assert callable(offline.evaluate), type(offline.evaluate); "
            "assert callable(offline.compress); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_compress_options_come_from_the_recipe():
    """One declaration: every Recipe field is an nm16-compress option and a keyword of offline.compress, with the
    Recipe's default; anything else is refused by both."""
    import dataclasses

    import pytest

    import offline
    from offline.cli import compress_parser
    from offline.recipe import Recipe

    args = vars(compress_parser().parse_args(["in", "out"]))
    for f in dataclasses.fields(Recipe):
        assert args[f.name] == f.default, f.name
    assert set(args) - {f.name for f in dataclasses.fields(Recipe)} == {
        "model_dir", "out_dir", "device", "strict_divisible", "overwrite", "threads", "quiet"}
    with pytest.raises(TypeError, match="nsample"):
        offline.compress("in", "out", nsample=4)


def test_cli_help_does_not_import_torch():
    code = ("import sys; from offline.cli import compress_parser, eval_parser; compress_parser().format_help(); "
            "eval_parser().format_help(); assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
