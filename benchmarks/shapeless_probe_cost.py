"""What `in_shapeless_trace()` costs a fused call (docs/never-wrong.md, "Shapeless mx.compile").

    python benchmarks/shapeless_probe_cost.py [--calls 20000]

Graph building only (no eval): the probe alone, then a fused op called eagerly (add+relu,
64x64 float32) and a fused module's call (a cached replay), each with the probe as shipped
and with it replaced by `False`, interleaved; median of rounds, µs per call. On the CPU the
ops do not ask the probe (their MLX code is shapeless-safe), so only the module row changes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from mlx_fusion import _fused_module, fuse  # noqa: E402
from mlx_fusion._shapeless import in_shapeless_trace  # noqa: E402
from mlx_fusion.config import fusion_config  # noqa: E402
from mlx_fusion.ops import common  # noqa: E402
from mlx_fusion.ops.binary import fused_binary  # noqa: E402


def per_call_us(fn, calls):
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args(argv)
    a_, b_ = mx.random.normal((64, 64)), mx.random.normal((64, 64))
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    mx.eval(a_, b_, model.parameters())
    with fusion_config(min_tensor_size=0):
        fused = fuse(model)
        mx.eval(fused(a_))
        rows = {"probe alone": (in_shapeless_trace, None),
                "fused_binary call": (lambda: fused_binary(a_, b_), common),
                "fused module call": (lambda: fused(a_), _fused_module)}
        results = {name: ([], []) for name in rows}
        for name, (fn, _) in rows.items():  # warm up (compiles, traces)
            per_call_us(fn, 100)
        for r in range(a.rounds):
            for name, (fn, module) in rows.items():
                for probe in ((True, False) if r % 2 == 0 else (False, True)):
                    if module is None and not probe:
                        continue
                    real = module.in_shapeless_trace if module is not None else None
                    if not probe:
                        module.in_shapeless_trace = lambda: False
                    try:
                        results[name][0 if probe else 1].append(per_call_us(fn, a.calls // 10))
                    finally:
                        if real is not None:
                            module.in_shapeless_trace = real
    print(f"mlx {mx.__version__}, default device {mx.default_device()}; µs per call, median of {a.rounds}")
    print(f"{'':<20}{'with probe':>11}{'without':>9}")
    for name, (on, off) in results.items():
        off_s = f"{statistics.median(off):9.2f}" if off else f"{'':>9}"
        print(f"{name:<20}{statistics.median(on):11.2f}{off_s}")


if __name__ == "__main__":
    main()
