"""Control: exclude/include by module, disable(), validated pattern names, bounded cache, retraces, logging."""

import logging
import os
import subprocess
import sys
import warnings

import mlx.core as mx
import mlx.nn as nn
import pytest

import mlx_fusion
from mlx_fusion import FusionConfig, FusionRetraceWarning
from mlx_fusion._fusion_state import CACHE_SIZE, RETRACE_WARN_AFTER
from mlx_fusion.config import fusion_config, pattern_names
from mlx_fusion.models.demos import MLP


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 64)
        self.body = MLP(width=64, depth=2)
        self.head = nn.Linear(64, 64)

    def __call__(self, ids):
        return nn.relu(self.head(self.body(self.embed(ids))))


@pytest.fixture
def net():
    mx.random.seed(0)
    return Net(), mx.array([[1, 2, 3, 4, 5, 6, 7, 8]])


def decisions(model, x, **kw):
    with fusion_config(min_tensor_size=0):
        report = mlx_fusion.explain(model, x, **kw)
    return {d.module: (d.fused, d.reason) for d in report.candidates}


def test_nothing_excluded(net):
    assert {m: f for m, (f, _) in decisions(*net).items()} == {"body.layers.0": True, "body.layers.1": True,
                                                               "head": True}


def test_exclude_by_path_glob_and_type(net):
    got = decisions(*net, exclude=["head"])
    assert got["head"] == (False, "excluded by module: head matches exclude 'head'")
    assert got["body.layers.0"][0] and got["body.layers.1"][0]
    got = decisions(*net, exclude=["body.layers.*"])
    assert [m for m, (f, _) in got.items() if f] == ["head"]
    got = decisions(*net, exclude=["body"])  # a path covers everything below it
    assert [m for m, (f, _) in got.items() if f] == ["head"]
    got = decisions(*net, exclude=[nn.Linear])
    assert not any(f for f, _ in got.values()) and "matches exclude 'Linear'" in got["head"][1]
    got = decisions(*net, exclude=[MLP])
    assert [m for m, (f, _) in got.items() if f] == ["head"]


def test_include_only(net):
    got = decisions(*net, include=["body.layers.1"])
    assert [m for m, (f, _) in got.items() if f] == ["body.layers.1"]
    assert got["head"] == (False, "excluded by module: head is not in include")


def test_excluded_fuse_is_still_right(net):
    model, x = net
    fused = mlx_fusion.fuse(model, exclude=["head"])
    with fusion_config(min_tensor_size=0):
        out = fused(x)
    assert mx.allclose(out, model(x)).item()
    assert fused.fusion_stats.by_pattern == {"linear+bias+relu": 2}


def test_exclude_entries_are_checked():
    with pytest.raises(TypeError, match="module paths"):
        mlx_fusion.fuse(MLP(64, 1), exclude=[3])


def test_disable_as_context_manager_and_decorator(net):
    model, x = net
    fused = mlx_fusion.fuse(model)
    with fusion_config(min_tensor_size=0):
        with mlx_fusion.disable():
            fused(x)
        assert fused.fusion_graphs == []  # not even traced

        @mlx_fusion.disable()
        def run():
            return fused(x)

        assert mx.allclose(run(), model(x)).item() and fused.fusion_graphs == []
        fused(x)
    assert len(fused.fusion_graphs) == 1


def test_unknown_pattern_name_raises_with_the_valid_ones():
    with pytest.raises(ValueError) as e:
        FusionConfig(enabled_patterns={"linear+bias+gleu"})
    assert "'linear+bias+gleu'" in str(e.value) and "linear+bias+gelu" in str(e.value)
    assert {"add+relu", "linear+bias+gelu", "BinaryActivation"} <= pattern_names()
    FusionConfig(enabled_patterns={"linear+bias+gelu", "ScalarActivation"})  # valid ones pass


def test_trace_cache_is_bounded_and_retraces_warn_once():
    f = mlx_fusion.fuse(lambda x: nn.relu(x + 1.0))
    with fusion_config(min_tensor_size=0), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in range(1, CACHE_SIZE + 6):
            f(mx.ones((n,)))
    retrace = [w for w in caught if issubclass(w.category, FusionRetraceWarning)]
    assert len(retrace) == 1
    msg = str(retrace[0].message)
    assert f"traced {RETRACE_WARN_AFTER} times" in msg and "input 0 changed shape" in msg
    assert len(f._fusion.cache) == CACHE_SIZE and len(f.graphs) <= CACHE_SIZE


def test_log_channels(caplog):
    f = mlx_fusion.fuse(lambda x: nn.relu(x + 1.0))
    with caplog.at_level(logging.INFO, logger="mlx_fusion"), fusion_config(min_tensor_size=0):
        f(mx.ones((4,)))
        f(mx.ones((5,)))
    by = {r.name for r in caplog.records}
    assert {"mlx_fusion.fusions", "mlx_fusion.retraces"} <= by
    assert any("fused scalar-add+relu at (top)" in r.getMessage() for r in caplog.records)
    assert any("input 0 changed shape (4,) -> (5,)" in r.getMessage() for r in caplog.records)


def test_log_env_var_prints_on_stderr(tmp_path):
    script = tmp_path / "user.py"
    script.write_text("import mlx.core as mx, mlx.nn as nn, mlx_fusion\n"
                      "f = mlx_fusion.fuse(lambda x: x.sum().item() + nn.relu(x))\n"
                      "f(mx.ones((4,)))\n")
    env = {**os.environ, "MLX_FUSION_LOG": "fallbacks,retraces"}
    r = subprocess.run([sys.executable, "-W", "ignore", str(script)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "mlx_fusion.fallbacks:" in r.stderr and "could not trace" in r.stderr
    assert "user.py:2: f = mlx_fusion.fuse(lambda x: x.sum().item()" in r.stderr  # the line that failed


def test_exclude_reaches_the_children_of_a_split_call():
    from mlx_lm.models import llama
    from mlx_lm.models.cache import make_prompt_cache

    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=100, num_key_value_heads=2)
    mx.random.seed(0)
    model, x = llama.Model(args), mx.array([[1, 2, 3, 4]])
    with fusion_config(min_tensor_size=0):  # a cache argument: the model runs split, its MLPs traced alone
        report = mlx_fusion.explain(model, x, cache=make_prompt_cache(model), compile=False,
                                    exclude=["model.layers.1"])
    got = {d.module: (d.fused, d.reason) for d in report.candidates}
    assert got["model.layers.0.mlp"][0]  # the gated unit silu(gate) * up
    assert got["model.layers.1.mlp"] == (
        False, "excluded by module: model.layers.1 matches exclude 'model.layers.1'")
    assert all(f.split for f in report.fallbacks)
