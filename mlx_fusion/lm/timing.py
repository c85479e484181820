"""Timing an mlx-lm model the way mlx-lm runs it: prefill, decode with a KV cache, a training step.

    model, (tokens,) = build("mlx-lm:llama:hidden_size=256,batch=2,seq=128")
    rows = bench_lm(model, tokens)          # eager / mx.compile / fused / fused+compile per pass
    print_rows(rows, title="llama")

Passes:

- ``prefill``: ``model(tokens)`` over the whole (batch, seq) block; ``tokens_per_s`` counts
  batch x seq.
- ``decode``: batch 1, a prompt (the first row of `tokens`), then `new_tokens` greedy tokens
  with mlx-lm's KV cache (``make_prompt_cache``), one evaluation per token as
  ``generate_step`` does. ``time_ms`` is per token. ``mx.compile`` cannot take the cache (a
  Python object whose arrays are updated in place, with a new length every token; mlx-lm
  itself decodes eagerly), so that row is reported as not applicable (NaN).
- ``train``: next-token cross-entropy, ``nn.value_and_grad`` + ``optim.AdamW``; the compiled
  variants compile the whole step with the model and optimizer state as inputs and outputs.

Each row has the keys of `mlx_fusion.models.bench_model`'s rows (``pass``, ``variant``,
``time_ms``, ``speedup_vs_eager``, ``speedup_vs_compiled``, ``peak_memory_bytes``,
``activation_memory_bytes``, ``max_abs_diff``, ``fusions``) plus ``tokens_per_s`` and
``note`` (why a row is NaN, or the fallback warnings a fused variant gave). ``max_abs_diff``
is against eager: logits for prefill and decode (each variant decodes its own greedy tokens,
so a wrong token shows up as a large diff; ``tokens_match`` says whether they agree), the
first step's loss for train (every variant starts from the same weights).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

__all__ = ["bench_lm", "prefill_variants", "greedy_decode", "train_step", "print_rows", "VARIANTS", "PASSES"]

VARIANTS = ("eager", "mx.compile", "fused", "fused+compile")
PASSES = ("prefill", "decode", "train")
NAN = float("nan")


def prefill_variants(model: nn.Module) -> Dict[str, Callable]:
    """The four forward variants, as `mlx_fusion.models.model_variants` makes them."""
    from ..fuse import fuse

    return {"eager": model, "mx.compile": mx.compile(model, inputs=model.state),
            "fused": fuse(model, compile=False), "fused+compile": fuse(model)}


def greedy_decode(fn: Callable, model: nn.Module, prompt: mx.array, new_tokens: int):
    """Greedy tokens and per-step logits of `fn` (a variant of `model`) with a fresh KV cache.

    Returns (tokens, logits, seconds of the decode steps after the prompt)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = fn(prompt[None], cache=cache)[:, -1, :]
    y = mx.argmax(logits, axis=-1)
    mx.eval(y, logits)
    tokens, steps = [y.item()], [logits]
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits = fn(y[:, None], cache=cache)[:, -1, :]
        y = mx.argmax(logits, axis=-1)
        mx.eval(y, logits)
        tokens.append(y.item())
        steps.append(logits)
    return tokens, steps, time.perf_counter() - t0


def _loss(model, x, y):
    return nn.losses.cross_entropy(model(x).astype(mx.float32), y, reduction="mean")


def train_step(model: nn.Module, compiled: bool, learning_rate: float = 1e-4) -> Callable:
    """step(x, y) -> loss: value_and_grad + AdamW update, compiled with the model and
    optimizer state as inputs and outputs when `compiled`."""
    opt = optim.AdamW(learning_rate=learning_rate)
    opt.init(model.trainable_parameters())
    loss_and_grad = nn.value_and_grad(model, _loss)

    def step(x, y):
        loss, grads = loss_and_grad(model, x, y)
        opt.update(model, grads)
        return loss

    if compiled:
        state = [model.state, opt.state]
        step = mx.compile(step, inputs=state, outputs=state)
    return step


