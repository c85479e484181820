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
from typing import Callable, List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

__all__ = ["bench_lm", "prefill_variant", "greedy_decode", "train_step", "print_rows", "VARIANTS", "PASSES"]

VARIANTS = ("eager", "mx.compile", "fused", "fused+compile")
PASSES = ("prefill", "decode", "train")
NAN = float("nan")


def prefill_variant(model: nn.Module, name: str) -> Callable:
    """One of the four forward variants, as `mlx_fusion.models.model_variants` makes them."""
    from ..fuse import fuse

    return {"eager": lambda: model, "mx.compile": lambda: mx.compile(model, inputs=model.state),
            "fused": lambda: fuse(model, compile=False), "fused+compile": lambda: fuse(model)}[name]()


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


def train_step(model: nn.Module, compiled: bool, learning_rate: float = 1e-4,
               loss_fn: Optional[Callable] = None) -> Callable:
    """step(x, y) -> loss: value_and_grad of `loss_fn(model, x, y)` (default: the mean cross
    entropy of float32 logits) + AdamW update, compiled with the model and optimizer state as
    inputs and outputs when `compiled`."""
    opt = optim.AdamW(learning_rate=learning_rate)
    opt.init(model.trainable_parameters())
    loss_and_grad = nn.value_and_grad(model, loss_fn or _loss)

    def step(x, y):
        loss, grads = loss_and_grad(model, x, y)
        opt.update(model, grads)
        return loss

    if compiled:
        state = [model.state, opt.state]
        step = mx.compile(step, inputs=state, outputs=state)
    return step


def _resident() -> int:
    mx.synchronize()
    mx.clear_cache()
    return mx.get_active_memory()


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
    states = getattr(fn, "fusion_states", None)
    if states is not None:  # a split model (decoding with a cache) fuses its children: count theirs too
        return sum(s.stats.applied_count for _, s in states())
    stats = getattr(fn, "fusion_stats", None) or getattr(fn, "stats", None)
    return getattr(stats, "applied_count", None)


