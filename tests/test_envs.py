"""``vllm_nm16/envs.py`` is the one list of environment variables: the README's knob table is generated from it, the
README names no other project variable, and the code reads the environment only through it."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from vllm_nm16 import envs

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SCANNED = ("vllm_nm16", "offline", "benchmarks", "scripts")
# Project variables by prefix, plus the one foreign variable the plugin reads.
PROJECT_VAR = re.compile(r"\b(?:VLLM_NM16_[A-Z0-9_]+|NM16_[A-Z0-9_]+|SMOLLM_[A-Z0-9_]+|TRITON_INTERPRET)\b")

# Files that still read os.environ themselves (they belong to the kernel-backend rework, which switches them to
# ``vllm_nm16.envs``): take a file out once it does, and leave this empty afterwards.
KNOWN_DIRECT_READS: dict[str, set[str]] = {
}


def _is_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ" or isinstance(node, ast.Name) and \
        node.id == "environ"


def direct_reads(path: Path) -> set[str]:
    """Variables read with ``os.environ.get(NAME)`` / ``os.getenv(NAME)`` / ``os.environ[NAME]`` (writes such as
    ``setdefault`` and copies such as ``dict(os.environ, ...)`` are not reads of one variable)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        key = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            f = node.func
            if f.attr == "get" and _is_environ(f.value) or f.attr == "getenv":
                key = node.args[0]
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _is_environ(node.value):
            key = node.slice
        if key is not None:
            found.add(key.value if isinstance(key, ast.Constant) else ast.unparse(key))
    return found


def test_readme_table_is_generated_from_envs():
    assert envs.markdown_table() in README.read_text(encoding="utf-8"), \
        "README knob table is stale: paste the output of `python -m vllm_nm16.envs`"


def test_readme_names_only_known_variables():
    named = set(PROJECT_VAR.findall(README.read_text(encoding="utf-8")))
    known = {v.name for v in envs.ENV_VARS}
    assert named - known == set(), f"README names variables missing from vllm_nm16/envs.py: {sorted(named - known)}"
    assert known - named == set(), f"variables of vllm_nm16/envs.py missing from the README: {sorted(known - named)}"


def test_code_reads_the_environment_through_envs():
    known = {v.name for v in envs.ENV_VARS}
    direct, unknown = {}, {}
    for pkg in SCANNED:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "vllm_nm16/envs.py":
                continue
            reads = direct_reads(path)
            if reads - known:
                unknown[rel] = sorted(reads - known)
            if reads:
                direct[rel] = reads
    assert not unknown, f"environment variables read but not declared in vllm_nm16/envs.py: {unknown}"
    assert direct == KNOWN_DIRECT_READS, ("read these through vllm_nm16.envs (or update KNOWN_DIRECT_READS when a "
                                          f"file stopped reading directly): {direct}")


def test_defaults_and_lazy_reads(monkeypatch):
    for v in envs.ENV_VARS:
        monkeypatch.delenv(v.name, raising=False)
    assert envs.VLLM_NM16_BACKEND == "auto" and envs.NM16_SCRATCH_MIN_M == 17
    assert envs.NM16_SCRATCH_CHUNK_MB == 0.0 and envs.NM16_POS_MODE == "lut16" and envs.TRITON_INTERPRET is False
    assert envs.NM16_THREADS is None and envs.NM16_CACHE == ROOT / ".cache"
    assert envs.SMOLLM_BACKENDS == ["triton"] and envs.SMOLLM_SERVE == ["triton", "torch"]
    assert envs.SMOLLM_SERVE_DTYPE == "bfloat16"
    monkeypatch.setenv("VLLM_NM16_BACKEND", "Torch")
    monkeypatch.setenv("NM16_THREADS", "2")
    monkeypatch.setenv("SMOLLM_SERVE", "torch,")
    assert envs.VLLM_NM16_BACKEND == "torch" and envs.NM16_THREADS == 2 and envs.SMOLLM_SERVE == ["torch"]
    assert sorted(envs.environment_variables) == sorted(v.name for v in envs.ENV_VARS)


def test_import_reads_nothing_and_stays_light():
    code = ("import os, sys; os.environ['NM16_SCRATCH_MIN_M'] = 'x'; from vllm_nm16 import envs; "
            "assert 'torch' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
