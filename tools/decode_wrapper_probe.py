"""Where a fused decode step's host time goes: the top-level wrapper rebuilt piece by piece.

Each variant is a `fuse(model, compile=False)` object whose class gets a cut-down ``__call__``
(its first lines only, then the plain forward; the current code is `fuse(compile=False)`: the
memo, then the original's top-level check inlined), decoded step by step against plain MLX in a random
order per step, each with its own KV cache (the same prompt). A step is timed with its
evaluation; the call alone (host graph building, what the wrapper adds to) apart. The shuffled
order keeps a variant's position (right after an evaluation, or after another call) from
biasing it. docs/performance.md, "Decode steps: the wrapper".

    PYTHONPATH=$PWD:$PWD/tools python3 tools/decode_wrapper_probe.py [SPEC] [--steps N] [--rounds N]

With an importable ``mlx_fusion._before`` (a copy of an older `_fused_module.py`), its
``FusedModule.__call__`` is measured too ("before").
"""
import argparse
import importlib
import random
import statistics
import time

import mlx.core as mx
from gpu_zero_overhead import LLAMA2
from mlx_lm.models.cache import make_prompt_cache

from mlx_fusion import _fused_module, fuse
from mlx_fusion._tracing import _local as trace_local
from mlx_fusion.lm import build

_array = mx.array
_full = _fused_module.FusedModule.__call__


def _with_call(model, call):
    f = fuse(model, compile=False)
    object.__setattr__(f, "__class__", type("Probe", (type(f),), {"__call__": call}))
    return f


def minimal(self, *args, **kwargs):  # any wrapper's floor: one Python frame
    return self._fusion_forward(self, *args, **kwargs)


def state(self, *args, **kwargs):  # + the fused object's state
    forward = self._fusion_forward
    state = self.__dict__.get("_fusion")
    if state is None:
        return None
    return forward(self, *args, **kwargs)


def _memo_hit(self, args, kwargs):  # FusedModule.__call__'s first lines
    state = self.__dict__.get("_fusion")
    if state is None:
        return None
    memo = state.plain_memo
    if (memo is not None and args and type(args[0]) is _array and args[0].shape == memo[0]
            and len(args) == memo[1] and kwargs.keys() == memo[2]):
        return state
    return None


def memo(self, *args, **kwargs):  # + the decode-step memo (no origin pull)
    if _memo_hit(self, args, kwargs) is None:
        return _full(self, *args, **kwargs)
    return self._fusion_forward(self, *args, **kwargs)


def memo_pull(self, *args, **kwargs):  # the memo, then `Origin.pull` as a call (the current code inlines its check)
    state = _memo_hit(self, args, kwargs)
    if state is None:
        return _full(self, *args, **kwargs)
    state.origin.pull(self)
    return self._fusion_forward(self, *args, **kwargs)


def memo_original(self, *args, **kwargs):  # the memo, then the original module's own forward
    state = _memo_hit(self, args, kwargs)
    if state is None:
        return _full(self, *args, **kwargs)
    return self._fusion_forward(state.origin.module, *args, **kwargs)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("spec", nargs="?", default=LLAMA2)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    model, (tokens,) = build(args.spec)
    prompt = tokens[:1, : args.prompt]
    variants = {"plain": model, "minimal": _with_call(model, minimal),
                "+state": _with_call(model, state), "+memo": _with_call(model, memo),
                "memo, Origin.pull()": _with_call(model, memo_pull),
                "memo, original": _with_call(model, memo_original), "fuse(compile=False)": fuse(model, compile=False),
                "fuse(model)": fuse(model)}
    try:
        before = importlib.import_module("mlx_fusion._before")
        variants["before"] = _with_call(model, before.FusedModule.__call__)
    except ImportError:
        pass
    names = list(variants)
    steps = {k: [] for k in names}
    host = {k: [] for k in names}
    same = True
    for _ in range(args.rounds):
        caches = {k: make_prompt_cache(model) for k in names}
        ys = {}
        for k in names:
            ys[k] = mx.argmax(variants[k](prompt, cache=caches[k])[:, -1, :], axis=-1)
            mx.eval(ys[k])
        for _ in range(args.steps):
            random.shuffle(names)
            for k in names:
                t0 = time.perf_counter()
                out = variants[k](ys[k][:, None], cache=caches[k])
                host[k].append(time.perf_counter() - t0)
                ys[k] = mx.argmax(out[:, -1, :], axis=-1)
                mx.eval(ys[k])
                steps[k].append(time.perf_counter() - t0)
            same = same and len({y.item() for y in ys.values()}) == 1
    print(args.spec, f"prompt {args.prompt}, {args.steps} steps x {args.rounds} rounds, shuffled, same tokens: {same}")
    base, base_host = statistics.median(steps["plain"]), statistics.median(host["plain"])
    for k in variants:
        m, h = statistics.median(steps[k]), statistics.median(host[k])
        print(f"{k:22s} step {m * 1e6:8.1f} us, {base / m:.4f}x plain; "
              f"the call alone {h * 1e6:7.1f} us ({(h - base_host) * 1e6:+6.1f})")


if __name__ == "__main__":
    main()
