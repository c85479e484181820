"""Execute the CUDA kernel twins on the CPU (g++, host C++; see tests/cuda_shim/host.py)
and compare them with float32 MLX references of the same math.

test_cuda_sources.py only checks that nvcc accepts the kernels; this runs them, with the
launch geometry the ops use (`launch_geometry(n, dtype)`) so the grid-stride loop,
the 16-byte vector paths, the tails and every operand layout the ops produce
(contiguous, row-broadcast stride-0 views, one-element (1,) operands, strided views) are
exercised.
"""

from __future__ import annotations

import itertools
import zlib
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np
import pytest

from mlx_fusion.kernels import KERNEL_SPECS, kernel_source
from mlx_fusion.ops.common import activation_grad, binary_operand_grads, launch_geometry
from mlx_fusion.patterns import Activation, BinaryOp
from tests.cuda_shim.host import (
    CXX,
    HostKernel,
    aligned_empty,
    decode,
    encode,
    have_compiler,
    kernel_from_sources,
)

pytestmark = pytest.mark.skipif(not have_compiler(), reason=f"{CXX} is not on PATH: cannot build the CUDA kernels as host C++")

DTYPES = ("float32", "float16", "bfloat16")
MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}
OPS = {op.code: op for op in BinaryOp}
ACTS = {act.code: act for act in Activation}
assert sorted(OPS) == [0, 1, 2, 3] and sorted(ACTS) == [0, 1, 2, 3]

# Output shapes: sizes that are not multiples of the vector width (1, 7, 65, 1000, 4099),
# rows that are (64, 800: vector loads of a row broadcast), 3-D (general strides), and
# 20000 elements, more than one pass of the grid-stride loop for every dtype.
SHAPES = [(1,), (7,), (5, 13), (8, 125), (4099,), (9, 64), (3, 5, 7), (25, 800), (160, 125)]

# (a layout, b layout) pairs: every layout against a contiguous operand on either side, plus
# mixed ones. "row": a trailing-dims operand broadcast over the leading dim (stride 0);
# "col": a leading-dim operand broadcast over the trailing dims ((r, 1) -> (r, c): general
# strides); "scalar": a (1,) operand; "transposed": a transposed (or, in 1-D, step-2) view;
# "reversed": last axis reversed (negative stride); "offset"/"row_offset": 1 element into an
# aligned buffer (misaligned for the 16-byte path).
LAYOUTS = ["contiguous", "row", "row_offset", "col", "scalar", "transposed", "reversed", "offset"]
PAIRS = sorted({(l, "contiguous") for l in LAYOUTS} | {("contiguous", l) for l in LAYOUTS}
               | {("row", "scalar"), ("transposed", "row"), ("scalar", "transposed"), ("col", "row"),
                  ("reversed", "col")})


@pytest.fixture(scope="module")
def host():
    """The elementwise kernels, each compiled once for the three dtypes (in parallel)."""
    ks = {name: kernel_from_sources(name) for name, spec in sorted(KERNEL_SPECS.items()) if spec.elementwise}
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda k: k.build(), ks.values()))
    return ks


def geometry(n, dtype):
    grid, group = launch_geometry(n, MX_DTYPES[dtype])
    assert grid[1:] == (1, 1) and group[1:] == (1, 1)
    return grid[0], group[0]


def _rng(*key):
    # Deterministic across runs (str hashes are salted per process).
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def operand(values_fn, shape, layout, dtype):
    """(kernel input view, float32 values at the output shape) for one operand.

    values_fn(shape) -> float32 values. The view has the strides MLX would pass
    (see mlx_fusion.ops.elementwise._operand); None if the layout does not apply."""
    n = int(np.prod(shape))
    if layout == "contiguous" or layout == "offset":
        x = aligned_empty(shape, dtype, offset_elems=1 if layout == "offset" else 0)
        x[...] = encode(values_fn(shape), dtype)
        view = x
    elif layout in ("row", "row_offset"):
        if len(shape) < 2:
            return None
        row = aligned_empty(shape[1:], dtype, offset_elems=1 if layout == "row_offset" else 0)
        row[...] = encode(values_fn(shape[1:]), dtype)
        view = np.broadcast_to(row, shape)
    elif layout == "col":
        if len(shape) < 2:
            return None
        cshape = shape[:1] + (1,) * (len(shape) - 1)
        col = aligned_empty(cshape, dtype)
        col[...] = encode(values_fn(cshape), dtype)
        view = np.broadcast_to(col, shape)
    elif layout == "reversed":
        base = aligned_empty(shape, dtype)
        base[...] = encode(values_fn(shape), dtype)
        view = base[..., ::-1]
    elif layout == "scalar":
        if n == 1:
            return None
        x = aligned_empty((1,), dtype)
        x[...] = encode(values_fn((1,)), dtype)
        view = x
    elif layout == "transposed":
        if len(shape) == 1:  # every other element of a buffer twice as long
            base = aligned_empty((2 * shape[0],), dtype)
            base[...] = encode(values_fn((2 * shape[0],)), dtype)
            view = base[::2]
        else:
            base = aligned_empty(tuple(reversed(shape)), dtype)
            base[...] = encode(values_fn(base.shape), dtype)
            view = base.T
    else:
        raise ValueError(layout)
    full = np.broadcast_to(decode(np.ascontiguousarray(view), dtype), shape)
    return view, np.ascontiguousarray(full)


