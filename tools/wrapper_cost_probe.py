"""Host cost of the fused module's wrapper alone: an 8-layer mlx-lm llama fused, its forward (and,
compiled, the compiled original) replaced by a stub, so what is timed is the guard of a call that
fused nothing: config, origin pull, layout check, key, lookup. Warm (no evaluation between calls).
docs/performance.md, "Nothing fused, on the H200 (sixth session)".

    PYTHONPATH=$PWD python tools/wrapper_cost_probe.py
"""
import statistics
import time

import mlx.core as mx
from host_overhead_probe import ARGS  # the same 8-layer llama (tools/ is the script's path)
from mlx_lm.models import llama

import mlx_fusion._fused_module as fm
from mlx_fusion import fuse


def main(calls: int = 5000):
    model = llama.Model(ARGS)
    mx.eval(model.parameters())
    x = mx.zeros((4, 32), dtype=mx.int32)
    for compiled in (False, True):
        f = fuse(model, compile=compiled)
        for _ in range(20):
            mx.eval(f(x))
        cls, direct, overlapped = type(f), fm._direct, fm._overlapped
        forward = cls.__dict__["_fusion_forward"]
        cls._fusion_forward = staticmethod(lambda self, *a, **k: None)
        fm._direct = lambda *a: None
        fm._overlapped = lambda *a: None  # compiled: the full path (check first), as before _overlapped
        try:
            ts = []
            for _ in range(calls):
                t0 = time.perf_counter()
                f(x)
                ts.append(time.perf_counter() - t0)
        finally:
            cls._fusion_forward, fm._direct, fm._overlapped = forward, direct, overlapped
        print(f"{'fuse(model)' if compiled else 'fuse(model, compile=False)':27s} wrapper: median "
              f"{statistics.median(ts) * 1e6:6.1f} us, mean {statistics.mean(ts) * 1e6:6.1f} us per call")


if __name__ == "__main__":
    main()
