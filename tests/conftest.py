"""Shared fixtures: the default model/corpus built by `make setup`, and small random Llama checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from offline.assets import default_calib_path, default_eval_path, default_model_dir

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make setup` first")
    return path


@pytest.fixture(scope="session")
def default_model() -> Path:
    return _need(default_model_dir())


@pytest.fixture(scope="session")
def calib_text() -> Path:
    return _need(default_calib_path())


@pytest.fixture(scope="session")
def eval_text() -> Path:
    return _need(default_eval_path())


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, default_model) -> Path:
    """A 2-layer random Llama (hidden 64, 4 heads / 2 KV heads: splits over TP=2) with the default tokenizer."""
    from offline.random_model import make_random_llama

    return make_random_llama(tmp_path_factory.mktemp("tiny_llama"), hidden=64, intermediate=128, layers=2,
                             heads=4, kv_heads=2, seed=0, tokenizer_from=default_model)


@pytest.fixture(scope="session")
def make_llama(tmp_path_factory, default_model):
    """Factory: make_llama(**shape_kwargs) -> a fresh random Llama folder."""
    from offline.random_model import make_random_llama

    def _make(**kw):
        kw.setdefault("tokenizer_from", default_model)
        return make_random_llama(tmp_path_factory.mktemp("llama"), **kw)

    return _make


def pytest_configure(config):
    # Keep test runs hermetic: never reach a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
