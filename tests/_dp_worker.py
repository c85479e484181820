"""One rank of the data-parallel test (tests/test_distributed.py launches it with `mlx.launch`).

Trains a tiny mlx-lm llama twice, unfused and fused, each rank on its own shard
of one global batch, gradients averaged over the ring with
`nn.average_gradients` and the loss with `mx.distributed.all_sum`. Writes
``{"rank", "size", "unfused", "fused", "fallbacks"}`` as JSON to
``<out_dir>/rank<r>.json``.

    mlx.launch -n 2 --backend ring tests/_dp_worker.py <out_dir> [steps]
"""

import json
import os
import sys
import warnings

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx_lm.models import llama

import mlx_fusion

ARGS = dict(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=64, tie_word_embeddings=False)
GLOBAL_BATCH, SEQ = 4, 12


def build():
    mx.random.seed(0)  # the same initial weights on every rank
    model = llama.Model(llama.ModelArgs.from_dict(ARGS))
    mx.eval(model.parameters())
    return model


def batch():
    """The global batch, the same on every rank and step (so the loss falls)."""
    k1, k2 = mx.random.split(mx.random.key(100))
    x = mx.random.randint(0, ARGS["vocab_size"], (GLOBAL_BATCH, SEQ), key=k1)
    return x, mx.random.randint(0, ARGS["vocab_size"], (GLOBAL_BATCH, SEQ), key=k2)


def loss_fn(model, x, y):
    return nn.losses.cross_entropy(model(x), y).mean()


def train(model, group, steps):
    """Global losses of `steps` data-parallel AdamW steps."""
    optimizer = optim.AdamW(learning_rate=1e-2)
    shard = GLOBAL_BATCH // group.size()
    losses = []
    for _ in range(steps):
        x, y = batch()
        rows = slice(group.rank() * shard, (group.rank() + 1) * shard)
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x[rows], y[rows])
        grads = nn.average_gradients(grads, group=group)
        optimizer.update(model, grads)
        loss = mx.distributed.all_sum(loss, group=group) / group.size()
        mx.eval(loss, model.parameters(), optimizer.state)
        losses.append(loss.item())
    return losses


def main(out_dir, steps):
    group = mx.distributed.init(strict=True, backend="ring")
    unfused = train(build(), group, steps)
    with mlx_fusion.fusion_config(min_tensor_size=0), warnings.catch_warnings():
        warnings.simplefilter("ignore", mlx_fusion.FusionFallbackWarning)  # reported below instead
        fused_model = mlx_fusion.fuse(build())
        fused = train(fused_model, group, steps)
    result = {"rank": group.rank(), "size": group.size(), "unfused": unfused, "fused": fused,
              "fallbacks": dict(fused_model.fusion_fallbacks), "traces": len(fused_model.fusion_graphs)}
    with open(os.path.join(out_dir, f"rank{group.rank()}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4)
