"""mlx_fusion.explain: per candidate its pattern, module path, decision and reason (issue 13)."""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest

import mlx_fusion
from mlx_fusion.config import fusion_config
from mlx_fusion.models.demos import GatedMLP, MLP, Transformer


@pytest.fixture
def llama():
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=100, num_key_value_heads=2)
    mx.random.seed(0)
    return llama.Model(args), mx.array([[1, 2, 3, 4]])


def rows(report):
    return [(d.pattern, d.module, d.fused, d.reason) for d in report.candidates]


def test_mlp_fused_with_module_paths_and_model_source():
    mx.random.seed(0)
    model, x = MLP(width=64, depth=2), mx.random.normal((8, 64))
    with fusion_config(min_tensor_size=0):
        report = mlx_fusion.explain(model, x)
    assert [(p, m, f) for p, m, f, _ in rows(report)] == [("linear+bias+relu", "layers.0", True),
                                                         ("linear+bias+relu", "layers.1", True)]
    assert all(d.source == "model" and "model estimate" in d.reason for d in report.candidates)
    assert report.by_pattern == {"linear+bias+relu": 2} and report.fallbacks == []
    assert report.nodes_after < report.nodes_traced


def test_gelu_mlp_demo():
    model, x = MLP(width=64, depth=1, activation=nn.gelu), mx.zeros((8, 64))
    with fusion_config(min_tensor_size=0):
        (d,) = mlx_fusion.explain(model, x).candidates
    assert (d.pattern, d.module, d.fused, d.ops[0]) == ("linear+bias+gelu", "layers.0", True, "AddMM")


def test_small_outputs_are_rejected_below_min_tensor_size():
    model, x = MLP(width=64, depth=2), mx.zeros((8, 64))
    report = mlx_fusion.explain(model, x)
    assert {r for _, _, _, r in rows(report)} == {"below min_tensor_size: 512 < 4096 elements"}
    assert report.fused == [] and "0 of 2 candidates fused" in str(report)


def test_measured_slower_names_the_number_and_its_source(monkeypatch):
    from mlx_fusion import tracker

    monkeypatch.setattr(tracker, "price", lambda *key: tracker.Speedup(0.9, "shipped"))
    with fusion_config(min_tensor_size=0):
        report = mlx_fusion.explain(MLP(width=64, depth=1), mx.zeros((8, 64)))
    (d,) = report.candidates
    assert not d.fused and d.reason == "measured slower: 0.90x (shipped prior)" and d.source == "shipped"


def test_gated_mlp_silu_is_left_to_compile_under_a_compiled_replay():
    model, x = GatedMLP(width=64, hidden=128), mx.zeros((8, 64))
    with fusion_config(min_tensor_size=0):
        compiled = mlx_fusion.explain(model, x)
        eager = mlx_fusion.explain(model, x, compile=False)
    by = {c.pattern: c for c in compiled.candidates}
    d = by["linear+silu"]
    assert (d.module, d.fused) == ("gates.0", False) and d.reason.startswith("left to mx.compile")
    assert by["glu+silu"].fused  # silu(gate) * up: one fused op whose output feeds the down projection
    assert {(c.pattern, c.fused) for c in eager.candidates} == {("linear+silu", False), ("glu+silu", True)}
    assert [c.reason for c in eager.candidates if c.pattern == "linear+silu"][0].startswith("overlaps a better fusion")


def test_disabled_pattern_and_config(llama):
    model, x = llama
    with fusion_config(min_tensor_size=0, enabled_patterns={"add+relu"}):
        report = mlx_fusion.explain(model, x, compile=False)
    assert {d.reason for d in report.candidates} == {f"disabled by config: {p} not in enabled_patterns"
                                                     for p in ("linear+silu", "glu+silu", "add+rms_norm")}
    with fusion_config(enabled=False):
        off = mlx_fusion.explain(model, x)
    assert off.candidates == [] and "disabled by config" in off.skipped


# Candidates in a 2-layer mlx-lm llama, in graph order: the residual adds feeding the next norm, the
# gate projection's silu, the gated unit.
LLAMA = [("add+rms_norm", "model.layers.0.post_attention_layernorm"), ("linear+silu", "model.layers.0.mlp.gate_proj"),
         ("glu+silu", "model.layers.0.mlp"), ("add+rms_norm", "model.layers.1.input_layernorm"),
         ("add+rms_norm", "model.layers.1.post_attention_layernorm"), ("linear+silu", "model.layers.1.mlp.gate_proj"),
         ("glu+silu", "model.layers.1.mlp"), ("add+rms_norm", "model.layers.1")]


def test_llama_reasons_per_node_with_module_paths(llama):
    model, x = llama
    report = mlx_fusion.explain(model, x)
    small = {"add+rms_norm": "256", "linear+silu": "512", "glu+silu": "512"}
    assert rows(report) == [(p, m, False, f"below min_tensor_size: {small[p]} < 4096 elements") for p, m in LLAMA]
    with fusion_config(min_tensor_size=0):
        eager = mlx_fusion.explain(model, x, compile=False)
    # gate_proj's linear+silu loses to the gated unit silu(gate) * up that contains its activation
    assert [(d.pattern, d.module, d.fused) for d in eager.candidates] == [
        (p, m, p != "linear+silu") for p, m in LLAMA]
    assert all(d.reason.startswith("overlaps a better fusion: glu+silu") for d in eager.candidates
               if d.pattern == "linear+silu")
    # the graph's nodes carry their module paths too
    (g,) = eager_graphs(model, x)
    modules = {n.module for n in g.nodes}
    assert {"model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.1.mlp", "model.norm"} <= modules


