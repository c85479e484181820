"""The Metal kernels, checked without a Mac (docs/metal-verification.md).

1. Rendering: our port of MLX's source generation is compared with what MLX itself prints.
2. Compilation: every kernel, every template instantiation the ops use, compiled by g++
   against the stub <metal_stdlib> (one translation unit per kernel).
3. Execution: the fused ops run their Metal path on the CPU through the shim and are compared
   with the unfused MLX expressions, values and gradients.
"""

import itertools
import re

import mlx.core as mx
import numpy as np
import pytest

from mlx_fusion.kernels import KERNEL_SPECS, kernel_source
from mlx_fusion.ops import FUSED_OPS, binary_reference, fused_binary, fused_scalar, scalar_reference
from tests.metal_shim import (  # noqa: F401  (metal_shim is a fixture)
    InputMeta,
    ShimCompileError,
    ShimLaunchError,
    ShimMetalKernel,
    compile_sources,
    have_compiler,
    metal_shim,
    render,
    render_metal_kernel,
)

pytestmark = pytest.mark.skipif(not have_compiler(), reason="g++ is not on PATH")

DTYPES = (mx.float32, mx.float16, mx.bfloat16)
DT_IDS = {mx.float32: "f32", mx.float16: "f16", mx.bfloat16: "bf16"}
# (rtol, atol) for fused vs unfused: the kernels compute in float32 and round once, the
# unfused half-precision chain rounds after every op.
TOL = {mx.float32: (1e-5, 1e-5), mx.float16: (4e-3, 4e-3), mx.bfloat16: (3e-2, 3e-2)}


def _close(x, y, dtype, scale=1.0, equal_nan=False):
    rtol, atol = TOL[dtype]
    x, y = np.array(x.astype(mx.float32)), np.array(y.astype(mx.float32))
    assert x.shape == y.shape
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol * scale, equal_nan=equal_nan)


# --- 1. rendering ---------------------------------------------------------------------


def _mlx_generated_source(capfd, name, spec, source, header, inputs, out_dtypes, template):
    """The source MLX generates for a call (printed by verbose=True). Without Metal, MLX
    builds the CustomKernel only while exporting, so the call runs under export_function."""
    kernel = mx.fast.metal_kernel(name=name, input_names=list(spec.input_names),
                                  output_names=list(spec.output_names), source=source, header=header,
                                  ensure_row_contiguous=spec.ensure_row_contiguous)

    def fn(*arrays):
        return kernel(inputs=list(arrays), output_shapes=[(4,)] * len(out_dtypes), output_dtypes=out_dtypes,
                      grid=(1, 1, 1), threadgroup=(1, 1, 1), template=template, verbose=True)

    capfd.readouterr()
    mx.export_function(lambda item: None, fn, *inputs)
    out = capfd.readouterr().out
    m = re.search(r"```\n(.*)\n```", out, re.S)
    assert m, out
    return m.group(1)


RENDER_CASES = [
    # kernel, input shapes (None = 0-d), template
    ("binary_activation", [(16, 3), (1,), (2,)], [("T", mx.bfloat16)]),
    ("binary_activation", [(), (7,), (2,)], [("T", mx.float16)]),
    ("binary_activation_backward", [(8,), (8,), (2, 4), (2,)], [("T", mx.float32)]),
    ("scalar_activation", [(64,), (3,)], [("T", mx.float16)]),
    ("scalar_activation_backward", [(64,), (3,), (64,)], []),
]


