"""Where the host time of a compiled 0-fusion call goes, in the conditions of a real benchmark: each
call followed by the evaluation of its output (on a GPU: the GPU's work), the pieces of
`FusedModule.__call__` timed one by one, against `mx.compile(model, inputs=model.state)`.
docs/performance.md, "Nothing fused, on the H200".

    PYTHONPATH=$PWD:$PWD/.device/py python3 tools/wrapper_breakdown_probe.py [SPEC] [--rounds N]

Default SPEC: the llama-2 shape of tools/gpu_zero_overhead.py; on the CPU give a small one, e.g.
``mlx-lm:llama:hidden_size=64,num_hidden_layers=8,intermediate_size=128,num_attention_heads=4,num_key_value_heads=2,vocab_size=256,batch=4,seq=32``.
"""
import argparse
import functools
import statistics
import time
from collections import defaultdict

import mlx.core as mx
from gpu_zero_overhead import LLAMA2

import mlx_fusion._fused_module as fm
import mlx_fusion._fusion_state as fs
import mlx_fusion._origin as origin
from mlx_fusion import fuse
from mlx_fusion.graph import module_state as msmod
from mlx_fusion.lm import build

SPENT = defaultdict(list)
NOW = [""]  # the variant being timed: each piece is reported per variant


def timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            SPENT[f"{NOW[0]}: {name}"].append(time.perf_counter() - t0)
    return wrapper


def main() -> None:  # noqa: C901
    p = argparse.ArgumentParser()
    p.add_argument("spec", nargs="?", default=LLAMA2)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--calls", type=int, default=1, help="calls per evaluation (times are per evaluation)")
    args = p.parse_args()
    model, (x,) = build(args.spec)
    fused, eager = fuse(model), fuse(model, compile=False)
    ci = mx.compile(model, inputs=model.state)
    for _ in range(3):
        mx.eval(fused(x), ci(x), eager(x))
    # the pieces, each wrapped by a timer (they then cost ~1 us more each)
    msmod.ModuleState.valid = timed("layout check (valid)", msmod.ModuleState.valid)
    msmod.ModuleState.read = timed("parameter read", msmod.ModuleState.read)
    fs._FusionState.params_signature = timed("params signature", fs._FusionState.params_signature)
    fs._FusionState.entry = timed("entry lookup", fs._FusionState.entry)
    fs._FusionState.direct_hit = timed("direct_hit", fs._FusionState.direct_hit)
    origin.Origin.pull = timed("origin pull", origin.Origin.pull)
    fm._direct = timed("compiled original call (_direct)", fm._direct)
    fm._overlapped = timed("overlapped call (_overlapped)", fm._overlapped)
    overlapped = fm._overlapped

    def always_early(module, state, *a):  # as the first version of _overlapped: back to back too
        state.returned = 0.0
        return overlapped(module, state, *a)

    variants = {"mx.compile(model, inputs=state)": (ci, overlapped), "fuse(model)": (fused, overlapped),
                "fuse(model), always early": (fused, always_early),
                "fuse(model), check first": (fused, lambda *a: None),  # as before _overlapped
                "plain": (model, overlapped), "fuse(model, compile=False)": (eager, overlapped)}
    for _ in range(args.rounds):
        for name, (f, fm._overlapped) in variants.items():
            NOW[0] = name
            t0 = time.perf_counter()
            y = [f(x) for _ in range(args.calls)]  # as `bench` times a GPU: several calls per evaluation
            t1 = time.perf_counter()
            mx.eval(y)
            t2 = time.perf_counter()
            SPENT[f"{name}: call (host)"].append(t1 - t0)
            SPENT[f"{name}: call + eval"].append(t2 - t0)
    print(args.spec, f"{args.calls} call(s) per evaluation")
    for name, v in sorted(SPENT.items()):
        print(f"{name:70s} median {statistics.median(v) * 1e6:9.1f} us  (n={len(v)})")


if __name__ == "__main__":
    main()
