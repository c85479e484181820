"""Neural Engine offload: eligibility on the IR, conversion to ML Programs read back and re-run
in NumPy, the CoreMLBlock runtime inside fuse(), the export CLI. Core ML prediction itself
(`mac` marker) runs only on macOS."""

import argparse
import json
import subprocess
import sys
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_fusion import FusionConfig, fuse
from mlx_fusion.coreml import CoreMLUnavailable, INSTALL_HINT, require_coremltools
from mlx_fusion.coreml.eligibility import SUPPORTED_OPS, find_blocks
from mlx_fusion.coreml.options import DEFAULT_MIN_FLOPS, cache_dir, offload_options, OffloadOptions
from mlx_fusion.graph.trace import trace

try:
    import coremltools  # noqa: F401
    HAVE_CT = True
except ImportError:
    HAVE_CT = False
needs_ct = pytest.mark.skipif(not HAVE_CT, reason=f"coremltools not installed ({INSTALL_HINT})")
mac = pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction requires macOS")
FP16 = dict(atol=2e-2, rtol=2e-2)  # fp16 storage of every intermediate


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 32)

    def __call__(self, x):
        return self.layer(x, None)


def _models():
    mx.random.seed(3)
    return {
        "mlp": (nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), mx.random.normal((4, 16))),
        "gelu-mlp": (nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)), mx.random.normal((2, 3, 16))),
        "silu-softmax": (nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 8), nn.Softmax()),
                         mx.random.normal((4, 16))),
        "transformer": (Encoder(), mx.random.normal((1, 4, 16))),
    }


EXPECTED_MIL = {  # ops the saved program must contain (coremltools' passes fuse gelu/silu)
    "mlp": {"linear": 2, "relu": 1},
    "gelu-mlp": {"linear": 2, "gelu": 1},
    "silu-softmax": {"linear": 2, "silu": 1, "softmax": 1},
    "transformer": {"linear": 6, "matmul": 2, "softmax": 1, "relu": 1, "rsqrt": 2},
}


def _params(model, graph):
    names = [v.name for v in graph.inputs[: graph.meta["num_params"]]]
    return dict(zip(names, [a for _, a in tree_flatten(model.parameters())]))


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("coreml-cache")


@pytest.fixture(scope="session")
def converted(cache):
    """name -> (model, x, graph, block, ConvertedBlock); converted once per session."""
    if not HAVE_CT:
        pytest.skip(f"coremltools not installed ({INSTALL_HINT})")
    from mlx_fusion.coreml.convert import convert_block

    out = {}
    for name, (model, x) in _models().items():
        model.eval()
        graph = trace(model, x)
        report = find_blocks(graph, 0)
        assert len(report.blocks) == 1, (name, report)
        block = report.blocks[0]
        out[name] = (model, x, graph, block, convert_block(graph, block, _params(model, graph),
                                                          OffloadOptions(cache_dir=str(cache))))
    return out


# -- eligibility (no coremltools needed) -------------------------------------------------------------
def test_mlp_is_one_block_with_weights_folded():
    model, x = _models()["mlp"]
    g = trace(model, x)
    r = find_blocks(g, 0)
    (b,) = r.blocks
    assert b.ops == {"AddMM": 2, "Maximum": 1} and r.rejected == []
    assert [v.shape for v in b.inputs] == [(4, 16)] and [v.shape for v in b.outputs] == [(4, 8)]
    assert len(b.param_inputs) == 4  # both weights and biases become constants
    assert b.flops == 2 * 4 * 16 * 32 + 4 * 32 + 2 * 4 * 32 * 8 + 4 * 8 + 4 * 32


