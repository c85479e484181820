"""Shared test setup: no test reads or writes the user's real caches."""

import pytest


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "mlx-fusion-cache"
    monkeypatch.setenv("MLX_FUSION_CACHE", str(cache))
    monkeypatch.setenv("MLX_FUSION_COREML_CACHE", str(cache / "coreml"))
    from mlx_fusion import tracker

    tracker.reset_default_tracker()
    yield
    tracker.reset_default_tracker()