def _median_seconds(run: Callable[[], float], repeats: int, warmup: int, min_time_s: float) -> float:
    """Median of `run()` (which returns its own seconds, after evaluating)."""
    for _ in range(warmup):
        run()
    times, start = [], time.perf_counter()
    for _ in range(repeats):
        times.append(run())
        if min_time_s and time.perf_counter() - start > min_time_s and len(times) >= 3:
            break
    times.sort()
    return times[len(times) // 2]


def _peak(run: Callable[[], object]):
    """(peak bytes, peak over what was resident) of one `run()`."""
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    run()
    mx.synchronize()
    peak = mx.get_peak_memory()
    return peak, max(0, peak - before)


def _timed(fn: Callable, *args, calls: int = 1) -> Callable[[], float]:
    """run() -> seconds per call, `calls` calls per evaluation (a GPU needs several to hide the sync)."""
    def run():
        t0 = time.perf_counter()
        mx.eval([fn(*args) for _ in range(calls)])
        return (time.perf_counter() - t0) / calls
    return run


def _max_diff(got, want) -> float:
    return max((mx.abs(g.astype(mx.float32) - w.astype(mx.float32)).max().item() for g, w in zip(got, want)),
               default=0.0)


def _row(pass_, variant, **kw) -> dict:
    row = {"pass": pass_, "variant": variant, "time_ms": NAN, "speedup_vs_eager": NAN, "speedup_vs_compiled": NAN,
           "peak_memory_bytes": NAN, "activation_memory_bytes": NAN, "max_abs_diff": None, "fusions": None,
           "tokens_per_s": NAN, "note": ""}
    row.update(kw)
    return row


def _fusions(fn) -> Optional[int]:
    stats = getattr(fn, "fusion_stats", None) or getattr(fn, "stats", None)
    return getattr(stats, "applied_count", None)


def bench_lm(model: nn.Module, tokens: mx.array, passes=PASSES, new_tokens: int = 16, prompt_len: int = 32,
             repeats: int = 5, warmup: int = 1, min_time_s: float = 0.5, calls_per_eval: int = 1,
             progress: Optional[Callable[[str], None]] = None) -> List[dict]:
    """Prefill, decode and training step of an mlx-lm model for each of `VARIANTS`.

    Args:
        model (nn.Module): an mlx-lm ``Model`` (e.g. from `mlx_fusion.lm.spec.build`).
        tokens (mx.array): int32 token ids, (batch, seq): the prefill and training batch;
          its first row's first `prompt_len` tokens are the decode prompt.
        passes: a subset of ``("prefill", "decode", "train")``.
        new_tokens (int): tokens to decode per measurement.
        repeats, warmup, min_time_s, calls_per_eval: measurements per row (median),
          unmeasured runs before, a time budget after which three measurements are enough, and
          prefill calls / training steps per evaluation (decode evaluates every token). The
          keywords of `mlx_fusion.benchmark.default_timing`, so ``**default_timing()`` fits.

    Returns:
        list[dict]: one row per (pass, variant); see the module docstring. A variant that
        raises gets a row of NaN with the error in ``note``: nothing here raises for it.
    """
    from ..fuse import fuse

    unknown = set(passes) - set(PASSES)
    if unknown:
        raise ValueError(f"unknown pass(es) {', '.join(sorted(unknown))}; choose from {', '.join(PASSES)}")
    timing = dict(repeats=repeats, warmup=warmup, min_time_s=min_time_s)
    calls = max(1, calls_per_eval)
    model.eval()
    weights = model.parameters()  # arrays are immutable: this snapshot survives training steps
    results = []
    for pass_ in passes:
        rows, reference = [], None
        for variant in VARIANTS:
            if progress:
                progress(f"{pass_} {variant}")
            model.update(weights)  # every variant starts from the same weights
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    row, reference = _measure(pass_, variant, model, tokens, reference, new_tokens, prompt_len,
                                              timing, calls, fuse)
                except Exception as e:  # a failing variant is a result, not a crash
                    first_line = (str(e).strip().splitlines() or [""])[0]
                    row = _row(pass_, variant, note=f"failed: {type(e).__name__}: {first_line}")
            notes = sorted({str(w.message) for w in caught if "mlx_fusion" in str(w.message)})
            if notes:
                row["note"] = "; ".join(filter(None, [row["note"], *notes]))
            rows.append(row)
        _speedups(rows)
        results += rows
    model.update(weights)
    return results


def _measure(pass_, variant, model, tokens, reference, new_tokens, prompt_len, timing, calls, fuse):
    if pass_ == "prefill":
        fn = prefill_variants(model)[variant] if variant != "eager" else model
        t = _median_seconds(_timed(fn, tokens, calls=calls), **timing)
        peak, extra = _peak(_timed(fn, tokens))
        out = fn(tokens)
        reference = out if reference is None else reference
        return _row(pass_, variant, time_ms=t * 1e3, tokens_per_s=tokens.size / t, peak_memory_bytes=peak,
                    activation_memory_bytes=extra, max_abs_diff=_max_diff([out], [reference]),
                    fusions=_fusions(fn)), reference
    if pass_ == "decode":
        if variant == "mx.compile":
            return _row(pass_, variant, note="not applicable: mx.compile cannot take the KV cache "
                        "(mlx-lm decodes eagerly)"), reference
        fn = {"eager": model, "fused": fuse(model, compile=False), "fused+compile": fuse(model)}[variant]
        prompt = tokens[0, :prompt_len]
        t = _median_seconds(lambda: greedy_decode(fn, model, prompt, new_tokens)[2], **timing)
        peak, extra = _peak(lambda: greedy_decode(fn, model, prompt, new_tokens))
        toks, logits, _ = greedy_decode(fn, model, prompt, new_tokens)
        reference = (toks, logits) if reference is None else reference
        per_token = t / max(1, new_tokens - 1)
        return _row(pass_, variant, time_ms=per_token * 1e3, tokens_per_s=1 / per_token, peak_memory_bytes=peak,
                    activation_memory_bytes=extra, max_abs_diff=_max_diff(logits, reference[1]),
                    tokens_match=toks == reference[0], fusions=_fusions(fn)), reference
    # train: each measurement is one step from wherever the previous left the weights
    target = model if variant in ("eager", "mx.compile") else fuse(model, compile=variant == "fused+compile")
    step = train_step(target, compiled=variant in ("mx.compile", "fused+compile"))
    x, y = tokens[:, :-1], tokens[:, 1:]
    first = step(x, y)
    mx.eval(first)
    reference = first if reference is None else reference
    t = _median_seconds(_timed(step, x, y, calls=calls), **timing)
    peak, extra = _peak(_timed(step, x, y))
    return _row(pass_, variant, time_ms=t * 1e3, tokens_per_s=x.size / t, peak_memory_bytes=peak,
                activation_memory_bytes=extra, max_abs_diff=abs(first.item() - reference.item()),
                fusions=_fusions(target) if target is not model else None), reference


def _speedups(rows: List[dict]) -> None:
    by = {r["variant"]: r["time_ms"] for r in rows}
    for r in rows:
        r["speedup_vs_eager"] = by["eager"] / r["time_ms"]
        r["speedup_vs_compiled"] = by["mx.compile"] / r["time_ms"]


def print_rows(rows: List[dict], title: str = "", console=None) -> None:
    """A rich table of `bench_lm` rows (the columns of ``mlx-fusion bench --model`` plus
    tokens/s)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text  # not markup: SPECs and error messages hold ':name:' and '[...]'

    console = console or Console(highlight=False, width=200)
    table = Table(title=Text(title) if title else None, box=box.SIMPLE_HEAD)
    for col in ("pass", "variant", "time (ms)", "tokens/s", "vs eager", "vs mx.compile", "peak MiB",
                "over resident MiB", "fusions", "max |diff|", "note"):
        table.add_column(col, justify="left" if col in ("pass", "variant", "note") else "right")

    def num(x, fmt):
        return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)

    for r in rows:
        note = r["note"] if r.get("tokens_match", True) else "; ".join(filter(None, ["tokens differ", r["note"]]))
        table.add_row(r["pass"], r["variant"], num(r["time_ms"], ".3f"), num(r["tokens_per_s"], ",.0f"),
                      num(r["speedup_vs_eager"], ".2f"), num(r["speedup_vs_compiled"], ".2f"),
                      num(r["peak_memory_bytes"] / 2**20, ".1f"), num(r["activation_memory_bytes"] / 2**20, ".1f"),
                      num(r["fusions"], "d"), num(r["max_abs_diff"], ".2e"), Text(note))
    console.print(table)
