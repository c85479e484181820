"""What nn.losses.cross_entropy(h @ W.T, t) exports as on a GPU (its fast path: mx.fast.cross_entropy).

Run on a GPU machine: python tools/lce_gpu_probe.py. Prints the traced graphs (mlx_fusion.graph.trace)
of the spellings the linear_cross_entropy rule matches, and the raw export items of one of them.
"""

import mlx.core as mx
import mlx.nn as nn

from mlx_fusion.graph.trace import trace


def main():
    print("device", mx.default_device())
    w = mx.zeros((16, 8))
    for dt in (mx.float32, mx.bfloat16):
        for shape in ((6, 8), (2, 3, 8)):
            h, W, t = mx.zeros(shape, dt), w.astype(dt), mx.zeros(shape[:-1], mx.int32)
            for name, f in (("plain", lambda h, W, t: nn.losses.cross_entropy(h @ W.T, t)),
                            ("upcast", lambda h, W, t: nn.losses.cross_entropy((h @ W.T).astype(mx.float32), t))):
                print(dt, shape, name)
                print(trace(f, h, W, t))
    items = []
    h, W, t = mx.zeros((6, 8), mx.bfloat16), w.astype(mx.bfloat16), mx.zeros((6,), mx.int32)
    mx.export_function(items.append, lambda h, W, t: nn.losses.cross_entropy(h @ W.T, t), h, W, t)
    for it in items:
        print(it)
    l = mx.array([[1.0, 2.0, 3.0], [0.5, 0.1, 0.2], [1., 1., 1.], [2., 0., 0.]])
    for tt in ([0, 1, -1, 2], [0, 3, 7, -4]):
        tt = mx.array(tt)
        print("fast ce", tt, mx.fast.cross_entropy(l, tt),
              mx.grad(lambda l: mx.fast.cross_entropy(l, tt).sum())(l))
    print("fast ce bf16 grad dtype", mx.grad(lambda l: mx.fast.cross_entropy(l, mx.array([0, 1, 2, 0])).astype(
        mx.bfloat16).astype(mx.float32).sum())(l.astype(mx.bfloat16)).dtype)


if __name__ == "__main__":
    main()
