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
