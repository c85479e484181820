"""Host time per call of an mlx-lm llama: plain, fuse(model, compile=False), mx.compile, fuse(model)
(graph building, and with the evaluation that follows each call). docs/performance.md, "Host cost of a fused call".

    PYTHONPATH=$PWD python tools/host_overhead_probe.py
"""
import statistics
import time

import mlx.core as mx
from mlx_lm.models import llama

from mlx_fusion import fuse

ARGS = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=8, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256, rms_norm_eps=1e-5,
                       rope_theta=10000.0, tie_word_embeddings=False)


def main(calls: int = 400):
    model = llama.Model(ARGS)
    mx.eval(model.parameters())
    x = mx.zeros((4, 32), dtype=mx.int32)
    variants = {"plain": model, "fused eager": fuse(model, compile=False), "mx.compile": mx.compile(model),
                "fused": fuse(model)}
    for f in variants.values():
        for _ in range(3):
            mx.eval(f(x))
    times = {k: [] for k in variants}
    totals = {k: [] for k in variants}
    for _ in range(calls):  # interleaved, so that drifts of the machine hit every variant alike
        for k, f in variants.items():
            t0 = time.perf_counter()
            y = f(x)
            times[k].append(time.perf_counter() - t0)
            mx.eval(y)
            totals[k].append(time.perf_counter() - t0)
    # (`fuse(model)` that fused nothing starts the evaluation inside the call when the device is
    # idle (_fused_module._overlapped): its host time then holds the encoding; compare call + eval.)
    for k, v in times.items():
        print(f"{k:12s} {statistics.median(v) * 1e6:7.1f} us per call, {statistics.median(totals[k]) * 1e6:7.1f} "
              "us with its evaluation")


if __name__ == "__main__":
    main()