def test_small_blocks_and_unsupported_ops_have_reasons():
    model, x = _models()["mlp"]
    r = find_blocks(trace(model, x), min_flops=DEFAULT_MIN_FLOPS)
    assert r.blocks == [] and r.reasons() == {"too-small": 1}
    w = mx.random.normal((16, 16), key=mx.random.key(0))
    mx.eval(w)
    g = trace(lambda x: mx.sort(nn.relu(x @ w), axis=-1) @ w + (x @ w).astype(mx.int32).astype(mx.float32), x)
    r = find_blocks(g, 0)
    reasons = r.reasons()
    assert reasons["unsupported-op"] >= 1 and any("Sort" in j.detail for j in r.rejected)
    assert any(j.reason == "unsupported-params" or j.reason == "dtype" for j in r.rejected)


def test_blocks_stay_convex():
    """a -> block -> Sort (MLX) -> back: the two halves must not become one block (a cycle)."""
    w = mx.random.normal((16, 16), key=mx.random.key(0))
    mx.eval(w)
    fn = lambda x: (x @ w) + mx.sort(x @ w, axis=-1) @ w
    g = trace(fn, mx.random.normal((4, 16)))
    r = find_blocks(g, 0)
    assert len(r.blocks) == 2
    first, second = r.blocks
    sort_node = next(n for n in g.nodes if n.op == "Sort")
    assert sort_node.inputs[0].name in {v.name for v in first.outputs}
    assert sort_node.outputs[0].name in {v.name for v in second.inputs}


def test_emitters_cover_every_supported_op():
    if not HAVE_CT:
        pytest.skip("coremltools not installed")
    from mlx_fusion.coreml.convert import EMITTERS

    assert set(EMITTERS) == set(SUPPORTED_OPS)


def test_importing_mlx_fusion_does_not_import_coremltools():
    code = "import sys, mlx_fusion, mlx_fusion.coreml, mlx_fusion.coreml.eligibility; print('coremltools' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_coremltools_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "coremltools", None)
    with pytest.raises(CoreMLUnavailable, match=r"pip install 'mlx-fusion\[coreml\]'"):
        require_coremltools()


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.delenv("MLX_FUSION_COREML_CACHE", raising=False)
    monkeypatch.setenv("MLX_FUSION_CACHE", str(tmp_path))
    assert cache_dir(OffloadOptions()) == tmp_path / "coreml"
    monkeypatch.setenv("MLX_FUSION_COREML_CACHE", str(tmp_path / "x"))
    assert cache_dir(OffloadOptions()) == tmp_path / "x"
    assert cache_dir(OffloadOptions(cache_dir=str(tmp_path / "y"))) == tmp_path / "y"


# -- conversion, read back and re-run in NumPy ----------------------------------------------------------
@needs_ct
@pytest.mark.parametrize("name", list(EXPECTED_MIL))
def test_saved_program_structure(converted, name):
    from mlx_fusion.coreml.milnumpy import MilExecutor

    model, x, graph, block, c = converted[name]
    import coremltools as ct

    spec = ct.utils.load_spec(c.path)
    fp16 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
    assert [i.name for i in spec.description.input] == ["in0"]
    assert [tuple(i.type.multiArrayType.shape) for i in spec.description.input] == [tuple(x.shape)]
    assert [o.name for o in spec.description.output] == ["out0"]
    assert tuple(spec.description.output[0].type.multiArrayType.shape) == tuple(block.outputs[0].shape)
    assert all(f.type.multiArrayType.dataType == fp16 for f in [*spec.description.input, *spec.description.output])
    ex = MilExecutor(c.path)
    ops = ex.op_types()
    for op, n in EXPECTED_MIL[name].items():
        assert ops[op] == n, (op, ops)
    assert not {"erf", "sigmoid", "maximum"} & set(ops)  # activations were recognized
    weights = [op.outputs[0].val for op in ex.function.operations
               if op.op_type == "const" and getattr(op.outputs[0].val, "ndim", 0) >= 1 and op.outputs[0].val.size > 8]
    assert weights and all(w.dtype == np.float16 for w in weights)
    # a Linear weight is stored as nn.Linear has it: (out, in), rounded to fp16
    w0 = next(np.array(a).astype(np.float16) for k, a in tree_flatten(model.parameters()) if k.endswith("weight"))
    assert any(w.shape == w0.shape and np.array_equal(w, w0) for w in weights)


