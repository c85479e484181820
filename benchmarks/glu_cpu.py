"""CPU timings of the gated linear unit act(g) * u: eager, mx.compile and fused, forward and
forward + backward (the vjp), and fused inside a compiled replay (what `fuse()` runs).

    python benchmarks/glu_cpu.py [--size N] [--dtype float32|bfloat16|float16]
    python benchmarks/glu_cpu.py --mlp [--tokens T] [--dim D] [--hidden H]
    python benchmarks/glu_cpu.py --custom-vjp [--size N]

--mlp times mlx-lm's llama MLP (down(swiglu(gate(x), up(x)))) instead: forward and a
gradient step, eager, mx.compile, `fuse()` (compiled replay) and mx.compile of the fused.
--custom-vjp times silu(g) * u with a memory-lean custom vjp (recomputing silu(g)), its
backward plain or under mx.compile, against MLX's own autodiff: why the CPU path has none.

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


def custom_vjp_main(args):
    def ref(g, u):
        return g * mx.sigmoid(g) * u

    def backward(g, u, dy):
        s = mx.sigmoid(g)
        return dy * u * (s * (1 + g * (1 - s))), dy * (g * s)

    def custom(fwd, bwd):
        f = mx.custom_function(fwd)
        f.vjp(lambda primals, cotangent, output: bwd(*primals, cotangent))
        return f

    variants = {"MLX autodiff": ref, "custom vjp": custom(ref, backward),
                "custom vjp, compiled fns": custom(mx.compile(ref), mx.compile(backward))}
    print(f"{'silu(g) * u fwd+bwd':<26} {'eager ms':>9} {'mx.compile ms':>14}")
    for name, fn in variants.items():
        t = best_times([vjp_of(fn), mx.compile(vjp_of(fn))], args, 9)
        print(f"{name:<26} {t[0]:9.2f} {t[1]:14.2f}")


def mlp_main(a, dtype):
    import mlx.nn as nn
    from mlx_lm.models import llama

    from mlx_fusion import fuse

    args = llama.ModelArgs(model_type="llama", hidden_size=a.dim, num_hidden_layers=1, intermediate_size=a.hidden,
                           num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=8)
    mlp = llama.MLP(args)
    mlp.set_dtype(dtype)
    mx.eval(mlp.parameters())
    x = mx.random.normal((1, a.tokens, a.dim)).astype(dtype)
    fused = fuse(mlp)

    def loss(m, x):
        return m(x).astype(mx.float32).square().mean()

    step, fused_step = nn.value_and_grad(mlp, loss), nn.value_and_grad(fused, loss)
    rows = {
        "fwd": [lambda x: mlp(x), mx.compile(lambda x: mlp(x)), lambda x: fused(x), mx.compile(lambda x: fused(x))],
        "grad step": [lambda x: step(mlp, x), mx.compile(lambda x: step(mlp, x)), lambda x: fused_step(fused, x),
                      mx.compile(lambda x: fused_step(fused, x))],
    }
    print(f"llama MLP: tokens {a.tokens}, dim {a.dim}, hidden {a.hidden}, {a.dtype}")
    print(f"{'pass':<10} {'eager ms':>9} {'compile ms':>11} {'fuse() ms':>10} {'compile(fuse) ms':>17} {'fused/best':>11}")
    for name, fns in rows.items():
        t = best_times(fns, [x], a.repeats)
        print(f"{name:<10} {t[0]:9.2f} {t[1]:11.2f} {t[2]:10.2f} {t[3]:17.2f} {min(t[:2]) / min(t[2:]):10.2f}x")
    print("fusions:", fused.fusion_stats.by_pattern)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1 << 22, help="elements of g (and u)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--mlp", action="store_true")
    ap.add_argument("--custom-vjp", action="store_true")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=1024)
    a = ap.parse_args()
    mx.set_cache_limit(4 << 30)
    dtype = getattr(mx, a.dtype)
    if a.mlp:
        return mlp_main(a, dtype)
    rows = max(1, a.size // 4096)
    shape = (rows, a.size // rows)
    k1, k2, k3 = mx.random.split(mx.random.key(0), 3)
    g, u, dy = (mx.random.normal(shape, key=k).astype(dtype) for k in (k1, k2, k3))
    if a.custom_vjp:
        return custom_vjp_main([g, u, dy])
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
