"""Where does a fused call's time go on a GPU? Host graph-building vs device.

    PYTHONPATH=. python3 tools/gpu_profile.py
"""
import time

import mlx.core as mx

from mlx_fusion import ops
from mlx_fusion.timing import time_call
from mlx_fusion.ops.elementwise import _binary_primitive, launch_binary
from mlx_fusion.patterns import Activation, BinaryOp


def host_us(f, n=500):
    f()
    t = time.perf_counter()
    outs = [f() for _ in range(n)]
    dt = (time.perf_counter() - t) / n * 1e6
    mx.eval(outs[-1])
    return dt


def main():
    for n in (2**16, 2**20, 2**24):
        a = mx.random.normal((n // 4096 or 1, min(n, 4096)))
        b = mx.random.normal(a.shape)
        mx.eval(a, b)
        prim = _binary_primitive(BinaryOp.ADD, Activation.RELU)
        raw = mx.fast.cuda_kernel(
            "raw_add_relu", ["a", "b"], ["out"],
            "const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;\n"
            "if (i < N) { float z = float(a[i]) + float(b[i]); out[i] = z > 0 ? z : 0; }")
        cands = {
            "eager ref": lambda: mx.maximum(a + b, 0),
            "compiled ref": mx.compile(lambda a, b: mx.maximum(a + b, 0)),
            "fused_binary": lambda: ops.fused_binary(a, b),
            "primitive": lambda: prim(a, b),
            "launch_binary": lambda: launch_binary(BinaryOp.ADD, Activation.RELU, a, b, a.shape),
            "raw kernel": lambda: raw(inputs=[a, b], output_shapes=[a.shape], output_dtypes=[a.dtype],
                                      grid=(a.size, 1, 1), threadgroup=(256, 1, 1), template=[("N", a.size)])[0],
        }
        cands["compiled ref"] = (lambda f: (lambda: f(a, b)))(cands["compiled ref"])
        print(f"n={n}")
        for name, f in cands.items():
            h = host_us(f)
            t1 = time_call(lambda: f(), [], calls_per_eval=1, repeats=30) * 1e6
            t10 = time_call(lambda: f(), [], calls_per_eval=10, repeats=30) * 1e6
            t50 = time_call(lambda: f(), [], calls_per_eval=50, repeats=10) * 1e6
            print(f"  {name:<14} host build {h:7.1f} us | per call: 1/eval {t1:7.1f}  10/eval {t10:7.1f}  50/eval {t50:7.1f}")


if __name__ == "__main__":
    main()
