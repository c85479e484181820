"""An mlx-lm style transformer block (RMSNorm, RoPE, attention, gated SiLU MLP): forward time
eager vs mx.compile vs fused, plus what the fusion pass did.

    python examples/transformer_block.py
"""

import time

import mlx.core as mx
import mlx.nn as nn

from mlx_fusion.config import FusionConfig
from mlx_fusion.fuse import fuse


class Block(nn.Module):
    def __init__(self, dim=128, heads=4, hidden=344):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv, self.o = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.rope = nn.RoPE(dim // heads)
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x):
        B, L, D = x.shape
        q, k, v = mx.split(self.qkv(self.attn_norm(x)), 3, axis=-1)
        q, k, v = (t.reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3) for t in (q, k, v))
        a = mx.fast.scaled_dot_product_attention(self.rope(q), self.rope(k), v,
                                                 scale=q.shape[-1] ** -0.5, mask="causal")
        x = x + self.o(a.transpose(0, 2, 1, 3).reshape(B, L, D))
        h = self.mlp_norm(x)
        return x + self.down(nn.silu(self.gate(h)) * self.up(h))


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
    block = Block()
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
    return fused.fusion_stats


if __name__ == "__main__":
    main()
