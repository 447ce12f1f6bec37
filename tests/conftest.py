"""Shared fixtures: one embedded model per test session, in a temporary cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """Build the embedded model once per session, away from the user's own cache."""
    cache = Path(os.environ.get("QWEN_PIPELINE_TEST_CACHE") or tmp_path_factory.mktemp("qwen_cache"))
    os.environ["QWEN_PIPELINE_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def embedded_dir(model_cache) -> Path:
    from qwen_pipeline.embedded import ensure_embedded_model

    return ensure_embedded_model()


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from qwen_pipeline.models import EMBEDDED_MODEL, load_tokenizer

    return load_tokenizer(EMBEDDED_MODEL)
