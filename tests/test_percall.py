"""Per-call cost of the fused ops (docs/llm-ops.md, "Per-call cost"): the fixed arguments of a
kernel launch are made once per (backend, kernel, dtype, shape), the fast paths return what the
full checks return, and tools/percall_profile.py runs on the CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_fusion import kernels
from mlx_fusion.kernels import compact
from mlx_fusion.ops import binary_reference, fused_binary, fused_scalar, scalar_reference
from mlx_fusion.ops.add_norm import add_rms_norm_reference, fused_add_rms_norm
from mlx_fusion.ops.glu import fused_glu, glu_reference
from mlx_fusion.patterns import Activation, BinaryOp

ROOT = Path(__file__).resolve().parent.parent


class CountingKernel:
    """A kernel factory's object that records its calls and returns zeros at once."""

    built: list = []
    calls: list = []

    def __init__(self, **spec):
        CountingKernel.built.append(spec["name"])

    def __call__(self, inputs, output_shapes, output_dtypes, grid, threadgroup, template=(), **kw):
        CountingKernel.calls.append(dict(inputs=inputs, output_shapes=output_shapes, grid=grid, template=template))
        return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]


@pytest.fixture
def counting():
    CountingKernel.built.clear()
    CountingKernel.calls.clear()
    with kernels.use_backend("cuda", CountingKernel):
        yield CountingKernel


def _arrays(*shapes, dtype=mx.bfloat16):
    xs = [mx.random.normal(s, key=mx.random.key(i)).astype(dtype) for i, s in enumerate(shapes)]
    mx.eval(xs)
    return xs


def test_launch_arguments_are_made_once_per_shape(counting):
    a, b = _arrays((4, 64), (4, 64))
    c, d = _arrays((8, 64), (8, 64))
    fused_binary(a, b)
    fused_binary(a, b, BinaryOp.ADD, Activation.RELU)  # the same primitive, spelled by enums
    fused_binary(c, d)
    assert counting.built.count("mlx_fusion_binary_activation") == 1
    first, second, third = counting.calls
    # One launch object per shape: the very same argument lists are passed again.
    assert first["output_shapes"] is second["output_shapes"] and first["template"] is second["template"]
    assert third["output_shapes"] == [(8, 64)] and third["output_shapes"] is not first["output_shapes"]
    assert [tuple(x.shape) for x in first["inputs"]] == [(4, 64), (4, 64), (2,)]


def test_launches_are_kept_per_forced_backend():
    a, b = _arrays((4, 64), (4, 64))

    class Other(CountingKernel):
        pass

    CountingKernel.built.clear()
    with kernels.use_backend("cuda", CountingKernel):
        fused_glu(a, b)
    with kernels.use_backend("cuda", Other):
        fused_glu(a, b)
    assert CountingKernel.built.count("mlx_fusion_glu") == 2  # the second factory built its own


def test_add_rms_norm_passes_rank3_arrays_as_they_are(counting):
    x, r, w = _arrays((2, 3, 64), (2, 3, 64), (64,))
    h, y = fused_add_rms_norm(x, r, w)
    (call,) = counting.calls
    assert [tuple(t.shape) for t in call["inputs"][:3]] == [(2, 3, 64), (2, 3, 64), (64,)]
    assert call["output_shapes"] == [(2, 3, 64), (2, 3, 64), (6,)]
    assert call["grid"] == (6 * 64, 1, 1) and h.shape == y.shape == (2, 3, 64)


def test_fast_paths_return_what_the_checks_return():
    a, b = _arrays((4, 64), (4, 64), dtype=mx.float32)
    for _ in range(2):  # the second call takes the fast path
        np.testing.assert_allclose(np.array(fused_binary(a, b, "sub", "silu")),
                                   np.array(binary_reference(a, b, "sub", "silu")), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.array(fused_scalar(a, 1.5, -0.25, "gelu")),
                                   np.array(scalar_reference(a, 1.5, -0.25, "gelu")), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.array(fused_glu(a, b, "gelu_approx")),
                                   np.array(glu_reference(a, b, "gelu_approx")), rtol=1e-5, atol=1e-6)
    # Arguments the fast path does not take still go through the full checks.
    tie = mx.array(1.0)
    out = fused_binary(a, b, "add", "relu", relu_at_zero=tie)
    np.testing.assert_array_equal(np.array(out), np.array(binary_reference(a, b, "add", "relu")))
    assert fused_scalar(a.astype(mx.int32), 2, 1).dtype == (a.astype(mx.int32) * 2 + 1).dtype
    with pytest.raises(ValueError):
        fused_binary(a, b, "pow", "relu")
    with pytest.raises(ValueError):
        fused_glu(a, b, "relu")
    h, y = fused_add_rms_norm(a, b, None)
    h2, y2 = add_rms_norm_reference(a, b, None)
    # (a GPU's kernel and mx.fast.rms_norm round differently in the last bit)
    np.testing.assert_allclose(np.array(y), np.array(y2), rtol=1e-6, atol=1e-6)


