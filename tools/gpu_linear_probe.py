"""Linear + bias + activation on a GPU: the small-M kernel against MLX, and what a
fused training step keeps in memory. One run prints both tables.

    PYTHONPATH=. python3 tools/gpu_linear_probe.py [small_m] [memory]
"""
import json
import os
import sys

import mlx.core as mx
import mlx.nn as nn

from mlx_fusion import ops
from mlx_fusion.timing import peak_memory, time_call
from mlx_fusion.ops import linear as linear_mod

OUT = os.environ.get("OUT", "/tmp")
TIMING = dict(calls_per_eval=20, repeats=15, warmup=3)
results = {}


def eager(x, w, b):
    return nn.relu(mx.addmm(b, x, w.T))


compiled = mx.compile(eager)


def fused(x, w, b):
    return ops.fused_linear(x, w, b, "relu")


def rel_err(got, x, w, b, act):
    want = ops.linear_reference(x.astype(mx.float32), w.astype(mx.float32), b.astype(mx.float32), act)
    return (mx.abs(got.astype(mx.float32) - want).max() / (mx.abs(want).max() + 1e-6)).item()


def correctness():
    print("correctness (max |fused - f32 reference| / max |reference|):")
    for m in (1, 17, 32, 64):
        for n in (40, 4096):
            for act in ("relu", "gelu", "silu"):
                k = mx.random.split(mx.random.key(m + n), 3)
                x = mx.random.normal((m, 4096), key=k[0]).astype(mx.bfloat16)
                w = (mx.random.normal((n, 4096), key=k[1]) / 64).astype(mx.bfloat16)
                b = mx.random.normal((n,), key=k[2]).astype(mx.bfloat16)
                e = rel_err(ops.fused_linear(x, w, b, act), x, w, b, act)
                print(f"  M={m:3d} N={n:5d} {act:5s} rel err {e:.2e}", "OK" if e < 2e-2 else "FAIL")


W_SETS = 8  # distinct weights per timed batch: 8 x 32-88 MB, more than the 50 MB L2 holds


def time_rotating(fn, sets):
    """Median us per call of fn over W_SETS weight sets (as in decoding, where each
    layer's weight comes from HBM), all calls of a repeat in one eval."""
    import statistics
    import time

    for _ in range(3):
        mx.eval([fn(*a) for a in sets])
    times = []
    for _ in range(15):
        t0 = time.perf_counter()
        mx.eval([fn(*a) for _ in range(4) for a in sets])
        times.append((time.perf_counter() - t0) / (4 * len(sets)))
    return statistics.median(times) * 1e6


def small_m():
    rows = []
    print("\ntiming, bf16, K=4096, relu, 8 rotating weights; us per call (under mx.compile unless eager)")
    print(f"{'M':>3} {'N':>6} {'small':>5} {'eager':>8} {'compile':>8} {'fused addmm':>11} {'fused':>8} "
          f"{'vs compile':>10} {'HBM GB/s':>8}")
    for n in (4096, 11008):
        for m in (1, 8, 16, 32, 64):
            sets = []
            for i in range(W_SETS):
                k = mx.random.split(mx.random.key(m * n + i), 3)
                sets.append([mx.random.normal((m, 4096), key=k[0]).astype(mx.bfloat16),
                             (mx.random.normal((n, 4096), key=k[1]) / 64).astype(mx.bfloat16),
                             mx.random.normal((n,), key=k[2]).astype(mx.bfloat16)])
            mx.eval(sets)
            t_e = time_rotating(eager, sets)
            t_c = time_rotating(compiled, sets)
            linear_mod.SMALL_M_ROWS = 0
            t_k = time_rotating(mx.compile(fused), sets)
            linear_mod.SMALL_M_ROWS = 32
            t_s = time_rotating(mx.compile(fused), sets)
            small = linear_mod.small_m_eligible(m, 4096, mx.bfloat16)
            gbps = (n * 4096 * 2 + m * 4096 * 2 + 2 * m * n * 2) / t_s / 1e3
            print(f"{m:3d} {n:6d} {'yes' if small else 'no':>5} {t_e:8.1f} {t_c:8.1f} {t_k:11.1f} {t_s:8.1f} "
                  f"{t_c/t_s:9.2f}x {gbps:8.0f}")
            rows.append(dict(m=m, n=n, k=4096, small_m=small, eager_us=t_e, compile_us=t_c,
                             fused_addmm_us=t_k, fused_us=t_s, hbm_gbps=gbps))
            del sets
    results["small_m"] = rows


