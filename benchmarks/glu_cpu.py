"""CPU timings of the gated linear unit act(g) * u: eager, mx.compile and fused, forward and
forward + backward (the vjp), and fused inside a compiled replay (what `fuse()` runs).

    python benchmarks/glu_cpu.py [--size N] [--dtype float32|bfloat16|float16]

The results for this repository's machines are in docs/llm-ops.md. MLX's CPU buffer cache is
raised to 4 GiB (FACTS.md: with the default 32 MB every large output is freshly page-faulted).
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

from mlx_fusion.ops.glu import GLU_ACTIVATIONS, fused_glu, glu_reference


def best_times(fns, args, repeats: int, calls: int = 3):
    """Fastest ms per call of each fn, the fns interleaved in every round: on a machine
    shared with other jobs the minimum is the steadiest estimate, and interleaving spreads
    the load changes over every variant alike."""
    mx.eval(args)
    for fn in fns:  # warm up (compiles)
        for _ in range(2):
            mx.eval(fn(*args))
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            mx.eval([fn(*args) for _ in range(calls)])
            best[i] = min(best[i], (time.perf_counter() - t0) / calls * 1e3)
    return best


def vjp_of(fn):
    def run(g, u, dy):
        out, (dg, du) = mx.vjp(fn, [g, u], [dy])
        return out[0], dg, du
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1 << 22, help="elements of g (and u)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()
    mx.set_cache_limit(4 << 30)
    dtype = getattr(mx, a.dtype)
    rows = max(1, a.size // 4096)
    shape = (rows, a.size // rows)
    k1, k2, k3 = mx.random.split(mx.random.key(0), 3)
    g, u, dy = (mx.random.normal(shape, key=k).astype(dtype) for k in (k1, k2, k3))
    print(f"{'case':<18} {'pass':<8} {'eager ms':>9} {'compile ms':>11} {'fused ms':>9} {'fused+compile ms':>17}"
          f" {'fused/best':>11}")
    for act in GLU_ACTIVATIONS:
        ref = lambda g, u, act=act: glu_reference(g, u, act)  # noqa: E731
        fus = lambda g, u, act=act: fused_glu(g, u, act)  # noqa: E731
        for name, r, f, args in (("fwd", ref, fus, [g, u]), ("fwd+bwd", vjp_of(ref), vjp_of(fus), [g, u, dy])):
            t = best_times([r, mx.compile(r), f, mx.compile(f)], args, a.repeats)
            print(f"{f'glu+{act.value}':<18} {name:<8} {t[0]:9.2f} {t[1]:11.2f} {t[2]:9.2f} {t[3]:17.2f}"
                  f" {min(t[0], t[1]) / min(t[2], t[3]):10.2f}x")


if __name__ == "__main__":
    main()
