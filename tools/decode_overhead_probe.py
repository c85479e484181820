"""Host time per decode step of a tiny mlx-lm llama with a KV cache: plain, fuse(model, compile=False),
fuse(model), plain again (graph building only; each step followed by mx.eval). With
FusionConfig(min_tensor_size=1000) and no priors the 16-token prompt's MLPs fuse and a one-token
step's do not: the case of docs/performance.md, "Nothing fused, on the H200 (sixth session)".

    MLX_FUSION_NO_PRIORS=1 PYTHONPATH=$PWD python tools/decode_overhead_probe.py [MIN_SIZE]
"""
import statistics
import sys
import time

import mlx.core as mx
from host_overhead_probe import ARGS  # the same 8-layer llama (tools/ is the script's path)
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from mlx_fusion import FusionConfig, fuse


def main(min_size: int = 1000, steps: int = 300):
    model = llama.Model(ARGS)
    mx.eval(model.parameters())
    cfg = FusionConfig(min_tensor_size=min_size)
    variants = {"plain": model, "fused eager": fuse(model, cfg, compile=False), "fused": fuse(model, cfg),
                "plain again": model}
    caches = {k: make_prompt_cache(model) for k in variants}
    for k, f in variants.items():
        mx.eval(f(mx.zeros((1, 16), dtype=mx.int32), cache=caches[k]))
    y = mx.zeros((1, 1), dtype=mx.int32)
    times = {k: [] for k in variants}
    for _ in range(steps):  # interleaved, so that drifts of the machine hit every variant alike
        for k, f in variants.items():
            t0 = time.perf_counter()
            out = f(y, cache=caches[k])
            times[k].append(time.perf_counter() - t0)
            mx.eval(out)
    for k, v in times.items():
        print(f"{k:12s} {statistics.median(v) * 1e6:7.1f} us per step")
    for k in ("fused eager", "fused"):
        print(f"{k}: {sum(s.stats.applied_count for _, s in variants[k].fusion_states())} fusions (the prompt's)")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:2]))
