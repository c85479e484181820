"""Peak memory of a compiled training step, one process per variant (issue 11: fused llama with
0 fusions measured 1.2-1.3x the peak of mx.compile inside `mlx-fusion bench --model`).

    PYTHONPATH=$PWD:$PWD/.device/py python3 tools/gpu_train_memory.py [SPEC]

    ... tools/gpu_train_memory.py SPEC mx.compile,fused+compile,fused-model+compile

A variant may end in ``@mb=N`` (the child runs with MLX_MAX_MB_PER_BUFFER=N: MLX's CUDA encoder
commits a graph after N MB of inputs, 1000 on an H100/H200, and keeps every input alive until its
graph completes) and/or ``@limit=G`` (``mx.set_memory_limit(G GiB)``: MLX's eval waits for running
graphs while the active memory is above the limit), e.g. ``mx.compile@limit=14``.

Each variant (mx.compile, fused+compile, eager, fused; fused-model[+compile]: fuse(model) only) runs in a fresh Python process, so no
allocator cache, trace cache or buffer of another variant is alive: if the ratio is ~1.0 here,
the bench's numbers came from measuring variants side by side in one process.
"""

import json
import os
import subprocess
import sys
import time

SPEC = ("mlx-lm:llama:hidden_size=2048,num_hidden_layers=8,intermediate_size=5632,num_attention_heads=16,"
        "num_key_value_heads=8,vocab_size=32000,batch=4,seq=513,dtype=bfloat16")


def child(spec: str, variant: str) -> dict:
    variant, *options = variant.split("@")
    options = dict(o.split("=") for o in options)

    if variant.endswith("+lce"):  # the chunked linear+cross_entropy on a GPU too (lce_chunks)
        os.environ["MLX_FUSION_LCE_GPU"] = "1"
        variant = variant[: -len("+lce")]
    import mlx.core as mx

    from mlx_fusion import fuse
    from mlx_fusion.lm.spec import build
    from mlx_fusion.lm.timing import _loss, train_step

    if "limit" in options:
        mx.set_memory_limit(int(float(options["limit"]) * 2**30))
    model, (tokens,) = build(spec)
    # As `mlx-fusion bench --model` builds it: the fused rows fuse the loss with the model as
    # its argument; "fused-model" rows fuse only the model (the 0-fusion memory question).
    loss_fn, target = None, model
    if variant in ("fused", "fused+compile"):
        loss_fn = fuse(_loss, compile=variant == "fused+compile")
    elif variant.startswith("fused-model"):
        target = fuse(model, compile=variant == "fused-model+compile")
    step = train_step(target, compiled=variant in ("mx.compile", "fused+compile", "fused-model+compile"),
                      loss_fn=loss_fn)
    x, y = tokens[:, :-1], tokens[:, 1:]
    losses = [step(x, y).item()]  # from the common starting weights: comparable across variants
    mx.synchronize()
    resident = mx.get_active_memory()
    mx.clear_cache()
    mx.reset_peak_memory()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        loss = step(x, y)
        mx.eval(loss)
        mx.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    stats = loss_fn.stats if loss_fn is not None else getattr(target, "fusion_stats", None)
    fusions = dict(stats.by_pattern) if stats is not None else None
    return {"variant": variant, "peak_gib": mx.get_peak_memory() / 2**30, "resident_gib": resident / 2**30,
            "median_ms": sorted(times)[2] * 1e3, "fusions": fusions, "losses": [round(v, 5) for v in losses]}


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3])))
        return
    spec = sys.argv[1] if len(sys.argv) > 1 else SPEC
    variants = sys.argv[2].split(",") if len(sys.argv) > 2 else ["mx.compile", "fused+compile", "eager", "fused"]
    rows = []
    for variant in variants:
        env = dict(os.environ)
        for option in variant.split("@")[1:]:
            if option.startswith("mb="):
                env["MLX_MAX_MB_PER_BUFFER"] = option[3:]
        out = subprocess.run([sys.executable, __file__, "--child", spec, variant], capture_output=True, text=True,
                             env=env)
        variant = variant.replace("+lce", " (chunked lce)")
        line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
        row = json.loads(line) if line.startswith("{") else {"variant": variant, "error": out.stderr[-500:]}
        row["variant"] = variant
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["variant"] == "mx.compile" and "peak_gib" in r), None)
    if base:
        for r in rows:
            if "peak_gib" in r:
                print(f"{r['variant']:24s} peak {r['peak_gib']:.2f} GiB ({r['peak_gib'] / base['peak_gib']:.2f}x "
                      f"mx.compile)  {r['median_ms']:.1f} ms  fusions={r['fusions']}  losses={r['losses']}")


if __name__ == "__main__":
    main()