@needs_ct
@pytest.mark.parametrize("name", list(EXPECTED_MIL))
def test_program_rerun_in_numpy_matches_mlx(converted, name):
    from mlx_fusion.coreml.milnumpy import MilExecutor

    model, x, graph, block, c = converted[name]
    ex = MilExecutor(c.path)
    got = ex({"in0": np.array(x)})["out0"]
    assert got.dtype == np.float16 and got.shape == tuple(block.outputs[0].shape)
    np.testing.assert_allclose(got.astype(np.float32), np.array(model(x)), **FP16)
    used = {op for (path, op) in ex.paths if path == "value_inference"}
    assert "linear" in used  # coremltools' own NumPy semantics for the heavy op


@needs_ct
def test_cache_reuse_and_weight_keying(converted, cache):
    from mlx_fusion.coreml.convert import convert_block

    model, x, graph, block, c = converted["mlp"]
    again = convert_block(graph, block, _params(model, graph), OffloadOptions(cache_dir=str(cache)))
    assert again.reused and again.key == c.key and again.path == c.path
    params = _params(model, graph)
    params[graph.inputs[0].name] = params[graph.inputs[0].name] + 1
    other = convert_block(graph, block, params, OffloadOptions(cache_dir=str(cache)))
    assert other.key != c.key and not other.reused


# -- runtime inside fuse() ----------------------------------------------------------------------------------
NE = FusionConfig(neural_engine=True, min_tensor_size=0)


@pytest.fixture
def numpy_predictor(cache):
    if not HAVE_CT:
        pytest.skip(f"coremltools not installed ({INSTALL_HINT})")
    with offload_options(predictor="mil-numpy", min_flops=0, cache_dir=str(cache)) as o:
        yield o


def test_fuse_offloads_block_and_matches(numpy_predictor):
    model, x = _models()["transformer"]
    model.eval()
    fused = fuse(model, NE)
    np.testing.assert_allclose(np.array(fused(x)), np.array(model(x)), **FP16)
    g = fused.fusion_graphs[0]
    assert g.op_counts() == {"CoreMLBlock": 1}
    runner = g.meta["coreml"].runners[0]
    assert runner.calls == {"coreml": 1, "mlx": 0}
    # gradients never go through Core ML: the vjp differentiates the block's MLX nodes
    loss = lambda m: lambda x: (m(x) ** 2).sum()
    np.testing.assert_allclose(np.array(mx.grad(loss(fused))(x)), np.array(mx.grad(loss(model))(x)),
                               atol=5e-2, rtol=5e-2)


def test_offload_keeps_mlx_parts_and_graph_order(numpy_predictor):
    w = mx.random.normal((16, 16), key=mx.random.key(1))
    mx.eval(w)
    fn = lambda x: (x @ w) + mx.sort(x @ w, axis=-1) @ w
    x = mx.random.normal((4, 16))
    f = fuse(fn, NE)
    np.testing.assert_allclose(np.array(f(x)), np.array(fn(x)), **FP16)
    assert f.graphs[0].op_counts()["CoreMLBlock"] == 2 and "Sort" in f.graphs[0].op_counts()


def test_new_weights_reconvert(numpy_predictor):
    model, x = _models()["mlp"]
    model.eval()
    fused = fuse(model, NE)
    fused(x)
    fused.update({"layers": [{"bias": mx.full((32,), 0.5)}, {}, {}]})
    np.testing.assert_allclose(np.array(fused(x)), np.array(model(x)), **FP16)


