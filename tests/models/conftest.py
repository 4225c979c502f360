"""Shared setup for the backbone tests: fp32 matmuls, never touch the network, small random references."""

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "float32")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No test may download: HF offline, and an empty private hub cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub-cache"))
