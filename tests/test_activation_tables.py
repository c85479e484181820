"""Each kernel language's activation table (`fusion_activation`, `fusion_activation_grad`
in metal_src/common.metal and common.cu) against the Python definition
(`mlx_fusion.patterns.Activation.reference`, and MLX's autodiff of it for the derivative)
over a dense float32 grid that includes ±0, ±Inf, NaN, subnormals and huge magnitudes.

The table functions are evaluated by a one-line kernel per language, compiled with the real
header by the CPU shims (g++: CUDA's erff/expf/tanhf are the host libm's here, Metal's erf is
the header's own). Unknown op/activation codes must poison the output with NaN in every
kernel, not fall through to the last case.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_fusion.kernels import KERNEL_SPECS, kernel_source
from mlx_fusion.patterns import Activation, BinaryOp
from tests.cuda_shim.host import CXX, HostKernel, have_compiler, kernel_from_sources
from tests.metal_shim import ShimMetalKernel

pytestmark = pytest.mark.skipif(not have_compiler(), reason=f"{CXX} is not on PATH")

CUDA_TABLE = """
const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
if (i < x_shape[0]) {
  const int act = int(p[0]);
  y[i] = fusion_activation(act, x[i]);
  dy[i] = fusion_activation_grad(act, x[i]);
}
"""
METAL_TABLE = """
const uint i = thread_position_in_grid.x;
if (int(i) < x_shape[0]) {
  const int act = int(p[0]);
  y[i] = fusion_activation(act, x[i]);
  dy[i] = fusion_activation_grad(act, x[i]);
}
"""


def table_kernels(cuda_header: str = None, metal_header: str = None):
    """{language: fn(code, x float32) -> (act(x), act'(x))} with the given (or the real) headers."""
    cuda_header = cuda_header or kernel_source("binary_activation", "cuda")[0]
    metal_header = metal_header or kernel_source("binary_activation", "metal")[0]
    cuda = HostKernel("activation_table", cuda_header, CUDA_TABLE, ("x", "p"), ("y", "dy"), dtypes=("float32",))
    metal = ShimMetalKernel("activation_table", ["x", "p"], ["y", "dy"], METAL_TABLE, header=metal_header)

    def run_cuda(code, x):
        y, dy = cuda("float32", [x, np.array([code], np.float32)], [x.shape, x.shape], x.size, 256)
        return y, dy

    def run_metal(code, x):
        y, dy = metal(inputs=[mx.array(x), mx.array([float(code)])], output_shapes=[x.shape, x.shape],
                      output_dtypes=[mx.float32, mx.float32], grid=(x.size, 1, 1), threadgroup=(256, 1, 1))
        return np.array(y), np.array(dy)

    return {"cuda": run_cuda, "metal": run_metal}


def input_grid() -> np.ndarray:
    f = np.finfo(np.float32)
    dense = np.linspace(-12, 12, 19201, dtype=np.float32)  # step 1/800
    mags = np.logspace(-45, 38.5, 600).astype(np.float32)  # subnormals to FLT_MAX
    special = np.array([0.0, np.inf, np.nan, f.max, f.tiny, f.tiny / 2, f.smallest_subnormal,
                        88.72, 89.0, 104.0, 1e5, 1e10, 1e20, 1e30,
                        0.927734375 * np.sqrt(2), 1.3119, 1.312, 1e-4, 1e-20], dtype=np.float32)
    both = np.concatenate([dense, mags, special])
    grid = np.unique(np.concatenate([both, -both]))  # keeps one of the zeros (and one NaN)
    return np.concatenate([grid, np.array([0.0, -0.0], np.float32)])


GRID = input_grid()


def python_table(act: Activation, x: np.ndarray):
    """(act(x), act'(x)) from the Python definition, float32 on the CPU."""
    xs = mx.array(x)
    y = act.reference(xs)
    (dy,) = mx.vjp(act.reference, [xs], [mx.ones_like(xs)])[1]
    return np.array(y), np.array(dy)


def disagreements(got: np.ndarray, want: np.ndarray, x: np.ndarray, rtol: float, atol: float):
    """Indices where got and want differ: NaN must match NaN, infinities their sign, finite
    values within rtol * |want| + atol * max(1, |x|) (cancellation in 1 + erf etc. is
    absolute in x)."""
    nan_g, nan_w = np.isnan(got), np.isnan(want)
    inf_mismatch = (np.isinf(got) | np.isinf(want)) & ~(nan_g | nan_w) & (got != want)
    finite = ~(nan_g | nan_w) & np.isfinite(got) & np.isfinite(want)
    scale = np.maximum(1.0, np.nan_to_num(np.abs(x.astype(np.float64)), nan=1.0, posinf=1.0))
    with np.errstate(invalid="ignore", over="ignore"):
        close = np.abs(got.astype(np.float64) - want) <= rtol * np.abs(want) + atol * scale
    return np.flatnonzero((nan_g != nan_w) | inf_mismatch | (finite & ~close))


def _report(what, idx, x, got, want):
    rows = [f"x={x[i]!r}: kernel {got[i]!r}, python {want[i]!r}" for i in idx[:10]]
    return f"{what}: {len(idx)}/{x.size} disagree\n" + "\n".join(rows)


@pytest.fixture(scope="module")
def tables():
    return table_kernels()


@pytest.mark.parametrize("language", ["cuda", "metal"])
@pytest.mark.parametrize("act", list(Activation), ids=str)
def test_activation_table_matches_python(tables, language, act):
    got_y, got_dy = tables[language](act.code, GRID)
    want_y, want_dy = python_table(act, GRID)
    failures = []
    for what, got, want in (("forward", got_y, want_y), ("derivative", got_dy, want_dy)):
        idx = disagreements(got, want, GRID, rtol=2e-6, atol=2e-7)
        if len(idx):
            failures.append(_report(f"{language} {act} {what}", idx, GRID, got, want))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("language", ["cuda", "metal"])
@pytest.mark.parametrize("code", [-1, 4, 7, 1000])
def test_unknown_activation_code_is_nan(tables, language, code):
    y, dy = tables[language](code, GRID)
    assert np.isnan(y).all() and np.isnan(dy).all()


# --- unknown codes in every real kernel ------------------------------------------------

N = 65  # not a multiple of any vector width


def _cuda_outputs(name, extra, dtype="float32"):
    """Outputs of kernel `name` (CUDA, host shim) for a contiguous (65,) problem; `extra` are
    the code arrays (m or p)."""
    spec = KERNEL_SPECS[name]
    k = kernel_from_sources(name, dtypes=(dtype,))
    r = np.random.default_rng(0)
    arrays = {n: r.uniform(0.5, 2, (N,)).astype(np.float32) for n in spec.input_names}
    arrays.update(extra)
    shapes = [(N,)] * len(spec.output_names)
    return k(dtype, [arrays[n] for n in spec.input_names], shapes, 32, 256)


def _metal_outputs(name, extra):
    spec = KERNEL_SPECS[name]
    header, body = kernel_source(name, "metal")
    k = ShimMetalKernel(f"mlx_fusion_{name}", spec.input_names, spec.output_names, body, header,
                        ensure_row_contiguous=spec.ensure_row_contiguous)
    r = np.random.default_rng(0)
    arrays = {n: mx.array(r.uniform(0.5, 2, (N,)).astype(np.float32)) for n in spec.input_names}
    arrays.update({n: mx.array(v) for n, v in extra.items()})
    outs = k(inputs=[arrays[n] for n in spec.input_names], output_shapes=[(N,)] * len(spec.output_names),
             output_dtypes=[mx.float32] * len(spec.output_names), grid=(17, 1, 1), threadgroup=(256, 1, 1),
             template=[("T", mx.float32)])
    return [np.array(o) for o in outs]


BAD_CODES = {  # kernel -> {input name: codes} with an unknown activation or op code
    "binary_activation": [{"m": np.array([0, 7], np.int32)}, {"m": np.array([9, 0], np.int32)}],
    "binary_activation_backward": [{"m": np.array([2, 4], np.int32)}, {"m": np.array([-1, 1], np.int32)}],
    "scalar_activation": [{"p": np.array([1.0, 0.0, 4.0], np.float32)}],
    "scalar_activation_backward": [{"p": np.array([1.0, 0.0, -1.0], np.float32)}],
}


@pytest.mark.parametrize("language", ["cuda", "metal"])
@pytest.mark.parametrize("name", sorted(BAD_CODES))
def test_unknown_codes_poison_elementwise_kernels(language, name):
    for extra in BAD_CODES[name]:
        outs = (_cuda_outputs if language == "cuda" else _metal_outputs)(name, extra)
        assert np.isnan(outs[0]).all(), (name, extra, outs[0][:8])


def test_codes_match_the_headers():
    """The #define'd codes in both headers are patterns' codes."""
    for language in ("cuda", "metal"):
        header = kernel_source("binary_activation", language)[0]
        for enum, prefix in ((Activation, "FUSION_"), (BinaryOp, "FUSION_")):
            for member in enum:
                assert f"#define {prefix}{member.name} {member.code}\n" in header, (language, member)


@pytest.mark.parametrize("language", ["cuda", "metal"])
def test_unknown_code_poisons_the_linear_epilogue(language):
    """linear_activation with activation code 7: act(z) is NaN everywhere, z itself is not."""
    m, k, n = 3, 40, 13
    r = np.random.default_rng(1)
    x, w = r.uniform(-1, 1, (m, k)).astype(np.float16), r.uniform(-1, 1, (n, k)).astype(np.float16)
    p = np.array([1.0, 0.0, 7.0], np.float32)
    template = (("MT", 1), ("NT", 2), ("HAS_BIAS", False))
    blocks = -(-n // 16)
    if language == "cuda":
        kern = kernel_from_sources("linear_activation", dtypes=("float16",), templates=(template,))
        out, z = kern("float16", [x, w, x, p], [(m, n), (m, n)], blocks * 256, 256, template=template)
    else:
        spec = KERNEL_SPECS["linear_activation"]
        header, body = kernel_source("linear_activation", "metal")
        kern = ShimMetalKernel("mlx_fusion_linear_activation", spec.input_names, spec.output_names, body, header)
        out, z = (np.array(t) for t in kern(
            inputs=[mx.array(x), mx.array(w), mx.array(x), mx.array(p)], output_shapes=[(m, n), (m, n)],
            output_dtypes=[mx.float16, mx.float16], grid=(blocks * 256, 1, 1), threadgroup=(256, 1, 1),
            template=[("T", mx.float16)] + list(template)))
    assert np.isnan(out.astype(np.float32)).all()
    np.testing.assert_allclose(z.astype(np.float32), x.astype(np.float32) @ w.astype(np.float32).T, rtol=2e-3,
                               atol=2e-3)
