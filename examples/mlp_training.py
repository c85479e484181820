"""Train a small ReLU/GELU MLP eagerly, with mx.compile, and fused; print step times and fusion stats.

    python examples/mlp_training.py
"""

import functools
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from mlx_fusion.config import FusionConfig
from mlx_fusion.fuse import fuse, stats

NO_FUSION_NOTE = ("(0 fusions: measured or shipped speedups (mlx_fusion/data/priors-*.json), or a chain ending\n"
                  " in ops mx.compile merges anyway, left MLX's own path here: docs/cli.md, 'The performance\n"
                  " cache'; MLX_FUSION_NO_PRIORS=1 lets the bandwidth model decide)")


class MLP(nn.Module):
    def __init__(self, dims=(64, 256, 256, 10)):
        super().__init__()
        self.layers = [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])]

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nn.relu(layer(x))
        return self.layers[-1](x)


def loss_fn(model, x, y):
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def step(model, opt, x, y):
    loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
    opt.update(model, grads)
    return loss


def time_steps(run, n=50):
    """Median seconds per call after warm-up."""
    for _ in range(5):
        mx.eval(run())
    times = []
    for _ in range(n):
        t = time.perf_counter()
        mx.eval(run())
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2]


def main(steps: int = 50):
    x = mx.random.normal((128, 64))
    y = mx.random.randint(0, 10, (128,))
    base = MLP()
    mx.eval(base.parameters())
    results = {}
    for name in ("eager", "mx.compile", "fused", "fused+mx.compile"):
        model = MLP()
        model.update(base.parameters())
        if name.startswith("fused"):
            model = fuse(model, FusionConfig(min_tensor_size=0))
        opt = optim.SGD(learning_rate=0.05)
        run = functools.partial(step, model, opt, x, y)
        if name.endswith("mx.compile"):
            state = [model.state, opt.state]
            run = functools.partial(mx.compile(functools.partial(step, model, opt), inputs=state, outputs=state), x, y)
        results[name] = time_steps(run, steps)
        print(f"{name:>18}: {results[name] * 1e3:7.3f} ms/step  final loss {run().item():.4f}")
    s = stats()
    print(f"fusions: {s['applied_count']}  by pattern: {s['by_pattern']}  "
          f"memory saved per call: {s['memory_saved_bytes']} B  fallbacks: {s['fallbacks']}")
    if s['applied_count'] == 0:
        print(NO_FUSION_NOTE)
    return results


if __name__ == "__main__":
    main()
