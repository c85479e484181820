"""Does a fused residual add + RMSNorm pay on the CPU? Times h = x + r; y = rms_norm(h, w, eps)
(forward, and forward + backward) unfused and as a custom primitive (one `mx.custom_function`
with two outputs and a compiled closed-form backward, the kernels' math), eager and under
mx.compile, with MLX's buffer cache raised. It did not pay (docs/add-norm.md), so on the CPU
`fused_add_rms_norm` runs the unfused code.

    python tools/add_norm_cpu.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

from mlx_fusion.ops.add_norm import add_rms_norm_reference


def _f32(t):
    return t.astype(mx.float32)


@mx.compile
def _backward(h, w, dy, dh, eps):
    hf, dyf = _f32(h), _f32(dy)
    rstd = mx.rsqrt(mx.mean(hf * hf, axis=-1, keepdims=True) + eps)
    n = hf * rstd
    g = dyf * _f32(w)
    dx = (_f32(dh) + rstd * (g - n * mx.mean(g * n, axis=-1, keepdims=True))).astype(h.dtype)
    return dx, (dyf * n).reshape(-1, h.shape[-1]).sum(axis=0).astype(w.dtype)


@mx.custom_function
def _primitive(x, r, w):
    h = x + r
    return h, mx.fast.rms_norm(h, w, 1e-5)


@_primitive.vjp
def _primitive_vjp(primals, cotangents, outputs):
    dx, dw = _backward(outputs[0], primals[2], cotangents[1], cotangents[0], mx.array(1e-5))
    return dx, dx, dw


def fused_add_rms_norm(x, r, w, eps):
    assert eps == 1e-5
    return _primitive(x, r, w)


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
