"""Fixtures shared by the test modules (their helpers live in tests/util_*.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the util_* helpers, for spawned children too

from util_train import TINY, run_train  # noqa: E402


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted run of TINY (checkpoint dir inside its run dir), shared by the resume tests."""
    run_dir = tmp_path_factory.mktemp("reference")
    run_train(run_dir, *TINY)
    return run_dir


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    # One embedded build per test run, in a temp cache (the data test modules share it).
    path = tmp_path_factory.getbasetemp() / "minimax_cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture
def data_cache_env(cache_dir, monkeypatch):
    """MINIMAX_CACHE pointed at the shared temp cache (the data modules use it for every test)."""
    monkeypatch.setenv("MINIMAX_CACHE", str(cache_dir))


@pytest.fixture(scope="session")
def tok(cache_dir):
    """The default (embedded) tokenizer, built once into the shared temp cache."""
    from minimax_train.data import DataConfig, load_tokenizer

    old = os.environ.get("MINIMAX_CACHE")
    os.environ["MINIMAX_CACHE"] = str(cache_dir)
    try:
        return load_tokenizer(DataConfig())
    finally:
        if old is None:
            del os.environ["MINIMAX_CACHE"]
        else:
            os.environ["MINIMAX_CACHE"] = old