def test_compact_drops_comments_and_keeps_code_and_macros():
    src = ("// a comment\n\nint a = 1;  // kept: code\n#define M(x) \\\n  // inside the macro \\\n  x\n"
           "// a comment that splices the next line \\\nint hidden;\n  #pragma unroll\n")
    assert compact(src) == ("int a = 1;  // kept: code\n#define M(x) \\\n  // inside the macro \\\n  x\n"
                            "// a comment that splices the next line \\\nint hidden;\n  #pragma unroll\n")


def test_percall_profile_runs_on_the_cpu(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("percall_profile", ROOT / "tools" / "percall_profile.py")
    tool = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, tool)  # its dataclass looks its module up
    spec.loader.exec_module(tool)
    for stub in (False, True):
        out = tmp_path / f"rows-{stub}.json"
        args = ["--quick", "--host-calls", "5", "--repeats", "1", "--calls", "2", "--json", str(out)]
        assert tool.main(args + (["--stub"] if stub else [])) == 0
        rows = json.loads(out.read_text())["rows"]
        assert {r["op"] for r in rows} == {"add+relu", "affine+gelu", "glu+silu", "add+rms_norm"}
        raw = [r for r in rows if r["variant"] == "raw"]
        if stub:  # the stub kernel stands in for the GPU: host rows only
            assert all(r["device_us"] is None and r["host_us"] > 0 for r in rows if r["variant"] != "fused_comp")
        elif mx.default_device().type == mx.DeviceType.cpu:  # no custom kernels on the CPU
            assert all(r["host_us"] is None and r["device_us"] is None for r in raw)
        else:  # a GPU times the bare kernel launch too
            assert all(r["host_us"] > 0 and r["device_us"] > 0 for r in raw)


def test_a_get_kernel_spy_sees_cached_launches(counting):
    """tests/test_ops.py's `kernel_launches` wraps `kernels.get_kernel`; a launch cached by an
    earlier call must still show (`kernels.clear_launches`), as it would on a GPU."""
    from tests.test_ops import kernel_launches

    a, b = _arrays((4, 64), (4, 64))
    fused_binary(a, b, "mul", "gelu")
    assert kernel_launches(lambda x, y: fused_binary(x, y, "mul", "gelu"), [a, b]) == ["binary_activation"]
    assert kernel_launches(lambda x, y: fused_glu(x, y), [a, b]) == ["glu"]


def test_each_kernel_gets_only_the_header_blocks_it_names():
    from mlx_fusion.kernels import KERNEL_SPECS, kernel_source

    h = kernel_source("binary_activation", "cuda")[0]
    assert "fusion_binary_kernel(" in h and "fusion_binary_backward_kernel(" not in h and "FusionMma" not in h
    assert "FusionMma" in kernel_source("linear_activation", "cuda")[0]
    assert kernel_source("add_rms_norm", "cuda")[0] == ""  # uses no shared function
    assert kernel_source("add_rms_norm", "metal")[0] == "#include <metal_stdlib>\n"
    # Every block is closed, and every block name is one some kernel asks for.
    names, depth = set(), 0
    for line in (ROOT / "metal_src" / "common.cu").read_text().splitlines():
        words = line.split()
        if words[:2] == ["//", "@only"]:
            assert depth == 0 and len(words) == 3, line
            names.add(words[2])
            depth += 1
        elif words == ["//", "@end"]:
            assert depth == 1, line
            depth -= 1
    assert depth == 0 and names == {p for s in KERNEL_SPECS.values() for p in s.header_parts}


def test_mlx_jvp_walks_into_a_custom_function_unless_its_inputs_are_stopped():
    """Why the fused ops keep one stop_gradient per kernel input (docs/llm-ops.md): MLX's jvp
    reaches a primitive without a jvp (here QRF, standing in for a CustomKernel) inside a
    custom_function that has its own jvp, unless the primitive's inputs are stop_gradient'ed.
    If MLX changes this, the per-call stop_gradient nodes can go."""
    a = mx.random.normal((4, 4), key=mx.random.key(3))

    def wrapped(stop):
        f = mx.custom_function(lambda x: mx.linalg.qr(mx.stop_gradient(x) if stop else x, stream=mx.cpu)[0])
        f.vjp(lambda p, c, o: c)
        f.jvp(lambda p, t: t[0])
        return f

    with pytest.raises(ValueError, match="jvp"):
        mx.eval(mx.jvp(wrapped(False), [a], [a]))
    mx.eval(mx.jvp(wrapped(True), [a], [a]))
    mx.eval(mx.grad(lambda x: wrapped(False)(x).sum())(a))  # the vjp never needed them