def eager_graphs(model, x):
    from mlx_fusion.graph.trace import trace

    return [trace(model, x)]


def test_transformer_demo_reports_every_candidate():
    model, x = Transformer(dim=64, heads=4, hidden=128, depth=2), mx.zeros((1, 8, 64))
    with fusion_config(min_tensor_size=0):
        report = mlx_fusion.explain(model, x, compile=False)
    assert [(d.pattern, d.module) for d in report.candidates] == [
        (p, f"blocks.{i}{m}") for i in range(2) for p, m in
        ([("add+rms_norm", ".mlp_norm")] if i == 0 else [("add+rms_norm", ".attn_norm"), ("add+rms_norm", ".mlp_norm")])
        + [("linear+silu", ".gate"), ("glu+silu", "")]]
    assert all(d.reason for d in report.candidates)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["candidates"][0]["decision"] in ("fused", "rejected") and data["name"] == "Transformer"


def test_trace_failure_reports_the_user_source_line():
    def f(x):
        n = int(x.sum().item())  # data-dependent: cannot be traced
        return x * n

    report = mlx_fusion.explain(f, mx.ones((4,)))
    (fb,) = report.fallbacks
    assert "could not trace" in fb.reason and fb.where is not None
    assert "test_explain.py" in fb.where and "x.sum().item()" in fb.where
    assert "x.sum().item()" in str(report)


def test_fused_stats_carry_the_decisions():
    mx.random.seed(0)
    fused = mlx_fusion.fuse(MLP(width=64, depth=2))
    with fusion_config(min_tensor_size=0):
        fused(mx.zeros((8, 64)))
    assert fused.fusion_stats.applied_count == 2  # the old fields still work
    assert [d.module for d in fused.fusion_stats.decisions] == ["layers.0", "layers.1"]
    report = mlx_fusion.explain(fused)  # a fused object, no arguments: what it decided so far
    assert report.by_pattern == {"linear+bias+relu": 2}


def test_rich_rendering():
    from rich.console import Console

    with fusion_config(min_tensor_size=0):
        report = mlx_fusion.explain(MLP(width=64, depth=1), mx.zeros((8, 64)))
    console = Console(width=120, record=True)
    console.print(report)
    text = console.export_text()
    assert "linear+bias+relu" in text and "layers.0" in text and "fused" in text


# -- mlx-fusion inspect: the same report ------------------------------------------------------------------
def run_cli(capsys, *argv):
    from mlx_fusion.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_rows_have_module_paths_and_json_has_the_report(capsys, tmp_path):
    js = tmp_path / "i.json"
    code, out, err = run_cli(capsys, "inspect", "mlp:width=64", "--min-size", "0", "--json", str(js))
    assert code == 0, err
    assert "layers.0" in out and "layers.1" in out and "%2:AddMM" not in out and "fused" in out
    data = json.loads(js.read_text())
    assert [(c["pattern"], c["module"], c["decision"]) for c in data["explain"]["candidates"]] == [
        ("linear+bias+relu", "layers.0", "fused"), ("linear+bias+relu", "layers.1", "fused")]
    assert [o["module"] for o in data["opportunities"]] == ["layers.0", "layers.1"]


def test_inspect_draws_large_graphs_per_module(capsys, tmp_path):
    dot = tmp_path / "g.dot"
    code, _, err = run_cli(capsys, "inspect", "transformer", "--dot", str(dot))
    assert code == 0, err
    text = dot.read_text()
    assert "collapsed per module" in text and '"blocks.0.rope\\n' in text and text.count("{") == text.count("}")
    assert len(text.splitlines()) < 200  # a box per module (230 nodes per graph drawn one by one: ~1000 lines)


def test_inspect_png_without_graphviz_is_a_usage_error(capsys, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    code, out, err = run_cli(capsys, "inspect", "mlp", "--dot", str(tmp_path / "g.png"))
    assert code == 2 and out == "" and "needs Graphviz's `dot`" in err
    assert not (tmp_path / "g.png").exists()


def test_unsupported_primitive_marks_the_fusions_not_applied(monkeypatch):
    from mlx_fusion import _fusion_state
    from mlx_fusion.graph.interpreter import UnsupportedPrimitive

    def refuse(graph, compile=True):
        raise UnsupportedPrimitive("Foo", "no replay entry")

    monkeypatch.setattr(_fusion_state, "plan", refuse)
    with fusion_config(min_tensor_size=0):
        report = mlx_fusion.explain(MLP(width=64, depth=1), mx.zeros((8, 64)))
    (d,) = report.candidates
    assert not d.fused and d.reason == "not applied: the call runs unfused (unsupported primitive Foo: no replay entry)"
    (fb,) = report.fallbacks
    assert fb.reason == "unsupported primitive Foo: no replay entry" and not fb.split
