"""Execution checks of the kernel sources on the CPU, shared by the kernel tests and the
mutation tests (tests/test_kernel_mutations.py runs them on deliberately broken sources).

Each check drives the fused ops with a kernel backend forced to a CPU shim
(`kernels.use_backend(backend, factory)`): the ops launch their kernels exactly as on a GPU
(grid, threadgroup, template arguments, hidden outputs), the shim records every launch, and
the recorded outputs are compared with NumPy / float32 MLX references. A check returns a
list of failure descriptions (empty: the kernel computed what it should).
"""

from __future__ import annotations

import zlib
from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from mlx_fusion import kernels
from mlx_fusion.ops import binary_reference, fused_binary, fused_linear, fused_scalar, scalar_reference
from mlx_fusion.patterns import Activation
from tests.cuda_shim import kernel as cuda_kernel
from tests.metal_shim import RecordingShimMetalKernel, recording_factory as metal_recording_factory

BACKENDS = ("cuda", "metal")
MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# Half an ulp, relative, of one rounding to the output dtype (normal range).
ROUNDING = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
# Smallest positive subnormal / 2: the absolute floor of one rounding.
FLOOR = {"float32": 1e-45, "float16": 2.0**-25, "bfloat16": 1e-38}

Edit = Callable[[str, str, str], Tuple[str, str]]


def factory(backend: str, edit: Optional[Edit] = None):
    """The recording kernel factory of a backend's CPU shim, optionally building every kernel
    from edit(name, header, body)."""
    if backend == "cuda":
        return cuda_kernel.recording_factory(edit)
    return metal_recording_factory(edit)


def launches(backend: str) -> list:
    """The backend's record of launches (appended to by every recording factory)."""
    return cuda_kernel.HostCudaKernel.launches if backend == "cuda" else RecordingShimMetalKernel.launches


def launch_template(backend: str, record) -> Tuple[Tuple[str, object], ...]:
    """The template arguments of a recorded launch other than the dtype T."""
    template = record.template if backend == "cuda" else tuple(record[1].get("template") or ())
    return tuple((n, v) for n, v in template if n != "T")


def launch_name(backend: str, record) -> str:
    return record.name if backend == "cuda" else record[0]


def _launch_outputs(backend: str, record) -> Tuple[str, List[np.ndarray]]:
    """(kernel name, outputs as float32 numpy arrays) of one recorded launch."""
    if backend == "cuda":
        from tests.cuda_shim.host import decode

        return record.name, [decode(y, d) for y, d in zip(record.outputs, record.output_dtypes)]
    name, _, outs = record
    return name, [np.array(y.astype(mx.float32)) for y in outs]


def rng(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


# --- the small-M GEMM: act(x @ w.T + b) -------------------------------------------------

def _act_np(act: Activation, z: np.ndarray) -> np.ndarray:
    return np.array(act.reference(mx.array(z.astype(np.float32))))


def linear_mismatch(got: np.ndarray, want: np.ndarray, scale: np.ndarray, dtype: str, what: str,
                    lipschitz: float = 1.0) -> Optional[str]:
    """None if `got` is `want` up to one rounding to `dtype` plus float32 accumulation-order
    differences (2^-20 of sum_k |x_k w_k| + |b|, times the activation's Lipschitz bound)."""
    tol = ROUNDING[dtype] * 1.001 * np.abs(want) + 2.0**-20 * lipschitz * scale + FLOOR[dtype]
    bad = ~(np.abs(got.astype(np.float64) - want) <= tol)  # NaN (an unwritten element) is bad
    if not bad.any():
        return None
    i = tuple(np.argwhere(bad)[0])
    return (f"{what}: {int(bad.sum())}/{bad.size} off; first at {i}: got {got[i]!r}, want {want[i]!r} "
            f"(tol {tol[i]:.3g})")


def check_linear(backend: str, fac, m: int, k: int, n: int, dtype: str, act: Activation,
                 bias: bool, misaligned: bool = False) -> List[str]:
    """Run fused_linear (small-M path) through `fac` and check both outputs, z and act(z).
    misaligned: x is a view starting one element into its buffer (no 16-byte loads)."""
    r = rng("linear", m, k, n, dtype, act.value, bias, misaligned)
    dt = MX_DTYPES[dtype]
    x = mx.array(r.uniform(-1, 1, (m * k + 1,)).astype(np.float32)).astype(dt)
    x = x[1:].reshape(m, k) if misaligned else x[:-1].reshape(m, k)
    w = mx.array((r.uniform(-1, 1, (n, k)) * (2 / np.sqrt(k))).astype(np.float32)).astype(dt)
    b = mx.array(r.uniform(-1, 1, (n,)).astype(np.float32)).astype(dt) if bias else None
    record = launches(backend)
    before = len(record)
    with kernels.use_backend(backend, fac):
        y = fused_linear(x, w, b, act)
        mx.eval(y)
    runs = [_launch_outputs(backend, rec) for rec in record[before:]]
    runs = [outs for name, outs in runs if "linear_activation" in name]
    where = f"{backend} linear M={m} K={k} N={n} {dtype} {act.value} bias={bias}" + (" misaligned" * misaligned)
    if len(runs) != 1:
        return [f"{where}: the small-M kernel ran {len(runs)} times, expected once"]
    out, z = runs[0]
    x64, w64 = (np.array(t.astype(mx.float32)).astype(np.float64) for t in (x, w))
    b64 = np.array(b.astype(mx.float32)).astype(np.float64) if bias else np.zeros(n)
    z_ref = x64 @ w64.T + b64
    scale = np.abs(x64) @ np.abs(w64).T + np.abs(b64)
    failures = [linear_mismatch(z, z_ref, scale, dtype, where + " z"),
                linear_mismatch(out, _act_np(act, z_ref), scale, dtype, where + " out", lipschitz=1.2)]
    if not np.array_equal(np.array(y.astype(mx.float32)), out, equal_nan=True):
        failures.append(f"{where}: fused_linear did not return the kernel's output")
    return [f for f in failures if f]


# Shapes of the mutation checks and the quick part of the GEMM tests: one and two 16-row
# tiles, K and N not multiples of any tile (K = 1064 > 8 warps x 32 x U = 1024: two
# iterations of the outer K loop).
QUICK_LINEAR = [(3, 40, 13), (20, 1064, 37)]


def check_linear_quick(backend: str, fac, dtype: str = "bfloat16", acts: Sequence[Activation] = (Activation.SILU,),
                       bias: bool = True) -> List[str]:
    failures = []
    for (m, k, n) in QUICK_LINEAR:
        for act in acts:
            failures += check_linear(backend, fac, m, k, n, dtype, act, bias)
    return failures


# --- the elementwise kernels, forward and backward --------------------------------------

ELEMENTWISE_TOL = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}


