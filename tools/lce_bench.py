"""Linear + cross-entropy on the default device (CPU or GPU): fwd+bwd time and peak memory, fused vs unfused vs mx.compile.

    python tools/lce_bench.py [--tokens 256 --dim 256 --vocab 8192 --dtype float32 --repeats 7]

One run measures every variant, interleaved, several repeats (ratios in one run: docs/linear-cross-entropy.md).
Peak memory: mx.get_peak_memory after mx.reset_peak_memory, inputs already evaluated.
"""

import argparse
import time

import mlx.core as mx

from mlx_fusion.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference


def variants(chunk):
    ref = lambda h, w, t: linear_cross_entropy_reference(h, w, t, "mean")  # noqa: E731
    fused = lambda h, w, t: linear_cross_entropy(h, w, t, "mean", chunk_size=chunk)  # noqa: E731
    vg = lambda f: mx.value_and_grad(f, argnums=(0, 1))  # noqa: E731
    return {"unfused": vg(ref), "unfused mx.compile": mx.compile(vg(ref)), "fused": vg(fused),
            "fused mx.compile": mx.compile(vg(fused))}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--chunk", type=int, default=None)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    dt = getattr(mx, a.dtype)
    k1, k2, k3 = mx.random.split(mx.random.key(0), 3)
    h = mx.random.normal((a.tokens, a.dim), key=k1).astype(dt)
    w = (mx.random.normal((a.vocab, a.dim), key=k2) * a.dim ** -0.5).astype(dt)
    t = mx.random.randint(0, a.vocab, (a.tokens,), key=k3)
    mx.eval(h, w, t)
    fns = variants(a.chunk)
    times = {k: [] for k in fns}
    peaks = {}
    for name, f in fns.items():  # warm up (and compile)
        mx.eval(f(h, w, t))
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(f(h, w, t))
        peaks[name] = mx.get_peak_memory() - base
    for _ in range(a.repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            mx.eval(f(h, w, t))
            times[name].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"tokens {a.tokens} D {a.dim} V {a.vocab} {a.dtype}, fwd+bwd (value_and_grad of the mean), "
          f"median of {a.repeats}; logits {a.tokens * a.vocab * dt.size / 2**20:.1f} MiB")
    print(f"{'variant':22s} {'ms':>8s} {'vs unfused':>10s} {'peak MiB':>9s} {'vs unfused':>10s}")
    for k in fns:
        print(f"{k:22s} {med[k] * 1e3:8.2f} {med['unfused'] / med[k]:9.2f}x {peaks[k] / 2**20:9.1f} "
              f"{peaks[k] / peaks['unfused']:9.2f}x")


if __name__ == "__main__":
    main()
