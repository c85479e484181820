"""Linear + cross-entropy checks for a GPU machine (the CPU tests cannot run the real kernels).

    python tools/lce_gpu_probe.py

1. The trace of nn.losses.cross_entropy(h @ W.T, t), which calls mx.fast.cross_entropy on a GPU
   (spelled as exportable ops by graph/trace.py), and whether the rule matches it.
2. linear_cross_entropy (the kernels) vs the unfused code: values and gradients, f32 / bf16 / f16,
   upcast, chunks that do not divide the rows, a target outside [-V, V).
3. fuse(loss_fn) of a tiny mlx-lm llama under nn.value_and_grad: the fusion is found, same loss.
Prints one line per check and "ALL OK" at the end, or raises.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_fusion import fuse, fusion_config
from mlx_fusion.graph.optimizer import FusionOptimizer
from mlx_fusion.graph.trace import trace
from mlx_fusion.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

TOL = {mx.float32: 1e-4, mx.float16: 2e-2, mx.bfloat16: 6e-2}


def close(a, b, tol, what):
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    scale = max(1.0, float(np.abs(b[np.isfinite(b)]).max(initial=0)))
    err = float(np.nanmax(np.abs(a - b))) if a.size else 0.0
    assert np.allclose(a, b, rtol=tol, atol=tol * scale, equal_nan=True), f"{what}: max err {err}"
    print(f"ok {what} (max err {err:.3g})")


def main():
    print("device", mx.default_device())
    if mx.default_device() == mx.cpu:  # a smoke run of this script: make the CPU take the chunked path
        from mlx_fusion.ops import lce_chunks

        lce_chunks.CPU_MIN_LOGITS_BYTES, lce_chunks.CHUNK_BYTES["cpu"] = 0, 1 << 16
    h, w, t = mx.zeros((2, 3, 8), mx.bfloat16), mx.zeros((16, 8), mx.bfloat16), mx.zeros((2, 3), mx.int32)
    g = trace(lambda h, w, t: nn.losses.cross_entropy(h @ w.T, t).mean(), h, w, t)
    print(g)
    with fusion_config(min_tensor_size=0):
        assert FusionOptimizer().optimize(g).by_pattern == {"linear+cross_entropy": 1}, "rule did not match"
    print("ok GPU trace matched")
    for dt in (mx.float32, mx.bfloat16, mx.float16):
        for upcast in (False, True):
            k1, k2, k3 = mx.random.split(mx.random.key(1), 3)
            h = mx.random.normal((300, 64), key=k1).astype(dt)
            w = (mx.random.normal((1000, 64), key=k2) * 0.2).astype(dt)
            t = mx.random.randint(-1000, 1000, (300,), key=k3)
            c = mx.cos(mx.arange(300, dtype=mx.float32))
            for chunk in (None, 97):
                f = lambda h, w: (linear_cross_entropy(h, w, t, chunk_size=chunk, upcast=upcast)  # noqa: E731
                                  .astype(mx.float32) * c).sum()
                r = lambda h, w: (linear_cross_entropy_reference(h, w, t, upcast=upcast)  # noqa: E731
                                  .astype(mx.float32) * c).sum()
                what = f"{dt} upcast={upcast} chunk={chunk}"
                close(linear_cross_entropy(h, w, t, chunk_size=chunk, upcast=upcast),
                      linear_cross_entropy_reference(h, w, t, upcast=upcast), TOL[dt], what + " loss")
                for a, b, n in zip(mx.grad(f, argnums=(0, 1))(h, w), mx.grad(r, argnums=(0, 1))(h, w), ("dh", "dW")):
                    close(a, b, 4 * TOL[dt], f"{what} {n}")
    bad = linear_cross_entropy(h, w, mx.array([0, 1000] + [1] * 298), chunk_size=100)
    assert np.isnan(np.array(bad.astype(mx.float32))[1]), "target 1000 of V 1000 should give NaN"
    print("ok out-of-range target")
    from mlx_lm.models.llama import Model, ModelArgs

    args = ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                     num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=2048, num_key_value_heads=2,
                     tie_word_embeddings=False)
    model = Model(args)
    x = mx.random.randint(0, 2048, (2, 33))

    def loss_fn(m, x, y):
        return nn.losses.cross_entropy(m(x), y, reduction="mean")

    fused = fuse(loss_fn)
    with fusion_config(min_tensor_size=0):
        l, _ = nn.value_and_grad(model, fused)(model, x[:, :-1], x[:, 1:])
    l0, _ = nn.value_and_grad(model, loss_fn)(model, x[:, :-1], x[:, 1:])
    print("fused llama loss", l.item(), "unfused", l0.item(), fused.stats.by_pattern)
    assert fused.stats.by_pattern.get("linear+cross_entropy") == 1 and abs(l.item() - l0.item()) < 1e-3
    print("ALL OK")


if __name__ == "__main__":
    main()