def mismatch(out, ref, dtype, what=""):
    """None if out (storage dtype) matches the float32 reference, else a description."""
    got = decode(out, dtype).reshape(ref.shape)
    ref = np.asarray(ref, dtype=np.float32)
    err = np.abs(got.astype(np.float64) - ref) / np.maximum(np.abs(ref), 1.0)
    bad = ~(err <= TOL[dtype])  # NaN (unwritten output) counts as bad
    if not bad.any():
        return None
    idx = np.argwhere(bad)
    first = tuple(idx[0])
    return (f"{what}: {int(bad.sum())}/{bad.size} elements off (tol {TOL[dtype]}); first at {first}: "
            f"got {got[first]!r}, want {ref[first]!r}; bad flat indices {np.flatnonzero(bad.reshape(-1))[:8].tolist()}")


def _mx(x):
    return mx.array(np.ascontiguousarray(x, dtype=np.float32))


def _np(x):
    return np.array(x.astype(mx.float32))


def ab_values(op, seed_key):
    rng = _rng(*seed_key)

    def a_fn(shape):
        return rng.uniform(-3, 3, shape).astype(np.float32)

    def b_fn(shape):
        if op is BinaryOp.DIV:  # |b| in [0.5, 2]: no division blow-ups
            return (rng.uniform(0.5, 2, shape) * rng.choice([-1, 1], shape)).astype(np.float32)
        return rng.uniform(-3, 3, shape).astype(np.float32)

    return a_fn, b_fn


def run_binary(kernel, dtype, op, act, shape, la, lb):
    """(outputs, float32 reference) or None where a layout does not apply."""
    a_fn, b_fn = ab_values(op, ("fwd", dtype, op.code, act.code, shape, la, lb))
    A, B = operand(a_fn, shape, la, dtype) or (None, None), operand(b_fn, shape, lb, dtype) or (None, None)
    if A[0] is None or B[0] is None:
        return None
    n = int(np.prod(shape))
    grid, group = geometry(n, dtype)
    m = np.array([op.code, act.code], dtype=np.int32)
    (out,) = kernel(dtype, [A[0], B[0], m], [shape], grid, group)
    ref = _np(act.reference(op.reference(_mx(A[1]), _mx(B[1]))))
    return out, ref


# --- act(a op b) ----------------------------------------------------------------------

