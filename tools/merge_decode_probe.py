#!/usr/bin/env python3
"""Decode tokens/s with and without FusionConfig(merge_projections=True) (docs/merged-projections.md).

    PYTHONPATH=$PWD python3 tools/merge_decode_probe.py [--spec SPEC] [--tokens N] [--repeats R] [--json PATH]

Variants, interleaved per repeat: eager, fuse(model) (the default config), fuse with
merge_projections, and the same with split calls left alone (MLX_FUSION_MERGE_SPLIT=0's effect:
gate/up merged, the attention's q/k/v not). Two loops per variant: "sync" evaluates every token
(as mlx_fusion.lm.timing.greedy_decode, what `bench --model` times) and "pipelined" builds the next
token's graph while the previous one runs (as mlx_lm.generate_step, with mx.async_eval). Prints
median tokens/s, the greedy tokens' agreement with eager, max |logit diff| of the first decoded
step and the bytes the concatenated weights hold.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx

from mlx_fusion import _sibling_merge
from mlx_fusion.config import FusionConfig
from mlx_fusion.fuse import fuse
from mlx_fusion.lm.spec import build

SPEC = ("mlx-lm:llama:hidden_size=2048,num_hidden_layers=8,intermediate_size=5632,num_attention_heads=16,"
        "num_key_value_heads=8,vocab_size=32000,dtype=bfloat16,batch=1,seq=32")


def _cache(model):
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)


def decode(fn, model, prompt, n, pipelined):
    """(tokens, first-step logits, seconds per token after the prompt)."""
    cache = _cache(model)

    def step(tokens):
        logits = fn(tokens, cache=cache)[:, -1, :]
        return mx.argmax(logits, axis=-1), logits

    y, logits = step(prompt[None])
    mx.eval(y, logits)
    first, out = None, [y.item()]
    t0 = time.perf_counter()
    if pipelined:
        for _ in range(n - 1):
            nxt, logits = step(y[:, None])
            mx.async_eval(nxt)
            if first is None:
                first = logits
            out.append(nxt.item())
            y = nxt
    else:
        for _ in range(n - 1):
            y, logits = step(y[:, None])
            mx.eval(y, logits)
            first = logits if first is None else first
            out.append(y.item())
    return out, first, (time.perf_counter() - t0) / max(1, n - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default=SPEC)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args()
    model, (tokens,) = build(args.spec)
    prompt = tokens[0]
    merge = FusionConfig(merge_projections=True)
    variants = {"eager": (model, True), "fused": (fuse(model), True), "fused+merge": (fuse(model, merge), True),
                "fused+merge (traced calls only)": (fuse(model, merge), False)}
    rows = {}
    for loop in ("sync", "pipelined"):
        want = None
        times = {k: [] for k in variants}
        for rep in range(args.repeats + 2):  # two warm-up rounds: traces, concatenations, JIT
            for name, (fn, split) in variants.items():
                _sibling_merge.ENABLED = split
                toks, first, dt = decode(fn, model, prompt, args.tokens, loop == "pipelined")
                if name == "eager":
                    want = (toks, first)
                elif rep == 0:
                    rows.setdefault((loop, name), {})["tokens_match"] = toks == want[0]
                    rows[(loop, name)]["max_abs_diff_first_step"] = float(
                        mx.abs(first.astype(mx.float32) - want[1].astype(mx.float32)).max())
                if rep >= 2:
                    times[name].append(dt)
        _sibling_merge.ENABLED = True
        base = statistics.median(times["eager"])
        for name, t in times.items():
            r = rows.setdefault((loop, name), {})
            r.update(tokens_per_s=1 / statistics.median(t), vs_eager=base / statistics.median(t),
                     quartiles_ms=[1e3 * q for q in statistics.quantiles(t, n=4)] if len(t) > 1 else None)
    held = {name: sum(s.weights.nbytes() for _, s in fn.fusion_states()) for name, (fn, _) in variants.items()
            if hasattr(fn, "fusion_states")}
    print(f"{args.spec}\ndevice {mx.default_device()}, mlx {mx.__version__}, {args.tokens} tokens, "
          f"{args.repeats} repeats (median)")
    print(f"{'loop':10s} {'variant':34s} {'tokens/s':>9s} {'vs eager':>9s} {'tokens':>7s} {'max|diff|':>10s}")
    for loop, name in [(loop, name) for loop in ("sync", "pipelined") for name in variants]:
        r = rows[(loop, name)]
        match = "-" if "tokens_match" not in r else ("same" if r["tokens_match"] else "DIFFER")
        diff = r.get("max_abs_diff_first_step")
        print(f"{loop:10s} {name:34s} {r['tokens_per_s']:9.1f} {r['vs_eager']:8.2f}x {match:>7s} "
              f"{'-' if diff is None else f'{diff:.2e}':>10s}")
    print("concatenated weights held (MiB): " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in held.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"spec": args.spec, "device": str(mx.default_device()), "mlx": mx.__version__,
                       "tokens": args.tokens, "repeats": args.repeats, "held_bytes": held,
                       "rows": [{"loop": k[0], "variant": k[1], **v} for k, v in rows.items()]}, f, indent=1)


if __name__ == "__main__":
    main()
