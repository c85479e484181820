"""The add_layer_norm kernels on a real CUDA GPU (they faulted / gave wrong gradients on the H200,
docs/testing.md, and run only under the tests' shims since). Forces the kernel path on the device
and prints the largest difference to the reference per case, values and gradients.

    PYTHONPATH=$PWD python3 tools/gpu_add_layer_norm_probe.py [--case N]
    compute-sanitizer --tool memcheck python3 tools/gpu_add_layer_norm_probe.py   # where the fault is

Each case is evaluated (and synchronized) on its own, so a fault names its case.
"""

import sys

import mlx.core as mx

from mlx_fusion import kernels
from mlx_fusion.ops.add_layer_norm import add_layer_norm_reference, fused_add_layer_norm

CASES = [(rows, d, hw, hb, dt) for dt in (mx.float32, mx.bfloat16) for rows, d in ((1, 13), (7, 13), (3, 64), (33, 2048), (5, 300))
         for hw, hb in ((True, True), (False, False), (True, False))]


def loss(fn, hw, hb):
    def f(x, r, *vs):
        vs = list(vs)
        w = vs.pop(0) if hw else None
        b = vs.pop(0) if hb else None
        h, y = fn(x, r, w, b, 1e-5)
        k = mx.cos(mx.arange(h.size, dtype=mx.float32).reshape(h.shape))
        return (h.astype(mx.float32) * k).sum() + (y.astype(mx.float32) * k * k).sum()
    return f


def run(i, case):
    rows, d, hw, hb, dt = case
    key = mx.random.key(i)
    x, r = (mx.random.normal((rows, d), key=k).astype(dt) for k in mx.random.split(key))
    extra = [mx.random.normal((d,), key=mx.random.key(100 + i)).astype(dt)] * hw + \
            [mx.random.normal((d,), key=mx.random.key(200 + i)).astype(dt)] * hb
    args = [x, r] + extra
    argnums = tuple(range(len(args)))
    with kernels.use_backend("cuda"):
        got = mx.value_and_grad(loss(fused_add_layer_norm, hw, hb), argnums)(*args)
        mx.eval(got)
        mx.synchronize()
    want = mx.value_and_grad(loss(add_layer_norm_reference, hw, hb), argnums)(*args)
    diffs = [abs(got[0].item() - want[0].item())] + [
        mx.abs(g.astype(mx.float32) - w.astype(mx.float32)).max().item() for g, w in zip(got[1], want[1])]
    print(f"case {i}: rows={rows} D={d} weight={hw} bias={hb} {dt}: loss diff {diffs[0]:.3g}, grad diffs "
          + ", ".join(f"{v:.3g}" for v in diffs[1:]), flush=True)


def main():
    only = int(sys.argv[sys.argv.index("--case") + 1]) if "--case" in sys.argv else None
    for i, case in enumerate(CASES):
        if only is None or i == only:
            run(i, case)


if __name__ == "__main__":
    main()