@pytest.mark.parametrize("act", list(Activation), ids=str)
@pytest.mark.parametrize("op", list(BinaryOp), ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_activation(host, dtype, op, act):
    failures, ran = [], 0
    for shape, (la, lb) in itertools.product(SHAPES, PAIRS):
        r = run_binary(host["binary_activation"], dtype, op, act, shape, la, lb)
        if r is None:
            continue
        ran += 1
        msg = mismatch(r[0], r[1], dtype, f"shape={shape} a={la} b={lb}")
        if msg:
            failures.append(msg)
    assert ran > 50
    assert not failures, f"binary_activation {dtype} {op}/{act}:\n" + "\n".join(failures[:20])


# --- backward of act(a op b) -----------------------------------------------------------

G_LAYOUTS = ["contiguous", "transposed", "broadcast"]


def _g_operand(rng, shape, layout, dtype):
    if layout == "broadcast":  # a scalar cotangent broadcast to the output: all strides 0
        one = aligned_empty((1,), dtype)
        one[...] = encode(rng.uniform(-2, 2, (1,)).astype(np.float32), dtype)
        view = np.broadcast_to(one.reshape((1,) * len(shape)), shape)
        return view, np.ascontiguousarray(np.broadcast_to(decode(one, dtype), shape))
    return operand(lambda s: rng.uniform(-2, 2, s).astype(np.float32), shape, layout, dtype)


@pytest.mark.parametrize("act", list(Activation), ids=str)
@pytest.mark.parametrize("op", list(BinaryOp), ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_activation_backward(host, dtype, op, act):
    kernel = host["binary_activation_backward"]
    two = op in (BinaryOp.MUL, BinaryOp.DIV)
    failures, ran = [], 0
    cases = [(s, p, "contiguous") for s in SHAPES for p in PAIRS]
    cases += [(s, ("contiguous", "contiguous"), g) for s in SHAPES for g in G_LAYOUTS[1:]]
    for shape, (la, lb), lg in cases:
        key = ("bwd", dtype, op.code, act.code, shape, la, lb, lg)
        a_fn, b_fn = ab_values(op, key)
        A, B = operand(a_fn, shape, la, dtype), operand(b_fn, shape, lb, dtype)
        G = _g_operand(_rng(*key, "g"), shape, lg, dtype)
        if A is None or B is None or G is None:
            continue
        if lg == "broadcast" and int(np.prod(shape)) == 1:
            continue
        ran += 1
        n = int(np.prod(shape))
        grid, group = geometry(n, dtype)
        m = np.array([op.code, act.code], dtype=np.int32)
        da, db = kernel(dtype, [A[0], B[0], G[0], m], [shape, shape if two else (1,)], grid, group)
        a32, b32, g32 = _mx(A[1]), _mx(B[1]), _mx(G[1])
        dz = g32 * activation_grad(act, op.reference(a32, b32))
        where = f"shape={shape} a={la} b={lb} g={lg}"
        if two:
            ra, rb = binary_operand_grads(op, dz, a32, b32)
            for msg in (mismatch(da, _np(ra), dtype, "da " + where), mismatch(db, _np(rb), dtype, "db " + where)):
                if msg:
                    failures.append(msg)
        else:
            msg = mismatch(da, _np(dz), dtype, "da " + where)
            if msg:
                failures.append(msg)
            # add/sub leave db (shape (1,)) alone
            if not np.isnan(decode(db, dtype)).all():
                failures.append(f"db {where}: add/sub wrote db")
    assert ran > 50
    assert not failures, f"binary_activation_backward {dtype} {op}/{act}:\n" + "\n".join(failures[:20])


# --- act(x * scale + shift) and its backward ------------------------------------------

SCALAR_SHAPES = [(1,), (7,), (65,), (1000,), (4099,), (20000,), (25, 800)]
SCALE, SHIFT = 1.5, -0.25


def _p(act):
    return np.array([SCALE, SHIFT, act.code], dtype=np.float32)


@pytest.mark.parametrize("act", list(Activation), ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scalar_activation(host, dtype, act):
    failures = []
    for shape in SCALAR_SHAPES:
        rng = _rng("scalar", dtype, act.code, shape)
        X = operand(lambda s: rng.uniform(-3, 3, s).astype(np.float32), shape, "contiguous", dtype)
        grid, group = geometry(int(np.prod(shape)), dtype)
        (out,) = host["scalar_activation"](dtype, [X[0], _p(act)], [shape], grid, group)
        ref = _np(act.reference(_mx(X[1]) * SCALE + SHIFT))
        msg = mismatch(out, ref, dtype, f"shape={shape}")
        if msg:
            failures.append(msg)
    assert not failures, f"scalar_activation {dtype} {act}:\n" + "\n".join(failures)


@pytest.mark.parametrize("act", list(Activation), ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scalar_activation_backward(host, dtype, act):
    failures = []
    for shape in SCALAR_SHAPES:
        rng = _rng("scalar_bwd", dtype, act.code, shape)
        X = operand(lambda s: rng.uniform(-3, 3, s).astype(np.float32), shape, "contiguous", dtype)
        G = operand(lambda s: rng.uniform(-2, 2, s).astype(np.float32), shape, "contiguous", dtype)
        grid, group = geometry(int(np.prod(shape)), dtype)
        (dx,) = host["scalar_activation_backward"](dtype, [X[0], _p(act), G[0]], [shape], grid, group)
        ref = _np(_mx(G[1]) * activation_grad(act, _mx(X[1]) * SCALE + SHIFT) * SCALE)
        msg = mismatch(dx, ref, dtype, f"shape={shape}")
        if msg:
            failures.append(msg)
    assert not failures, f"scalar_activation_backward {dtype} {act}:\n" + "\n".join(failures)


# --- act(g) * u and its backward (glu, glu_backward) ------------------------------------

GLU_SHAPES = [(1,), (7,), (65,), (1000,), (4099,), (20000,), (25, 800), (3, 5, 7)]
GLU_ACTS = [Activation.SILU, Activation.GELU, Activation.GELU_APPROX]


def _glu_operands(key, shape, dtype, layout="contiguous"):
    rng = _rng(*key)
    return [operand(lambda s: rng.uniform(-3, 3, s).astype(np.float32), shape, layout, dtype) for _ in "gud"]


@pytest.mark.parametrize("act", GLU_ACTS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_glu(host, dtype, act):
    failures = []
    for shape, layout in itertools.product(GLU_SHAPES, ("contiguous", "offset")):
        G, U, D = _glu_operands(("glu", dtype, act.code, shape, layout), shape, dtype, layout)
        grid, group = geometry(int(np.prod(shape)), dtype)
        m = np.array([act.code], dtype=np.int32)
        (out,) = host["glu"](dtype, [G[0], U[0], m], [shape], grid, group)
        msg = mismatch(out, _np(act.reference(_mx(G[1])) * _mx(U[1])), dtype, f"shape={shape} {layout}")
        if msg:
            failures.append(msg)
        dg, du = host["glu_backward"](dtype, [G[0], U[0], D[0], m], [shape, shape], grid, group)
        g32, u32, d32 = _mx(G[1]), _mx(U[1]), _mx(D[1])
        for name, got, want in (("dg", dg, d32 * u32 * activation_grad(act, g32)),
                                ("du", du, d32 * act.reference(g32))):
            msg = mismatch(got, _np(want), dtype, f"{name} shape={shape} {layout}")
            if msg:
                failures.append(msg)
    assert not failures, f"glu {dtype} {act}:\n" + "\n".join(failures[:20])


def test_glu_broken_kernel_fails_comparison():
    """A glu body with a flipped sign does not pass the comparison above."""
    header, body = kernel_source("glu", "cuda")
    spec = KERNEL_SPECS["glu"]
    bad = body.replace("fusion_activation(ACT, x[k]) * y[k]", "-fusion_activation(ACT, x[k]) * y[k]")
    assert bad != body
    k = HostKernel("mutant_glu", header, bad, spec.input_names, spec.output_names)
    G, U, _ = _glu_operands(("glu-mutant",), (25, 800), "float32")
    grid, group = geometry(20000, "float32")
    (out,) = k("float32", [G[0], U[0], np.array([Activation.SILU.code], np.int32)], [(25, 800)], grid, group)
    assert mismatch(out, _np(Activation.SILU.reference(_mx(G[1])) * _mx(U[1])), "float32") is not None


# --- the harness itself ----------------------------------------------------------------

def test_launch_geometry_iterates_grid_stride_loop():
    """The 20000-element cases really take more than one pass of the grid-stride loop."""
    for dtype in DTYPES:
        grid, group = geometry(20000, dtype)
        blocks = -(-grid // group)
        per_pass = blocks * min(group, grid) * (16 // MX_DTYPES[dtype].size)
        assert per_pass < 20000, (dtype, per_pass)


def _mutant(name, old, new, header_edit=False):
    spec = KERNEL_SPECS[name]
    header, body = kernel_source(name, "cuda")
    if header_edit:
        assert old in header, old
        header = header.replace(old, new)
    else:
        body = new
    return HostKernel(f"mutant_{zlib.crc32(repr((old, new)).encode())}", header, body,
                      spec.input_names, spec.output_names)


def test_broken_body_fails_comparison():
    """A body that writes one constant must not pass: the harness can fail."""
    k = _mutant("binary_activation", None, "out[0] = T(1.0f);")
    for dtype in DTYPES:
        out, ref = run_binary(k, dtype, BinaryOp.ADD, Activation.RELU, (8, 125), "contiguous", "contiguous")
        msg = mismatch(out, ref, dtype)
        assert msg is not None and "elements off" in msg, msg


def test_dropped_tail_element_fails_comparison():
    """A subtler mutant (the scalar tail store skips the array's last element) is caught,
    and only for sizes that are not multiples of the vector width."""
    k = _mutant("binary_activation", "k < W && base + k < n", "k < W && base + k < n - 1", header_edit=True)
    out, ref = run_binary(k, "float32", BinaryOp.MUL, Activation.SILU, (7,), "contiguous", "contiguous")
    msg = mismatch(out, ref, "float32")
    assert msg is not None and "1/7" in msg, msg
    out, ref = run_binary(k, "float32", BinaryOp.MUL, Activation.SILU, (25, 800), "contiguous", "contiguous")
    assert mismatch(out, ref, "float32") is None