@pytest.mark.parametrize("name,shapes,template", RENDER_CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_render_matches_mlx(capfd, name, shapes, template):
    spec = KERNEL_SPECS[name]
    header, body = kernel_source(name, "metal")
    dt = template[0][1] if template else mx.float32
    inputs = [mx.zeros(s, mx.float32 if n == "p" else mx.int32 if n == "m" else dt)
              for n, s in zip(spec.input_names, shapes)]
    out_dtypes = [dt] * len(spec.output_names)
    expected = _mlx_generated_source(capfd, f"mlx_fusion_{name}", spec, body, header, inputs, out_dtypes,
                                     template or None)
    kernel_name, source = render_metal_kernel(f"mlx_fusion_{name}", spec.input_names, spec.output_names, body,
                                              header, inputs, out_dtypes, template)
    assert source.rstrip("\n") == expected.rstrip("\n")
    assert f'host_name("{kernel_name}")' in source or not template


def test_render_attributes_and_quirks_match_mlx(capfd):
    """Metal attributes, scalar (Python float -> 0-d reference) inputs, int/bool template args."""

    class Spec:
        input_names, output_names, ensure_row_contiguous = ("a", "s", "c"), ("out", "o2"), False

    body = ("uint i = thread_position_in_grid.x; out[i] = a[i] * a_strides[0] + s + c[0];"
            " // threads_per_threadgroup simdgroup_index_in_threadgroup grid_size")
    inputs = [mx.zeros((9,)), mx.array(2.0), mx.array([1, 2, 3])]
    template = [("T", mx.float16), ("N", 3), ("B", True)]
    expected = _mlx_generated_source(capfd, "k", Spec, body, "", inputs, [mx.bfloat16, mx.int32], template)
    _, source = render_metal_kernel("k", Spec.input_names, Spec.output_names, body, "", inputs,
                                    [mx.bfloat16, mx.int32], template)
    assert source.rstrip("\n") == expected.rstrip("\n")


# --- 2. compilation -------------------------------------------------------------------


def _template_space(name):
    """(template, one-element operands) pairs that mlx_fusion/ops produce
    (elementwise.py, linear.py). A one-element operand changes the generated
    signature (MLX passes inputs under 8 elements in the `constant` address
    space), so each pattern is compiled too."""
    spec = KERNEL_SPECS[name]
    operand_sizes = ((), ("a",), ("b",)) if name.startswith("binary_activation") else ((),)
    for template, scalars in itertools.product(spec.instantiations(), operand_sizes):
        yield template, scalars


def _metas(spec, template, scalars=()):
    """Inputs as the ops pass them: p is float32 (2,), a one-element operand (1,), others large."""
    t = dict(template)
    return [InputMeta(mx.float32 if n == "p" else mx.int32 if n == "m" else t["T"],
                      (3,) if n == "p" else (2,) if n == "m" else (1,) if n in scalars else (4096,))
            for n in spec.input_names]


@pytest.mark.parametrize("name", sorted(KERNEL_SPECS))
def test_metal_kernel_compiles(name):
    """All instantiations of one kernel in one g++ run. The library is cached and indexed,
    so the execution tests below reuse it instead of compiling again."""
    spec = KERNEL_SPECS[name]
    header, body = kernel_source(name, "metal")
    rendered = [render(f"mlx_fusion_{name}", spec.input_names, spec.output_names, body, header,
                       _metas(spec, t, scalars), [t[0][1]] * len(spec.output_names), t)
                for t, scalars in _template_space(name)]
    assert len({r.kernel_name for r in rendered}) == len(rendered)
    compile_sources(rendered, name)


@pytest.mark.parametrize("expr,message", [
    ("undeclared_name", "'undeclared_name' was not declared"),
    ("metal::erf(a[i])", "'erf' is not a member of 'metal'"),  # MSL has no erf: nor has the stub
])
def test_compile_error_is_reported(expr, message):
    header, _ = kernel_source("binary_activation", "metal")
    k = ShimMetalKernel("bad", ["a"], ["out"], f"uint i = thread_position_in_grid.x;\nout[i] = {expr};",
                        header=header)
    with pytest.raises(ShimCompileError) as err:
        k(inputs=[mx.zeros((16,))], output_shapes=[(16,)], output_dtypes=[mx.float32], grid=(16, 1, 1),
          threadgroup=(16, 1, 1))
    text = str(err.value)
    assert message in text
    assert "bad.body:2" in text  # errors point at the line of the body


# --- the shim itself ------------------------------------------------------------------


def test_shim_passes_strides_like_mlx():
    """ensure_row_contiguous=False: the kernel sees the array's own strides (transposed, broadcast,
    reversed); True: a row-contiguous copy."""
    body = """
    uint i = thread_position_in_grid.x;
    out[i] = i < uint(a_ndim) ? a_strides[i] : 100 + a_shape[i - a_ndim];
    """
    base = mx.arange(12, dtype=mx.float32).reshape(3, 4)
    cases = {"T": (base.T, [1, 4]), "bcast": (mx.broadcast_to(base[0], (5, 4)), [0, 1]),
             "rev": (base[::-1], [-4, 1]), "contig": (base, [4, 1])}
    for contiguous in (False, True):
        k = ShimMetalKernel("strides", ["a"], ["out"], body, ensure_row_contiguous=contiguous)
        for x, strides in cases.values():
            out = k(inputs=[x], output_shapes=[(4,)], output_dtypes=[mx.int64], grid=(4, 1, 1),
                    threadgroup=(4, 1, 1))[0].tolist()
            want = [x.shape[1], 1] if contiguous else strides
            assert out == want + [100 + x.shape[0], 100 + x.shape[1]]


def test_shim_dispatch_geometry():
    """dispatch_threads: every grid position exactly once; edge threadgroups are smaller."""
    body = """
    uint3 p = thread_position_in_grid;
    uint i = (p.z * threads_per_grid.y + p.y) * threads_per_grid.x + p.x;
    out[6 * i + 0] += 1;
    out[6 * i + 1] = thread_position_in_threadgroup.x + 10 * thread_position_in_threadgroup.y;
    out[6 * i + 2] = threadgroup_position_in_grid.x + 10 * threadgroup_position_in_grid.y;
    out[6 * i + 3] = threads_per_threadgroup.x + 10 * threads_per_threadgroup.y;
    out[6 * i + 4] = thread_index_in_threadgroup;
    out[6 * i + 5] = threadgroups_per_grid.x + 10 * threadgroups_per_grid.y;
    """
    k = ShimMetalKernel("geometry", ["x"], ["out"], body)
    gx, gy, tx, ty = 10, 3, 4, 2
    out = np.array(k(inputs=[mx.zeros((1,))], output_shapes=[(gy * gx * 6,)], output_dtypes=[mx.int32],
                     grid=(gx, gy, 1), threadgroup=(tx, ty, 1), init_value=0)[0]).reshape(gy, gx, 6)
    y, x = np.mgrid[0:gy, 0:gx]
    size_x, size_y = np.minimum(tx, gx - (x // tx) * tx), np.minimum(ty, gy - (y // ty) * ty)
    np.testing.assert_array_equal(out[..., 0], 1)
    np.testing.assert_array_equal(out[..., 1], x % tx + 10 * (y % ty))
    np.testing.assert_array_equal(out[..., 2], x // tx + 10 * (y // ty))
    np.testing.assert_array_equal(out[..., 3], size_x + 10 * size_y)
    np.testing.assert_array_equal(out[..., 4], x % tx + size_x * (y % ty))
    np.testing.assert_array_equal(out[..., 5], 3 + 10 * 2)


def test_shim_dtypes_and_init_value():
    body = """
    uint i = thread_position_in_grid.x;
    o_f[i] = T(float(a[i]) * 3.0f);  o_i[i] = i32[i] * 2;  o_u[i] = u32[i] + 1u;
    o_l[i] = i64[i] - 1;  o_b[i] = !flags[i];  if (i == 0) o_init[1] = o_init[0] + 1.0f;
    """
    names = ["a", "i32", "u32", "i64", "flags"]
    outs = ["o_f", "o_i", "o_u", "o_l", "o_b", "o_init"]
    k = ShimMetalKernel("dtypes", names, outs, body)
    x = mx.array([1.0, -2.5, 1 / 3, 65504.0, 1e-3, float("inf"), float("nan"), 2.0])
    ints = mx.arange(-4, 4)
    for dt in DTYPES:
        res = k(inputs=[x.astype(dt), ints.astype(mx.int32), ints.abs().astype(mx.uint32), ints.astype(mx.int64),
                        ints > 0],
                output_shapes=[(8,)] * 5 + [(2,)],
                output_dtypes=[dt, mx.int32, mx.uint32, mx.int64, mx.bool_, mx.float32],
                grid=(8, 1, 1), threadgroup=(3, 1, 1), template=[("T", dt)], init_value=7.0)
        # one rounding from float, round-to-nearest-even, like MLX's own cast
        want = (x.astype(dt).astype(mx.float32) * 3).astype(dt)
        assert res[0].dtype == dt
        np.testing.assert_array_equal(np.array(res[0].astype(mx.float32)), np.array(want.astype(mx.float32)))
        assert res[1].tolist() == (ints * 2).tolist()
        assert res[2].tolist() == (ints.abs() + 1).tolist()
        assert res[3].tolist() == (ints - 1).tolist()
        assert res[4].tolist() == (ints <= 0).tolist()
        assert res[5].tolist() == [7.0, 8.0]


def _bits(x: mx.array) -> np.ndarray:
    """Contiguous numpy copy holding x's bits (bfloat16 as uint16)."""
    return np.array(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x)


def _from_bits(a: np.ndarray, dtype) -> mx.array:
    x = mx.array(np.ascontiguousarray(a))
    return x.view(mx.bfloat16) if dtype == mx.bfloat16 else x


def test_binary_kernel_strided_numpy_views():
    """The strided code paths of binary_activation on hand-made layouts (the shim passes numpy
    strides through as they are): transposed, stride-0 column broadcast, reversed (negative
    strides); the other operand contiguous or row-broadcast."""
    header, body = kernel_source("binary_activation", "metal")
    spec = KERNEL_SPECS["binary_activation"]
    k = ShimMetalKernel("mlx_fusion_binary_activation", spec.input_names, spec.output_names, body, header,
                        ensure_row_contiguous=False)
    key = mx.random.key(1)
    for dt in DTYPES:
        full = _bits(mx.random.normal((13, 9), key=key).astype(dt))
        col = _bits(mx.random.normal((9,), key=mx.random.key(2)).astype(dt))
        other = _bits(mx.random.normal((9, 13), key=mx.random.key(3)).astype(dt))
        a_layouts = {"transposed": full.T, "col-broadcast": np.broadcast_to(col[:, None], (9, 13)),
                     "reversed": full.T[::-1]}
        b_layouts = {"contiguous": other, "row-broadcast": np.broadcast_to(other[0], (9, 13))}
        for (la, a), (lb, b) in itertools.product(a_layouts.items(), b_layouts.items()):
            mode = np.array([1, 3], dtype=np.int32)  # sub, silu
            out = k.run_numpy([a, b, mode], [dt, dt, mx.int32], [(9, 13)], [dt],
                              grid=(-(-117 // (16 // dt.size)), 1, 1), threadgroup=(8, 1, 1),
                              template=[("T", dt)])[0]
            want = binary_reference(_from_bits(a, dt), _from_bits(b, dt), "sub", "silu")
            _close(_from_bits(out, dt), want, dt)


# --- 3. the fused ops, through the Metal sources --------------------------------------

SHAPE = (5, 13)  # 65 elements: not a multiple of the 4 (f32) or 8 (f16/bf16) elements per thread


def _grads(fn, arrays, cot):
    argnums = tuple(range(len(arrays)))
    return mx.grad(lambda *xs: (fn(*xs).astype(mx.float32) * cot).sum(), argnums=argnums)(*arrays)


def _check_case(case, arrays, dtype, scale=1.0):
    got, want = case.fused(*arrays), case.reference(*arrays)
    assert got.dtype == want.dtype and got.shape == want.shape
    _close(got, want, dtype, scale)
    cot = mx.random.normal(want.shape, key=mx.random.key(7))
    for g, r in zip(_grads(case.fused, arrays, cot), _grads(case.reference, arrays, cot)):
        _close(g, r, dtype, scale * max(1.0, float(mx.abs(r.astype(mx.float32)).max())))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("case", FUSED_OPS, ids=lambda c: c.name)
def test_fused_op_runs_metal_source(metal_shim, case, dtype, monkeypatch):
    monkeypatch.setenv("MLX_FUSION_LINEAR_EPILOGUE", "kernel")  # the kernels, not MLX's epilogue
    # K = 12: not a multiple of 8, so linear runs addmm + the activation kernel; the
    # small-M kernel runs below and in tests/test_gemm_kernels.py.
    shape = (6, 12, 13) if case.kind == "linear" else SHAPE
    arrays = case.make_inputs(shape, dtype)
    before = metal_shim.launches
    try:
        _check_case(case, arrays, dtype)
    except NotImplementedError as e:  # a row-reduction kernel (add_norm) on the sequential shim
        pytest.skip(f"needs the block-level shim (branch shims): {e}")
    if case.kind != "linear" or case.pattern.activation is not None:
        assert metal_shim.launches > before  # the Metal path ran, forward and backward


@pytest.mark.parametrize("dtype", (mx.float16, mx.bfloat16), ids=DT_IDS.get)
@pytest.mark.parametrize("case", [c for c in FUSED_OPS if c.kind == "linear" and c.pattern.activation is not None],
                         ids=lambda c: c.name)
def test_fused_linear_small_m_runs_metal_source(metal_shim, case, dtype):
    """M <= 32, K % 8 == 0, half/bfloat16: the forward is the small-M simdgroup GEMM
    (linear_activation), values and gradients against the unfused expression."""
    arrays = case.make_inputs((5, 48, 13), dtype)
    before = metal_shim.launches
    _check_case(case, arrays, dtype, scale=4.0)  # sums over K = 48 rounded once vs per op
    assert metal_shim.launches > before


BROADCASTS = {  # b's shape (None: a Python float; (): a 0-d array), a is (5, 13)
    "row": (13,), "column": (5, 1), "one-element": (1,), "0-d": (), "python-scalar": None, "rank-up": (3, 5, 13),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("bshape", BROADCASTS.values(), ids=BROADCASTS.keys())
@pytest.mark.parametrize("op,act", [("add", "relu"), ("mul", "gelu"), ("div", "silu"), ("sub", "gelu_approx")])
def test_binary_broadcasting(metal_shim, op, act, bshape, dtype):
    a = mx.random.normal(SHAPE, key=mx.random.key(1)).astype(dtype)
    if bshape is None:
        b = 1.75
    else:
        b = (mx.random.uniform(0.5, 2.0, bshape, key=mx.random.key(2))).astype(dtype)
    for x, y in ((a, b), (b, a)):  # the broadcast operand on either side
        got, want = fused_binary(x, y, op, act), binary_reference(x, y, op, act)
        _close(got, want, dtype)
        arrays = [v for v in (x, y) if isinstance(v, mx.array)]

        def f(*xs, fn):
            it = iter(xs)
            return fn(*(next(it) if isinstance(v, mx.array) else v for v in (x, y)), op, act)

        cot = mx.random.normal(want.shape, key=mx.random.key(3))
        got_g = _grads(lambda *xs: f(*xs, fn=fused_binary), arrays, cot)
        want_g = _grads(lambda *xs: f(*xs, fn=binary_reference), arrays, cot)
        for g, r in zip(got_g, want_g):
            assert g.shape == r.shape
            # broadcast gradients are sums over up to 15 elements
            _close(g, r, dtype, 4 * max(1.0, float(mx.abs(r.astype(mx.float32)).max())))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_non_contiguous_inputs(metal_shim, dtype):
    """binary_activation reads strides itself (ensure_row_contiguous=False): transposed and
    reversed inputs reach the kernel as they are. scalar_activation gets a contiguous copy."""
    base = mx.random.normal((13, 5), key=mx.random.key(4)).astype(dtype)
    other = mx.random.normal((5, 13), key=mx.random.key(5)).astype(dtype)
    for a in (base.T, base[::-1].T, mx.broadcast_to(base[:, :1].T, (5, 13))):
        for op, act in (("mul", "relu"), ("sub", "silu")):
            case = next(c for c in FUSED_OPS if c.name == f"{op}+{act}")
            _check_case(case, [a, other], dtype)
            _check_case(case, [other, a], dtype)
        _close(fused_scalar(a, 0.5, 1.0, "gelu"), scalar_reference(a, 0.5, 1.0, "gelu"), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_approx", "silu"])
def test_nan_and_inf(metal_shim, act, dtype):
    special = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30, 3.0]
    a = mx.array(special * 3).astype(dtype)  # 24 elements
    b = mx.array([1.0, -1.0, 0.0, float("inf")] * 6).astype(dtype)
    for op in ("add", "mul", "div"):
        _close(fused_binary(a, b, op, act), binary_reference(a, b, op, act), dtype, equal_nan=True)
    _close(fused_scalar(a, 2.0, -1.0, act), scalar_reference(a, 2.0, -1.0, act), dtype, equal_nan=True)


@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 31, 257, 1000])
def test_sizes_around_elements_per_thread(metal_shim, n):
    """Sizes below, at and above the elements per thread (4 f32, 8 f16/bf16) and the threadgroup
    (256 threads); fewer than 8 elements also puts the inputs in MLX's `constant` address space."""
    for dtype in DTYPES:
        a = mx.random.normal((n,), key=mx.random.key(n)).astype(dtype)
        b = mx.random.normal((n,), key=mx.random.key(n + 1)).astype(dtype)
        _close(fused_binary(a, b, "add", "gelu"), binary_reference(a, b, "add", "gelu"), dtype)
        _close(fused_scalar(a, 1.5, 0.5, "silu"), scalar_reference(a, 1.5, 0.5, "silu"), dtype)


def test_shim_catches_out_of_bounds_writes():
    k = ShimMetalKernel("oob", ["a"], ["out"], "uint i = thread_position_in_grid.x; out[i + 1] = a[i];")
    with pytest.raises(ShimLaunchError, match="wrote outside output `out`"):
        k(inputs=[mx.zeros((8,))], output_shapes=[(8,)], output_dtypes=[mx.float32], grid=(8, 1, 1),
          threadgroup=(8, 1, 1))
