"""Pick the CUDA kernels' vectors per thread (U, the grid-stride loop's trip count): time add+relu forward and
backward, f32 and bf16, at 1M/16M/64M elements for U in 1, 2, 4, 8 against
mx.compile and MLX's own copy, all under mx.compile (no Python per call).

    PYTHONPATH=. python3 tools/gpu_unroll.py
"""
import mlx.core as mx

from mlx_fusion import ops
from mlx_fusion.timing import copy_bandwidth, time_call
from mlx_fusion.ops import common


def set_unroll(u):
    common.GPU_VECTORS = {4: u, 2: u}


def main():
    ref = lambda a, b: mx.maximum(a + b, 0)  # noqa: E731
    fused = lambda a, b: ops.fused_binary(a, b, "add", "relu")  # noqa: E731
    vjp = lambda f: (lambda a, b, g: mx.vjp(f, [a, b], [g])[1])  # noqa: E731
    for dtype in (mx.float32, mx.bfloat16):
        for n in (2**20, 2**24, 2**26):
            a, b = (mx.random.normal((n // 4096, 4096)).astype(dtype) for _ in range(2))
            g = mx.ones_like(a)
            t = dict(calls_per_eval=20, repeats=15)
            copy = copy_bandwidth(n, dtype, **t)
            fwd_bytes, bwd_bytes = 3 * a.nbytes, 4 * a.nbytes  # bwd: read a, b, g; write dz
            row = [f"{str(dtype)[9:]:<9}{n:>10}  copy {copy:6.0f} GB/s"]
            tc = time_call(mx.compile(ref), [a, b], **t)
            tcb = time_call(mx.compile(vjp(ref)), [a, b, g], **t)
            row.append(f"compile fwd {fwd_bytes / tc / 1e9:6.0f} bwd {bwd_bytes / tcb / 1e9:6.0f}")
            for u in (1, 2, 4, 8):
                set_unroll(u)
                tf = time_call(mx.compile(fused), [a, b], **t)
                tb = time_call(mx.compile(vjp(fused)), [a, b, g], **t)
                row.append(f"U={u} fwd {fwd_bytes / tf / 1e9:6.0f} bwd {bwd_bytes / tb / 1e9:6.0f}")
            print(" | ".join(row), flush=True)
    set_unroll(2)
    common.GPU_VECTORS = {4: 2, 2: 4}


if __name__ == "__main__":
    main()
