"""Does the fused residual add + RMSNorm pay on the CPU? Times h = x + r; y = rms_norm(h, w, eps)
(forward, and forward + backward) unfused and as `fused_add_rms_norm`, eager and under
mx.compile, with MLX's buffer cache raised (docs/add-norm.md has the numbers).

    python tools/add_norm_cpu.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

from mlx_fusion.ops.add_norm import add_rms_norm_reference, fused_add_rms_norm


def _median_ms(fn, args, repeat):
    mx.eval(fn(*args))
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        mx.eval(fn(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def _step(fn):
    def loss(x, r, w):
        h, y = fn(x, r, w, 1e-5)
        return (h.astype(mx.float32) * 0.5).sum() + y.astype(mx.float32).sum()

    return mx.value_and_grad(loss, argnums=(0, 1, 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    a = ap.parse_args()
    mx.set_cache_limit(4 << 30)
    print("| shape | dtype | what | unfused eager | fused eager | unfused compiled | fused compiled |")
    print("|---|---|---|---|---|---|---|")
    for shape in [(1, 2048), (64, 2048), (512, 2048)]:
        for dt in (mx.float32, mx.bfloat16):
            k = mx.random.split(mx.random.key(0), 3)
            args = [mx.random.normal(shape, key=k[0]).astype(dt), mx.random.normal(shape, key=k[1]).astype(dt),
                    mx.random.normal(shape[-1:], key=k[2]).astype(dt)]
            mx.eval(args)
            for what, make in (("forward", lambda f: (lambda *t: f(*t, 1e-5))), ("fwd+bwd", _step)):
                ref, fused = make(add_rms_norm_reference), make(fused_add_rms_norm)
                row = [_median_ms(f, args, a.repeat) for f in (ref, fused, mx.compile(ref), mx.compile(fused))]
                print(f"| {shape} | {dt} | {what} | " + " | ".join(f"{t:.3f} ms" for t in row) + " |")


if __name__ == "__main__":
    main()
