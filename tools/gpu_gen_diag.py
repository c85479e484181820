"""Why do greedy tokens of a fused tiny mlx-lm model differ from unfused on a GPU?

    PYTHONPATH=$PWD:$PWD/.device/py python3 tools/gpu_gen_diag.py

For each (arch, cache kind, prefill, compile) of tests/test_generation.py: greedy tokens
unfused and fused (every fusion allowed: min_tensor_size=0, no priors), and where they
differ, the first differing step, the unfused top-1/top-2 margin there (a near tie is
rounding, a large margin is a bug), the largest logits difference over the steps, and the
patterns fused; then each fused pattern alone, to name the one that changes the tokens.
"""

import os
import sys

os.environ.setdefault("MLX_FUSION_NO_PRIORS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import mlx.core as mx  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402

from mlx_fusion.config import FusionConfig  # noqa: E402
from mlx_fusion.fuse import fuse  # noqa: E402
from test_generation import CACHES, PROMPT, tiny_gpt2, tiny_llama  # noqa: E402


def run(model, cache_kind, n, prefill):
    cache = CACHES[cache_kind](model)
    toks, logits = [], []
    for t, lp in generate_step(PROMPT, model, max_tokens=n, prompt_cache=cache, prefill_step_size=prefill):
        toks.append(int(t))
        logits.append(lp)
    return toks, logits


def patterns(fused):
    found = set()
    for _, s in fused.fusion_states():
        found.update(p for p, n in s.stats.by_pattern.items() if n)
    return sorted(found)


def compare(model, kind, prefill, compile, cfg):
    want, wl = run(model, kind, 10, prefill)
    fused = fuse(model, cfg, compile=compile)
    got, gl = run(fused, kind, 10, prefill)
    diff = max(float(mx.max(mx.abs(a - b))) for a, b in zip(wl, gl))
    first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
    margin = None
    if first is not None:
        top = mx.sort(wl[first].reshape(-1))[-2:]
        margin = float(top[1] - top[0])
    return want == got, first, margin, diff, patterns(fused)


def main():
    models = {"llama": tiny_llama(), "gpt2": tiny_gpt2()}
    for arch, kind, prefill in [("llama", "kv", 2048), ("llama", "rotating", 2048), ("llama", "quantized", 2048),
                                ("llama", "kv", 4), ("gpt2", "kv", 2048), ("gpt2", "rotating", 3)]:
        for compile in (True, False):
            ok, first, margin, diff, pats = compare(models[arch], kind, prefill, compile, FusionConfig(min_tensor_size=0))
            print(f"{arch} {kind} prefill={prefill} compile={compile}: same={ok} first_diff={first} "
                  f"margin={margin} max_logprob_diff={diff:.3g} patterns={pats}", flush=True)
            if not ok:
                for p in pats:
                    cfg = FusionConfig(min_tensor_size=0, enabled_patterns=frozenset([p]))
                    ok1, first1, margin1, diff1, _ = compare(models[arch], kind, prefill, compile, cfg)
                    print(f"    only {p}: same={ok1} first_diff={first1} margin={margin1} "
                          f"max_logprob_diff={diff1:.3g}", flush=True)


if __name__ == "__main__":
    main()
