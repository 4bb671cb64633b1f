"""The compiled example stores the loader tests share (each compiled once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.loader_helpers import compiled_store


@pytest.fixture(scope="session")
def minilm_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compiled_store("minilm", tmp_path_factory)


@pytest.fixture(scope="session")
def llama_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compiled_store("tiny-llama", tmp_path_factory)