def _close(got: mx.array, want: mx.array, dtype: str, what: str, scale: float = 1.0) -> Optional[str]:
    g, w = (np.array(t.astype(mx.float32)) for t in (got, want))
    tol = ELEMENTWISE_TOL[dtype] * (np.abs(w) + scale)
    bad = ~(np.abs(g - w) <= tol)
    if g.shape != w.shape:
        return f"{what}: shape {g.shape} != {w.shape}"
    if not bad.any():
        return None
    i = tuple(np.argwhere(bad)[0])
    return f"{what}: {int(bad.sum())}/{bad.size} off; first at {i}: got {g[i]!r}, want {w[i]!r}"


def _grads(fn, arrays, cot):
    return mx.grad(lambda *xs: (fn(*xs).astype(mx.float32) * cot).sum(), argnums=tuple(range(len(arrays))))(*arrays)


# (op, activation): every op and every activation once. The (5, 13) x (13,) pair puts a
# row-broadcast operand in; 65 elements are not a multiple of any vector width.
BINARY_CASES = [("add", "gelu"), ("sub", "silu"), ("mul", "relu"), ("div", "gelu_approx")]
SCALAR_CASES = [(1.5, -0.25, act.value) for act in Activation]


def check_elementwise(backend: str, fac, dtype: str = "float32", kinds=("binary", "scalar")) -> List[str]:
    """fused_binary / fused_scalar values and gradients through `fac` vs the unfused MLX
    expressions (which the CPU computes); the kernels must really have run."""
    dt = MX_DTYPES[dtype]
    failures = []
    r = rng("elementwise", dtype)
    a = mx.array(r.uniform(-3, 3, (5, 13)).astype(np.float32)).astype(dt)
    bs = {"full": mx.array(r.uniform(0.5, 2, (5, 13)).astype(np.float32)).astype(dt),
          "row": mx.array(r.uniform(0.5, 2, (13,)).astype(np.float32)).astype(dt)}
    cot = mx.array(r.uniform(-1, 1, (5, 13)).astype(np.float32))
    record = launches(backend)
    before = len(record)
    with kernels.use_backend(backend, fac):
        cases = []
        if "binary" in kinds:
            for bname, b in bs.items():
                for op, act in BINARY_CASES:
                    fused = lambda x, y, op=op, act=act: fused_binary(x, y, op, act)
                    ref = lambda x, y, op=op, act=act: binary_reference(x, y, op, act)
                    cases.append((f"{op}+{act} b={bname}", fused, ref, [a, b]))
        if "scalar" in kinds:
            for scale, shift, act in SCALAR_CASES:
                fused = lambda x, s=scale, t=shift, act=act: fused_scalar(x, s, t, act)
                ref = lambda x, s=scale, t=shift, act=act: scalar_reference(x, s, t, act)
                cases.append((f"{scale}*x{shift:+}+{act}", fused, ref, [a]))
        for what, fused, ref, arrays in cases:
            where = f"{backend} {dtype} {what}"
            failures.append(_close(fused(*arrays), ref(*arrays), dtype, where))
            for i, (g, gr) in enumerate(zip(_grads(fused, arrays, cot), _grads(ref, arrays, cot))):
                failures.append(_close(g, gr, dtype, f"{where} grad {i}", 4 * max(1.0, float(mx.abs(gr).max()))))
    if len(record) == before:
        failures.append(f"{backend}: no kernel ran")
    return [f for f in failures if f]
