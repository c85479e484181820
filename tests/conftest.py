"""Shared test setup: no test reads or writes the user's real caches."""

import pytest


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test's own cache directory (tests may take it by name)."""
    cache = tmp_path / "mlx-fusion-cache"
    cache.mkdir()
    monkeypatch.setenv("MLX_FUSION_CACHE", str(cache))
    monkeypatch.setenv("MLX_FUSION_COREML_CACHE", str(cache / "coreml"))
    # Tests check what the optimizer does, not what this machine measured: the shipped
    # priors (mlx_fusion/data/priors-*.json) are off unless a test turns them on.
    monkeypatch.setenv("MLX_FUSION_NO_PRIORS", "1")
    from mlx_fusion import tracker

    tracker.reset_default_tracker()
    yield cache
    tracker.reset_default_tracker()