def ncu_target():
    """A few calls of one variant, for `ncu` to time each kernel on the device alone:
    PROBE_VARIANT = compile | small_m, PROBE_M, PROBE_N."""
    m, n = int(os.environ.get("PROBE_M", "1")), int(os.environ.get("PROBE_N", "4096"))
    k = mx.random.split(mx.random.key(0), 3)
    args = [mx.random.normal((m, 4096), key=k[0]).astype(mx.bfloat16),
            (mx.random.normal((n, 4096), key=k[1]) / 64).astype(mx.bfloat16),
            mx.random.normal((n,), key=k[2]).astype(mx.bfloat16)]
    mx.eval(args)
    fn = compiled if os.environ.get("PROBE_VARIANT") == "compile" else mx.compile(fused)
    for _ in range(5):
        mx.eval(fn(*args))


class MLP(nn.Module):
    def __init__(self, width, depth, mode):
        super().__init__()
        self.layers = [nn.Linear(width, width) for _ in range(depth)]
        self.mode = mode

    def __call__(self, x):
        for l in self.layers:
            if self.mode == "fused":
                x = ops.fused_linear(x, l.weight, l.bias, "relu")
            elif self.mode == "vjp-mlx":
                x = relu_linear_mlx(x, l.weight, l.bias)
            else:
                x = nn.relu(l(x))
        return x


@mx.custom_function
def relu_linear_mlx(x, w, b):
    return nn.relu(mx.addmm(b, x, w.T))


@relu_linear_mlx.vjp
def _relu_linear_vjp(primals, cotangent, output):
    x, w, b = primals
    dz = mx.where(output > 0, cotangent, 0)
    return dz @ w, dz.T @ x, dz.sum(0)


# (label, MLP mode, MLX_FUSION_LINEAR_EPILOGUE)
MEMORY_VARIANTS = [("mx.compile", "mlx", "mlx"), ("mlx-epilogue", "fused", "mlx"),
                   ("kernel-epilogue", "fused", "kernel"), ("vjp-mlx", "vjp-mlx", "mlx")]


def memory():
    rows = []
    width, depth, batch = (256, 6, 512) if os.environ.get("PROBE_SMALL") else (4096, 6, 8192)
    print(f"\ntraining step, {depth}-layer ReLU MLP, width {width}, batch {batch}, bf16, whole step compiled")
    for label, mode, epilogue in MEMORY_VARIANTS:
        os.environ["MLX_FUSION_LINEAR_EPILOGUE"] = epilogue  # read at each fused_linear call
        mx.random.seed(0)
        model = MLP(width, depth, mode)
        model.set_dtype(mx.bfloat16)
        x = mx.random.normal((batch, width)).astype(mx.bfloat16)
        mx.eval(model.parameters())
        vg = nn.value_and_grad(model, lambda x: model(x).astype(mx.float32).sum())
        step = mx.compile(vg, inputs=model.state, outputs=model.state)
        t = time_call(step, [x], calls_per_eval=2, repeats=7, warmup=2)
        peak, extra = peak_memory(step, [x])
        print(f"  {label:15s} {t*1e3:8.2f} ms  peak {peak/2**20:7.0f} MiB  over resident {extra/2**20:7.0f} MiB")
        rows.append(dict(mode=label, ms=t * 1e3, peak_mib=peak / 2**20, over_resident_mib=extra / 2**20))
        del model, vg, step
    results["memory"] = rows


if __name__ == "__main__":
    parts = sys.argv[1:] or ["correctness", "small_m", "memory"]
    print(mx.default_device(), mx.__version__)
    for p in parts:
        globals()[p]()
    if "ncu_target" in parts:
        sys.exit(0)
    with open(os.path.join(OUT, "linear_probe.json"), "w") as f:
        json.dump(results, f, indent=1)
