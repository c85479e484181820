"""CPU forward + backward of the fused ops (issue 12 item 6): time and peak memory of
``mx.value_and_grad(sum(op(...) * w))``, eager and under ``mx.compile``, for the unfused
reference, the shipped fused op and the other CPU designs that were tried.

    python benchmarks/cpu_backward.py                       # every case, 1M 4M 16M, f32 + bf16
    python benchmarks/cpu_backward.py --passes fwd          # the op alone, no autodiff
    python benchmarks/cpu_backward.py --cases add+relu --sizes 16M --dtypes float32
    python benchmarks/cpu_backward.py --variants ref,fused,custom_vjp --repeats 9

Variants (each eager and compiled):
  ref         the unfused MLX expression, MLX autodiff
  fused       the fused op as shipped (`fused_binary`, `fused_scalar`, `fused_linear`, ...)
  custom_vjp  the op's `mx.custom_function` primitive called directly (the GPU design, and the
              CPU path before issue 12 item 6: float32 MLX expressions under mx.compile)
  f32         the float32 expression of the kernels under mx.compile, MLX autodiff
  cref        the reference under mx.compile, MLX autodiff
(for the linear cases f32 and cref are act(mx.addmm(b, x, W.T)), the activation compiled)

Times are medians of interleaved rounds (the machine is shared); memory is the peak above the
inputs (mx.get_peak_memory after mx.reset_peak_memory), exact and repeatable. MLX's CPU cache
limit is raised to 4 GiB (FACTS.md). Results: docs/performance.md, "CPU backward".
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from mlx_fusion.ops.add_norm import add_rms_norm_reference, fused_add_rms_norm  # noqa: E402
from mlx_fusion.ops.binary import _binary_primitive, binary_reference, fused_binary  # noqa: E402
from mlx_fusion.ops.common import f32  # noqa: E402
from mlx_fusion.ops.linear import _linear_primitive, fused_linear, linear_reference  # noqa: E402
from mlx_fusion.ops.scalar import _params, _scalar_primitive, fused_scalar, scalar_reference  # noqa: E402
from mlx_fusion.patterns import Activation, BinaryOp, activation_reference  # noqa: E402

SCALE, SHIFT, EPS, LINEAR_K, LINEAR_N, NORM_D = 1.5, -0.25, 1e-5, 8, 1024, 4096


def _binary(op, act):
    o, a = BinaryOp(op), Activation(act)
    fn = activation_reference(a)
    return {"ref": lambda x, y: binary_reference(x, y, o, a),
            "fused": lambda x, y: fused_binary(x, y, o, a),
            "custom_vjp": lambda x, y: _binary_primitive(o, a, 0.0)(x, y),
            "f32": mx.compile(lambda x, y: fn(o.reference(f32(x), f32(y))).astype(x.dtype)),
            "cref": mx.compile(lambda x, y: fn(o.reference(x, y)))}


def _scalar(act):
    a = Activation(act)
    fn = activation_reference(a)
    return {"ref": lambda x: scalar_reference(x, SCALE, SHIFT, a),
            "fused": lambda x: fused_scalar(x, SCALE, SHIFT, a),
            "custom_vjp": lambda x: _scalar_primitive(a, 0.0)(x, _params(SCALE, SHIFT, a)),
            "f32": mx.compile(lambda x: fn(f32(x) * SCALE + SHIFT).astype(x.dtype)),
            "cref": mx.compile(lambda x: fn(x * SCALE + SHIFT))}


def _linear(act):
    a = Activation(act)
    fn = activation_reference(a)
    f32_act, c_act = mx.compile(lambda z: fn(f32(z)).astype(z.dtype)), mx.compile(fn)

    def custom(x, w, b):
        prim, keep_z = _linear_primitive(a, True, 0.0)
        y = prim(x, w, b)
        return y[0] if keep_z else y

    return {"ref": lambda x, w, b: linear_reference(x, w, b, a),
            "fused": lambda x, w, b: fused_linear(x, w, b, a),
            "custom_vjp": custom,
            "f32": lambda x, w, b: f32_act(mx.addmm(b, x, w.T)),
            "cref": lambda x, w, b: c_act(mx.addmm(b, x, w.T))}


def _add_rms():
    def pack(out):  # both outputs, with different cotangents
        h, y = out
        return y + 0.5 * h
    return {"ref": lambda x, r, w: pack(add_rms_norm_reference(x, r, w, EPS)),
            "fused": lambda x, r, w: pack(fused_add_rms_norm(x, r, w, EPS))}


CASES = {"add+relu": (_binary("add", "relu"), "binary"), "mul+silu": (_binary("mul", "silu"), "binary"),
         "add+gelu": (_binary("add", "gelu"), "binary"),
         "affine+relu": (_scalar("relu"), "scalar"), "affine+silu": (_scalar("silu"), "scalar"),
         "linear+bias+relu": (_linear("relu"), "linear"), "linear+bias+silu": (_linear("silu"), "linear"),
         "add+rms_norm": (_add_rms(), "rows")}


def inputs(kind, n, dtype, key):
    """The op's inputs for an output of n elements, and the loss weight w of the output's shape."""
    ks = mx.random.split(key, 5)
    rnd = lambda shape, k, s=1.0: (s * mx.random.normal(shape, key=k)).astype(dtype)  # noqa: E731
    if kind == "linear":
        m = n // LINEAR_N
        args = [rnd((m, LINEAR_K), ks[0]), rnd((LINEAR_N, LINEAR_K), ks[1], LINEAR_K**-0.5), rnd((LINEAR_N,), ks[2])]
        shape = (m, LINEAR_N)
    elif kind == "rows":
        shape = (n // NORM_D, NORM_D)
        args = [rnd(shape, ks[0]), rnd(shape, ks[1]), (1 + 0.5 * mx.random.normal((NORM_D,), key=ks[2])).astype(dtype)]
    else:
        shape = (n // 4096, 4096)
        args = [rnd(shape, k) for k in ks[:2 if kind == "binary" else 1]]
    return args, rnd(shape, ks[4])


def step_of(fn, w, nargs):
    """value_and_grad of sum(fn(*args) * w) with respect to every argument."""
    return mx.value_and_grad(lambda *a: (fn(*a) * w).astype(mx.float32).sum(), argnums=tuple(range(nargs)))


def measure(fns, args, repeats):
    """Median ms and peak MiB (above what was allocated before the call) of each fn, the fns
    interleaved in every round so that load changes on the shared machine hit all alike."""
    mx.eval(args)
    for fn in fns:  # warm up (compiles, fills the buffer cache)
        for _ in range(2):
            mx.eval(fn(*args))
    times, peaks = [[] for _ in fns], [0.0] * len(fns)
    for r in range(repeats):
        # Each round starts at another variant: the first call of a round measured slower.
        for i in [(r + j) % len(fns) for j in range(len(fns))]:
            fn = fns[i]
            mx.synchronize()
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            t0 = time.perf_counter()
            out = fn(*args)
            mx.eval(out)
            times[i].append((time.perf_counter() - t0) * 1e3)
            peaks[i] = max(peaks[i], (mx.get_peak_memory() - base) / 2**20)
            del out
    return [statistics.median(t) for t in times], peaks


SIZES = {"1M": 1 << 20, "4M": 1 << 22, "16M": 1 << 24}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--sizes", default="1M,4M,16M", help="output elements: 1M, 4M, 16M")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--variants", default="ref,fused,custom_vjp,f32")
    ap.add_argument("--passes", default="fwd+bwd", help="fwd+bwd and/or fwd (the op alone, no autodiff)")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args(argv)
    mx.set_cache_limit(4 << 30)
    want = a.variants.split(",")
    print(f"mlx {mx.__version__}, device {mx.default_device()}; ms median of {a.repeats}, MiB peak above inputs")
    print("ratios: ref time (or peak) / variant's, eager over eager and compiled over compiled; >1 = variant better")
    hdr = f"{'case':<17}{'pass':<8}{'size':>5} {'dtype':<9}{'variant':<11}{'eager ms':>9}{'comp ms':>9}" \
          f"{'eager MiB':>10}{'comp MiB':>9}{'t eager':>8}{'t comp':>7}{'m eager':>8}{'m comp':>7}{'vs comp':>8}"
    print(hdr, flush=True)
    for name in a.cases.split(","):
        variants, kind = CASES[name]
        names = [v for v in want if v in variants]
        for size, dt, pass_ in itertools.product(a.sizes.split(","), a.dtypes.split(","), a.passes.split(",")):
            args, w = inputs(kind, SIZES[size], getattr(mx, dt), mx.random.key(0))
            fns = []
            for v in names:
                step = step_of(variants[v], w, len(args)) if pass_ == "fwd+bwd" else variants[v]
                fns += [step, mx.compile(step)]
            t, m = measure(fns, args, a.repeats)
            t0, m0 = t[0:2], m[0:2]
            for i, v in enumerate(names):
                te, tc, me, mc = t[2 * i], t[2 * i + 1], m[2 * i], m[2 * i + 1]
                # "vs comp": the variant's faster column against compiled reference (the bar)
                print(f"{name:<17}{pass_:<8}{size:>5} {dt:<9}{v:<11}{te:9.2f}{tc:9.2f}{me:10.1f}{mc:9.1f}"
                      f"{t0[0] / te:8.2f}{t0[1] / tc:7.2f}{m0[0] / max(me, 1e-9):8.2f}{m0[1] / max(mc, 1e-9):7.2f}"
                      f"{t0[1] / min(te, tc):8.2f}", flush=True)


if __name__ == "__main__":
    main()
