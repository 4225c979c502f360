"""Backbone tests: never look at a real Hugging Face cache (tests/conftest.py already sets HF_HUB_OFFLINE and
float32 matmul precision)."""

import pytest


@pytest.fixture(autouse=True)
def _empty_hub_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub-cache"))