def test_training_mode_runs_in_mlx_and_force_raises(numpy_predictor):
    from mlx_fusion.coreml.runtime import CoreMLTrainingError

    model, x = _models()["mlp"]
    fused = fuse(model, NE)
    fused.train()
    np.testing.assert_allclose(np.array(fused(x)), np.array(model(x)), atol=1e-5)
    g = fused.fusion_graphs[-1]
    assert "CoreMLBlock" not in g.op_counts() and g.meta["coreml"].rejected[0].reason == "training"
    with offload_options(force=True):
        with pytest.raises(CoreMLTrainingError, match="inference-only"):
            fuse(model, NE)(x)
        fused_eval = fuse(model, NE)
        fused_eval.eval()
        fused_eval(x)
        with pytest.raises(CoreMLTrainingError, match="gradient"):
            mx.eval(mx.grad(lambda x: fused_eval(x).sum())(x))


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the non-macOS fallback")
def test_linux_warns_once_and_runs_mlx():
    from mlx_fusion.coreml import runtime

    runtime._warned.clear()
    model, x = _models()["mlp"]
    model.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for f in (fuse(model, NE), fuse(model, NE)):
            np.testing.assert_allclose(np.array(f(x)), np.array(model(x)), atol=1e-5)
    msgs = [str(w.message) for w in caught if "Core ML prediction requires macOS" in str(w.message)]
    assert len(msgs) == 1


# -- CLI ----------------------------------------------------------------------------------------------------
@needs_ct
def test_cli_exports_packages_and_table(tmp_path, capsys):
    from mlx_fusion.coreml import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["coreml", "mlp:width=32,depth=2,batch=4", "--out", str(tmp_path), "--min-flops", "0"])
    assert args.func(args) == 0
    result = json.loads((tmp_path / "blocks.json").read_text())
    assert result["blocks"] and all((tmp_path / f"{b['key']}.mlpackage").exists() for b in result["blocks"])
    assert "linear" in capsys.readouterr().out


def test_cli_without_coremltools(monkeypatch, tmp_path, capsys):
    from mlx_fusion.coreml import cli

    monkeypatch.setitem(sys.modules, "coremltools", None)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["coreml", "mlp", "--out", str(tmp_path)])
    assert args.func(args) == cli.EXIT_NO_COREMLTOOLS
    assert INSTALL_HINT in capsys.readouterr().err


# -- on a Mac only ------------------------------------------------------------------------------------------
@pytest.mark.mac
@mac
@needs_ct
@pytest.mark.parametrize("name", list(EXPECTED_MIL))
def test_coreml_prediction_matches_mlx(converted, name):
    import coremltools as ct

    model, x, graph, block, c = converted[name]
    m = ct.models.MLModel(c.path, compute_units=ct.ComputeUnit.CPU_AND_NE)
    got = m.predict({"in0": np.array(x).astype(np.float16)})["out0"]
    np.testing.assert_allclose(np.asarray(got, np.float32), np.array(model(x)), **FP16)


@pytest.mark.mac
@mac
@needs_ct
def test_fuse_runs_core_ml_on_mac(cache):
    model, x = _models()["transformer"]
    model.eval()
    with offload_options(min_flops=0, cache_dir=str(cache)):
        fused = fuse(model, NE)
        np.testing.assert_allclose(np.array(fused(x)), np.array(model(x)), **FP16)
    assert fused.fusion_graphs[0].meta["coreml"].runners[0].calls["coreml"] == 1


@pytest.mark.mac
@mac
@needs_ct
def test_compute_plan_placement_report(converted):
    """Where Core ML would run each op (MLComputePlan, macOS 14.4+): printed, not asserted,
    because placement is the OS's decision."""
    import coremltools as ct

    plan_cls = getattr(getattr(ct.models, "compute_plan", None), "MLComputePlan", None)
    if plan_cls is None:
        pytest.skip("this coremltools has no MLComputePlan")
    c = converted["transformer"][4]
    compiled = ct.models.MLModel(c.path).get_compiled_model_path()
    plan = plan_cls.load_from_path(path=compiled, compute_units=ct.ComputeUnit.CPU_AND_NE)
    program = plan.model_structure.program
    for op in program.functions["main"].block.operations:
        usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
        print(op.operator_name, usage.preferred_compute_device if usage else None)
