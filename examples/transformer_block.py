"""An mlx-lm style transformer block (RMSNorm, RoPE, attention, gated SiLU MLP): forward time
eager vs mx.compile vs fused, plus what the fusion pass did.

    python examples/transformer_block.py
"""

import time

import mlx.core as mx

from mlx_fusion.config import FusionConfig
from mlx_fusion.fuse import fuse
from mlx_fusion.models import TransformerBlock  # RMSNorm, RoPE, SDPA, gated SiLU MLP

NO_FUSION_NOTE = ("(0 fusions: measured or shipped speedups (mlx_fusion/data/priors-*.json), or a chain ending\n"
                  " in ops mx.compile merges anyway, left MLX's own path here: docs/cli.md, 'The performance\n"
                  " cache'; MLX_FUSION_NO_PRIORS=1 lets the bandwidth model decide)")


def median_time(fn, x, n=50):
    for _ in range(5):
        mx.eval(fn(x))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        mx.eval(fn(x))
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2]


def main(n: int = 50):
    block = TransformerBlock(dim=128, heads=4, hidden=344)
    mx.eval(block.parameters())
    x = mx.random.normal((2, 64, 128))
    fused = fuse(block, FusionConfig(min_tensor_size=0))
    variants = {"eager": block, "mx.compile": mx.compile(block), "fused": fused}
    ref = block(x)
    for name, fn in variants.items():
        err = mx.abs(fn(x) - ref).max().item()
        print(f"{name:>10}: {median_time(fn, x, n) * 1e3:7.3f} ms/forward  max |diff| {err:.2e}")
    graph = fused.fusion_graphs[0]
    print(f"graph: {len(graph)} nodes, ops {dict(sorted(graph.op_counts().items()))}")
    print(f"fusion stats: {fused.fusion_stats.as_dict()}  fallbacks: {fused.fusion_fallbacks}")
    if fused.fusion_stats.applied_count == 0:
        print(NO_FUSION_NOTE)
    return fused.fusion_stats


if __name__ == "__main__":
    main()
