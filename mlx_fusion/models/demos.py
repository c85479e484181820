"""The demo models the CLI's SPECs name: small, standard blocks that have fusion candidates.

- ``mlp``: Linear+ReLU layers; ``gelu-mlp``: Linear+GELU layers
- ``gated-mlp``: LLaMA MLP, down(silu(gate(x)) * up(x))
- ``transformer``: pre-norm blocks with RoPE attention and a gated SiLU MLP

`DEMO_MODELS` maps each name to its help line, default options and a builder
(options -> (model, input shape)); `mlx_fusion.models.spec` parses the options.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import mlx.core as mx
import mlx.nn as nn

__all__ = ["MLP", "GatedMLP", "TransformerBlock", "Transformer", "DEMO_MODELS"]


class MLP(nn.Module):
    """`depth` Linear layers of `width`, each followed by `activation` (the last one too, so
    every layer is a Linear+bias+activation candidate)."""

    def __init__(self, width: int = 256, depth: int = 2, activation: Callable = nn.relu):
        super().__init__()
        self.layers = [nn.Linear(width, width) for _ in range(depth)]
        self.activation = activation

    def __call__(self, x):
        for layer in self.layers:
            x = self.activation(layer(x))
        return x


class GatedMLP(nn.Module):
    """LLaMA's MLP, `depth` times with residuals: x + down(silu(gate(x)) * up(x))."""

    def __init__(self, width: int = 256, hidden: int = 688, depth: int = 1):
        super().__init__()
        self.gates = [nn.Linear(width, hidden, bias=False) for _ in range(depth)]
        self.ups = [nn.Linear(width, hidden, bias=False) for _ in range(depth)]
        self.downs = [nn.Linear(hidden, width, bias=False) for _ in range(depth)]

    def __call__(self, x):
        for gate, up, down in zip(self.gates, self.ups, self.downs):
            x = x + down(nn.silu(gate(x)) * up(x))
        return x


class TransformerBlock(nn.Module):
    """An mlx-lm style block: RMSNorm, RoPE causal attention, RMSNorm, gated SiLU MLP."""

    def __init__(self, dim: int = 256, heads: int = 4, hidden: int = 688):
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


class Transformer(nn.Module):
    def __init__(self, dim: int = 256, heads: int = 4, hidden: int = 688, depth: int = 2):
        super().__init__()
        self.blocks = [TransformerBlock(dim, heads, hidden) for _ in range(depth)]

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@dataclass(frozen=True)
class _Demo:
    help: str
    defaults: Dict[str, Any]
    build: Callable[[Dict[str, Any]], Tuple[nn.Module, Tuple[int, ...]]]  # -> (model, input shape)


DEMO_MODELS: Dict[str, _Demo] = {
    "mlp": _Demo("Linear+ReLU layers", dict(width=256, depth=2, batch=32, dtype="float32"),
                 lambda o: (MLP(o["width"], o["depth"], nn.relu), (o["batch"], o["width"]))),
    "gelu-mlp": _Demo("Linear+GELU layers", dict(width=256, depth=2, batch=32, dtype="float32"),
                      lambda o: (MLP(o["width"], o["depth"], nn.gelu), (o["batch"], o["width"]))),
    "gated-mlp": _Demo("LLaMA MLP: down(silu(gate(x)) * up(x))",
                       dict(width=256, hidden=688, depth=1, batch=32, dtype="float32"),
                       lambda o: (GatedMLP(o["width"], o["hidden"], o["depth"]), (o["batch"], o["width"]))),
    "transformer": _Demo("RMSNorm + RoPE attention + gated SiLU MLP blocks",
                         dict(dim=256, heads=4, hidden=688, depth=2, seq=64, batch=2, dtype="float32"),
                         lambda o: (Transformer(o["dim"], o["heads"], o["hidden"], o["depth"]),
                                    (o["batch"], o["seq"], o["dim"]))),
}