def bench_lm(model: nn.Module, tokens: mx.array, passes=PASSES, new_tokens: int = 16, prompt_len: int = 32,
             repeats: int = 5, warmup: int = 1, min_time_s: float = 0.5, calls_per_eval: int = 1,
             progress: Optional[Callable[[str], None]] = None,
             on_result: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """Prefill, decode and training step of an mlx-lm model for each of `VARIANTS`.

    Args:
        model (nn.Module): an mlx-lm ``Model`` (e.g. from `mlx_fusion.lm.spec.build`).
        tokens (mx.array): int32 token ids, (batch, seq): the prefill and training batch;
          its first row's first `prompt_len` tokens are the decode prompt.
        passes: a subset of ``("prefill", "decode", "train")``.
        new_tokens (int): tokens to decode per measurement.
        repeats, warmup, min_time_s, calls_per_eval: measurements per row (median; the
          variants of a pass are measured in turn, round after round), unmeasured runs
          before, a time budget per variant after which three rounds are enough, and prefill
          calls / training steps per evaluation (decode evaluates every token). The keywords
          of `mlx_fusion.benchmark.default_timing`, so ``**default_timing()`` fits.
        progress (Callable, optional): called with "<pass> <variant>" as each setup starts.
        on_result (Callable, optional): called with each row as soon as its pass is measured
          (the CLI writes its JSON then, so an interrupted run keeps the finished passes).

    Returns:
        list[dict]: one row per (pass, variant); see the module docstring. A variant that
        raises gets a row of NaN with the error in ``note``: nothing here raises for it.
    """
    from ..fuse import fuse

    unknown = set(passes) - set(PASSES)
    if unknown:
        raise ValueError(f"unknown pass(es) {', '.join(sorted(unknown))}; choose from {', '.join(PASSES)}")
    model.eval()
    weights = model.parameters()  # arrays are immutable: this snapshot survives training steps
    setup = {"prefill": _setup_prefill, "decode": _setup_decode, "train": _setup_train}
    results = []
    for pass_ in passes:
        variants, reference = [], None
        base = _resident()
        for name in VARIANTS:
            if progress:
                progress(f"{pass_} {name}")
            model.update(weights)  # every variant starts from the same weights
            v = _Variant(pass_, name)
            others = _resident() - base  # what the variants before this one keep (optimizer state, ...)
            with warnings.catch_warnings(record=True) as caught:  # fallbacks warn on the first call
                warnings.simplefilter("always")
                v.guard(lambda: setup[pass_](v, model, tokens, reference, fuse, max(1, calls_per_eval),
                                             new_tokens, prompt_len))
                for _ in range(warmup):
                    v.guard(v.run)
                v.guard(lambda: v.measure_peak(others))
            v.add_notes(sorted({str(w.message) for w in caught if "mlx_fusion" in str(w.message)}))
            if reference is None and v.run is not None:
                reference = v.reference
            variants.append(v)
        _time_in_rounds(variants, repeats, min_time_s)
        rows = [v.finish() for v in variants]
        _speedups(rows)
        results += rows
        for row in rows if on_result else ():  # a pass's rows are done together (timed in rounds)
            on_result(row)
    model.update(weights)
    return results


class _Variant:
    """One variant of one pass: set up and checked against the reference, then timed in rounds
    with the others (a shared machine's load then falls on all variants alike)."""

    def __init__(self, pass_: str, name: str):
        self.row = _row(pass_, name)
        self.run: Optional[Callable[[], float]] = None  # one measurement: seconds per `unit`
        self.peak_run: Optional[Callable] = None
        self.unit_tokens, self.reference, self.times = 1, None, []

    def guard(self, fn) -> None:
        """Call fn; an exception makes this variant a row of NaN with the error as its note."""
        if self.row["note"].startswith(("failed", "not applicable")):
            return
        try:
            fn()
        except Exception as e:  # a failing variant is a result, not a crash
            first_line = (str(e).strip().splitlines() or [""])[0]
            self.row["note"] = f"failed: {type(e).__name__}: {first_line}"
            self.run = None

    def measure_peak(self, others: int) -> None:
        """Peak memory of one run, less what `others` (the variants set up before) hold:
        as if this variant ran alone."""
        if self.peak_run is not None:
            peak, extra = _peak(self.peak_run)
            self.row.update(peak_memory_bytes=max(0, peak - others), activation_memory_bytes=extra)

    def add_notes(self, notes) -> None:
        self.row["note"] = "; ".join(filter(None, [self.row["note"], *notes]))

    def finish(self) -> dict:
        if self.run is None or not self.times:
            return self.row
        t = sorted(self.times)[len(self.times) // 2]
        self.row.update(time_ms=t * 1e3, tokens_per_s=self.unit_tokens / t)
        return self.row


def _time_in_rounds(variants: List[_Variant], repeats: int, min_time_s: float) -> None:
    start = time.perf_counter()
    for r in range(repeats):
        for v in variants:
            if v.run is not None:
                v.guard(lambda: v.times.append(v.run()))
        live = sum(v.run is not None for v in variants)
        if min_time_s and r >= 2 and time.perf_counter() - start > min_time_s * live:
            break


def _setup_prefill(v, model, tokens, reference, fuse, calls, new_tokens, prompt_len):
    fn = prefill_variant(model, v.row["variant"])
    out = fn(tokens)
    mx.eval(out)
    v.reference = out
    v.row.update(max_abs_diff=_max_diff([out], [reference if reference is not None else out]),
                 fusions=_fusions(fn))
    v.run, v.peak_run, v.unit_tokens = _timed(fn, tokens, calls=calls), _timed(fn, tokens), tokens.size


def _setup_decode(v, model, tokens, reference, fuse, calls, new_tokens, prompt_len):
    name = v.row["variant"]
    if name == "mx.compile":
        v.row["note"] = "not applicable: mx.compile cannot take the KV cache (mlx-lm decodes eagerly)"
        return
    fn = {"eager": model, "fused": fuse(model, compile=False), "fused+compile": fuse(model)}[name]
    prompt = tokens[0, :prompt_len]
    toks, logits, _ = greedy_decode(fn, model, prompt, new_tokens)
    v.reference = (toks, logits)
    want = reference if reference is not None else v.reference
    v.row.update(max_abs_diff=_max_diff(logits, want[1]), tokens_match=toks == want[0], fusions=_fusions(fn))
    steps = max(1, new_tokens - 1)  # timed: the decode steps after the prompt, per token
    v.run = lambda: greedy_decode(fn, model, prompt, new_tokens)[2] / steps
    v.peak_run = lambda: greedy_decode(fn, model, prompt, new_tokens)


def _setup_train(v, model, tokens, reference, fuse, calls, new_tokens, prompt_len):
    name = v.row["variant"]
    # The fused rows fuse the loss with the model as its argument (what a user writes:
    # nn.value_and_grad(model, fuse(loss_fn))), so one trace holds the model and the loss and
    # the lm_head + cross-entropy can fuse (linear+cross_entropy) along with the model's own.
    loss_fn = None if name in ("eager", "mx.compile") else fuse(_loss, compile=name == "fused+compile")
    step = train_step(model, compiled=name in ("mx.compile", "fused+compile"), loss_fn=loss_fn)
    x, y = tokens[:, :-1], tokens[:, 1:]
    first = step(x, y)  # from the common starting weights; later steps go on from wherever they are
    mx.eval(first)
    v.reference = first
    v.row.update(max_abs_diff=abs(first.item() - (reference if reference is not None else first).item()),
                 fusions=_fusions(loss_fn) if loss_fn is not None else None)
    if loss_fn is not None:
        by = sorted(loss_fn.stats.by_pattern.items())
        v.row["note"] = "; ".join(filter(None, [v.row.get("note", ""), ", ".join(f"{k} x{n}" for k, n in by)]))
    v.run, v.peak_run, v.unit_tokens = _timed(step, x, y, calls=calls), _timed(step, x, y), x.size


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

    console = console or Console(highlight=False)
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
    from rich.measure import Measurement

    need = Measurement.get(console, console.options.update(max_width=10_000), table).maximum
    console.width = max(console.width, need)  # wrap no cell: rows stay one line each
    console.print(table)
