"""Decode steps of an mlx-lm model, plain against fused, alternated step by step so that the machine's
drifts hit every variant alike (a whole-loop benchmark moved ±3% between processes on the H200).
Each variant has its own KV cache from the same prompt; a step is timed with its evaluation,
and the call alone (host graph building) apart.
docs/performance.md, "Nothing fused, on the H200".

    PYTHONPATH=$PWD:$PWD/.device/py python3 tools/decode_step_probe.py [SPEC] [--prompt N] [--steps N] [--rounds N]
"""
import argparse
import statistics
import time

import mlx.core as mx
from gpu_zero_overhead import LLAMA2
from mlx_lm.models.cache import make_prompt_cache

from mlx_fusion import fuse
from mlx_fusion.lm import build


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("spec", nargs="?", default=LLAMA2)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    model, (tokens,) = build(args.spec)
    prompt = tokens[:1, : args.prompt]
    variants = {"plain": model, "fuse(model, compile=False)": fuse(model, compile=False), "fuse(model)": fuse(model),
                "plain again": model}
    times = {k: [] for k in variants}
    host = {k: [] for k in variants}  # the call alone (graph building), without its evaluation
    same = True
    for _ in range(args.rounds):
        caches = {k: make_prompt_cache(model) for k in variants}
        ys = {}
        for k, f in variants.items():
            ys[k] = mx.argmax(f(prompt, cache=caches[k])[:, -1, :], axis=-1)
            mx.eval(ys[k])
        for _ in range(args.steps):
            for k, f in variants.items():
                t0 = time.perf_counter()
                out = f(ys[k][:, None], cache=caches[k])
                host[k].append(time.perf_counter() - t0)
                ys[k] = mx.argmax(out[:, -1, :], axis=-1)
                mx.eval(ys[k])
                times[k].append(time.perf_counter() - t0)
            same = same and len({y.item() for y in ys.values()}) == 1
    base = statistics.median(times["plain"] + times["plain again"])
    print(args.spec, f"prompt {args.prompt}, {args.steps} steps x {args.rounds} rounds, same tokens: {same}")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"{k:28s} median {m * 1e6:8.1f} us per step, {base / m:.3f}x plain "
              f"(the call alone: {statistics.median(host[k]) * 1e6:7.1f} us)")
    for k in ("fuse(model, compile=False)", "fuse(model)"):
        print(f"{k}: {sum(s.stats.applied_count for _, s in variants[k].fusion_states())} fusions")


if __name__ == "__main__":
    main()
