"""Demo models, the model SPEC the CLI accepts, and timing a whole model.

    model, inputs = load_spec("mlp:width=1024,depth=4,batch=64")
    model, inputs = load_spec("path/to/file.py:factory")   # factory() -> (model, example_inputs)

Built-ins (options in parentheses, all integers but dtype):

- ``mlp``: Linear+ReLU layers (width, depth, batch, dtype)
- ``gelu-mlp``: Linear+GELU layers (width, depth, batch, dtype)
- ``gated-mlp``: LLaMA MLP, down(silu(gate(x)) * up(x)) (width, hidden, depth, batch, dtype)
- ``transformer``: pre-norm blocks with RoPE attention and a gated SiLU MLP
  (dim, heads, hidden, depth, seq, batch, dtype)

A bad SPEC raises `SpecError` with an `exit_code`: 3 for a SPEC that does not parse or
names an unknown model/option/value, 4 for a factory file that cannot be loaded or
returns the wrong thing.

`bench_model` times forward and forward+backward of any model as eager, `mx.compile`,
fused and fused+compile, with peak memory.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .benchmark import default_timing, time_call

__all__ = ["MLP", "GatedMLP", "TransformerBlock", "Transformer", "DEMO_MODELS", "SpecError", "ModelSpec",
           "parse_spec", "load_spec", "bench_model", "model_variants", "EXIT_BAD_SPEC", "EXIT_LOAD_FAILED"]

EXIT_BAD_SPEC = 3
EXIT_LOAD_FAILED = 4

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class SpecError(ValueError):
    """A model SPEC that cannot be turned into (model, inputs); `exit_code` for the CLI."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_SPEC):
        super().__init__(message)
        self.exit_code = exit_code


# -- demo models ----------------------------------------------------------------------------------
class MLP(nn.Module):
    """`depth` Linear layers of `width`, each followed by `activation` (the last one too, so
    every layer is a Linear+bias+activation candidate)."""

    def __init__(self, width: int = 256, depth: int = 2, activation: Callable = nn.relu):
        super().__init__()
        self.layers = [nn.Linear(width, width) for _ in range(depth)]
        self.activation = activation

    def __call__(self, x):
        for layer in self.layers:
            x = self.activation(layer(x))
        return x


class GatedMLP(nn.Module):
    """LLaMA's MLP, `depth` times with residuals: x + down(silu(gate(x)) * up(x))."""

    def __init__(self, width: int = 256, hidden: int = 688, depth: int = 1):
        super().__init__()
        self.gates = [nn.Linear(width, hidden, bias=False) for _ in range(depth)]
        self.ups = [nn.Linear(width, hidden, bias=False) for _ in range(depth)]
        self.downs = [nn.Linear(hidden, width, bias=False) for _ in range(depth)]

    def __call__(self, x):
        for gate, up, down in zip(self.gates, self.ups, self.downs):
            x = x + down(nn.silu(gate(x)) * up(x))
        return x


class TransformerBlock(nn.Module):
    """An mlx-lm style block: RMSNorm, RoPE causal attention, RMSNorm, gated SiLU MLP."""

    def __init__(self, dim: int = 256, heads: int = 4, hidden: int = 688):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv, self.o = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.rope = nn.RoPE(dim // heads)
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x):
        B, L, D = x.shape
        q, k, v = mx.split(self.qkv(self.attn_norm(x)), 3, axis=-1)
        q, k, v = (t.reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3) for t in (q, k, v))
        a = mx.fast.scaled_dot_product_attention(self.rope(q), self.rope(k), v,
                                                 scale=q.shape[-1] ** -0.5, mask="causal")
        x = x + self.o(a.transpose(0, 2, 1, 3).reshape(B, L, D))
        h = self.mlp_norm(x)
        return x + self.down(nn.silu(self.gate(h)) * self.up(h))


class Transformer(nn.Module):
    def __init__(self, dim: int = 256, heads: int = 4, hidden: int = 688, depth: int = 2):
        super().__init__()
        self.blocks = [TransformerBlock(dim, heads, hidden) for _ in range(depth)]

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@dataclass(frozen=True)
class _Demo:
    help: str
    defaults: Dict[str, Any]
    build: Callable[[Dict[str, Any]], Tuple[nn.Module, Tuple[int, ...]]]  # -> (model, input shape)


DEMO_MODELS: Dict[str, _Demo] = {
    "mlp": _Demo("Linear+ReLU layers", dict(width=256, depth=2, batch=32, dtype="float32"),
                 lambda o: (MLP(o["width"], o["depth"], nn.relu), (o["batch"], o["width"]))),
    "gelu-mlp": _Demo("Linear+GELU layers", dict(width=256, depth=2, batch=32, dtype="float32"),
                      lambda o: (MLP(o["width"], o["depth"], nn.gelu), (o["batch"], o["width"]))),
    "gated-mlp": _Demo("LLaMA MLP: down(silu(gate(x)) * up(x))",
                       dict(width=256, hidden=688, depth=1, batch=32, dtype="float32"),
                       lambda o: (GatedMLP(o["width"], o["hidden"], o["depth"]), (o["batch"], o["width"]))),
    "transformer": _Demo("RMSNorm + RoPE attention + gated SiLU MLP blocks",
                         dict(dim=256, heads=4, hidden=688, depth=2, seq=64, batch=2, dtype="float32"),
                         lambda o: (Transformer(o["dim"], o["heads"], o["hidden"], o["depth"]),
                                    (o["batch"], o["seq"], o["dim"]))),
}


@dataclass
class ModelSpec:
    """A parsed SPEC: a demo name with options, or a factory in a Python file."""

    text: str
    name: str = ""
    options: Dict[str, Any] = field(default_factory=dict)
    path: str = ""
    factory: str = ""

    @property
    def is_file(self) -> bool:
        return bool(self.path)


def _looks_like_file(text: str) -> bool:
    head = text.rsplit(":", 1)[0] if ":" in text else text
    return head.endswith(".py") or "/" in head or "\\" in head


def parse_spec(text: str) -> ModelSpec:
    """`name[:key=value,...]` for a demo model, `path/to/file.py:factory` for your own."""
    text = text.strip()
    if not text:
        raise SpecError("empty model SPEC; try 'mlp' or 'path/to/file.py:factory'")
    if _looks_like_file(text):
        path, sep, factory = text.rpartition(":")
        if not sep or not factory.isidentifier():
            raise SpecError(f"model SPEC {text!r}: expected path/to/file.py:factory_function")
        return ModelSpec(text, path=path, factory=factory)
    name, _, opts = text.partition(":")
    demo = DEMO_MODELS.get(name)
    if demo is None:
        raise SpecError(f"unknown demo model {name!r}; choose from {', '.join(DEMO_MODELS)} "
                        "or give path/to/file.py:factory")
    options = dict(demo.defaults)
    for item in filter(None, (o.strip() for o in opts.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in options:
            raise SpecError(f"{name}: bad option {item!r}; options are "
                            + ", ".join(f"{k}={v}" for k, v in demo.defaults.items()))
        options[key] = _option_value(name, key, value)
    return ModelSpec(text, name=name, options=options)


def _option_value(model: str, key: str, value: str):
    if key == "dtype":
        if value not in DTYPES:
            raise SpecError(f"{model}: dtype must be one of {', '.join(DTYPES)}, not {value!r}")
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise SpecError(f"{model}: {key} must be a positive integer, not {value!r}")
    return n


def _build_demo(spec: ModelSpec, seed: int) -> Tuple[nn.Module, Tuple[mx.array, ...]]:
    o = spec.options
    if spec.name == "transformer" and o["dim"] % (2 * o["heads"]):
        raise SpecError(f"transformer: dim ({o['dim']}) must be a multiple of 2*heads ({2 * o['heads']})")
    mx.random.seed(seed)
    model, shape = DEMO_MODELS[spec.name].build(o)
    dtype = DTYPES[o["dtype"]]
    if dtype != mx.float32:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model, (mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype),)


def _load_factory(spec: ModelSpec) -> Tuple[Callable, Tuple[mx.array, ...]]:
    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise SpecError(f"model file not found: {path}", EXIT_LOAD_FAILED)
    mod_spec = importlib.util.spec_from_file_location(f"_mlx_fusion_user_{abs(hash(str(path.resolve())))}", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # the user's file: report any failure, don't crash
        raise SpecError(f"{path}: failed to import: {type(e).__name__}: {e}", EXIT_LOAD_FAILED) from e
    factory = getattr(module, spec.factory, None)
    if factory is None or not callable(factory):
        found = [n for n, v in vars(module).items() if inspect.isfunction(v) and v.__module__ == module.__name__]
        raise SpecError(f"{path}: no callable {spec.factory!r} (functions there: {', '.join(found) or 'none'})",
                        EXIT_LOAD_FAILED)
    try:
        result = factory()
    except Exception as e:
        raise SpecError(f"{spec.text}: factory raised {type(e).__name__}: {e}", EXIT_LOAD_FAILED) from e
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and callable(result[0])):
        raise SpecError(f"{spec.text}: the factory must return (model, example_inputs), got "
                        f"{type(result).__name__}", EXIT_LOAD_FAILED)
    model, inputs = result
    inputs = (inputs,) if isinstance(inputs, mx.array) else tuple(inputs) if isinstance(inputs, (tuple, list)) else None
    if not inputs or not all(isinstance(a, mx.array) for a in inputs):
        raise SpecError(f"{spec.text}: example_inputs must be an mx.array or a tuple/list of them",
                        EXIT_LOAD_FAILED)
    if isinstance(model, nn.Module):
        mx.eval(model.parameters())
    return model, inputs


def load_spec(spec, seed: int = 0) -> Tuple[Callable, Tuple[mx.array, ...]]:
    """(model, example inputs) for a SPEC string or `ModelSpec`. Raises `SpecError`."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    return _load_factory(spec) if spec.is_file else _build_demo(spec, seed)


def describe_demos() -> List[str]:
    """One help line per demo model: name, what it is, options with defaults."""
    return [f"{name}: {d.help} ({', '.join(f'{k}={v}' for k, v in d.defaults.items())})"
            for name, d in DEMO_MODELS.items()]


def parameter_count(model) -> int:
    if not isinstance(model, nn.Module):
        return 0
    return sum(math.prod(v.shape) for _, v in tree_flatten(model.parameters()))


# -- whole models ---------------------------------------------------------------------------------
def _loss_and_grad(model: Callable, n_inputs: int) -> Callable:
    """value_and_grad of sum(model(*inputs)): w.r.t. the parameters of a Module, else the inputs."""

    def loss(*inputs):
        return sum(mx.sum(o.astype(mx.float32)) for o in _leaves(model(*inputs)))

    if isinstance(model, nn.Module):
        return nn.value_and_grad(model, loss)
    return mx.value_and_grad(loss, argnums=tuple(range(n_inputs)))


def _leaves(tree) -> List[mx.array]:
    return [tree] if isinstance(tree, mx.array) else [v for _, v in tree_flatten(tree) if isinstance(v, mx.array)]


def _peak_memory(fn: Callable, args: Sequence) -> Tuple[int, int]:
    """(peak bytes, peak minus what was resident before) for one evaluated call."""
    mx.eval(fn(*args))  # compiled/fused variants build their caches outside the measurement
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(fn(*args))
    mx.synchronize()
    peak = mx.get_peak_memory()
    return peak, max(0, peak - before)


def model_variants(model: Callable) -> Dict[str, Callable]:
    """The forward variants compared by `bench_model`. `fused` replays the fused graph
    eagerly, `fused+compile` under `mx.compile` (what `fuse()` does by default); for
    fwd+bwd, `mx.compile` and `fused+compile` compile the whole training step."""
    from .fuse import fuse

    compiled = mx.compile(model, inputs=model.state) if isinstance(model, nn.Module) else mx.compile(model)
    return {"eager": model, "mx.compile": compiled, "fused": fuse(model, compile=False),
            "fused+compile": fuse(model)}


def bench_model(model: Callable, inputs: Sequence[mx.array], backward: bool = True,
                progress: Optional[Callable[[str], None]] = None, **timing) -> List[dict]:
    """Forward (and forward+backward) of a model: eager vs mx.compile vs fused vs fused+compile.

    Returns one dict per (pass, variant): ``pass``, ``variant``, ``time_ms``, ``speedup_vs_eager``,
    ``speedup_vs_compiled``, ``peak_memory_bytes``, ``activation_memory_bytes`` (peak minus the
    resident parameters and inputs), ``max_abs_diff`` (forward outputs vs eager; ``None`` for
    fwd+bwd), ``fusions`` (fused ops applied, fused variants only).
    """
    import mlx.nn as nn

    timing = timing or default_timing()
    inputs = list(inputs)
    forward = model_variants(model)
    want = _leaves(model(*inputs))
    passes = [("fwd", forward)]
    if backward:
        grad_fns = {}
        for name, fn in forward.items():
            if name in ("mx.compile", "fused+compile"):  # compile the whole step, as a training loop would
                target = model if name == "mx.compile" else fn
                vg = _loss_and_grad(target, len(inputs))
                # value_and_grad writes tracers into the module: they must be outputs too.
                grad_fns[name] = (mx.compile(vg, inputs=target.state, outputs=target.state)
                                  if isinstance(target, nn.Module) else mx.compile(vg))
            else:
                grad_fns[name] = _loss_and_grad(fn, len(inputs))
        passes.append(("fwd+bwd", grad_fns))
    results = []
    for pass_, fns in passes:
        rows = []
        for name, fn in fns.items():
            if progress:
                progress(f"{pass_} {name}")
            t = time_call(fn, inputs, **timing)
            peak, extra = _peak_memory(fn, inputs)
            diff = None
            if pass_ == "fwd":
                got = _leaves(fn(*inputs))
                diff = max((mx.abs(g.astype(mx.float32) - w.astype(mx.float32)).max().item()
                            for g, w in zip(got, want)), default=0.0)
            stats = getattr(forward[name], "fusion_stats", None) or getattr(forward[name], "stats", None)
            rows.append({"pass": pass_, "variant": name, "time_ms": t * 1e3,
                         "peak_memory_bytes": peak, "activation_memory_bytes": extra, "max_abs_diff": diff,
                         "fusions": stats.applied_count if stats is not None and name.startswith("fused") else None})
        eager, compiled = rows[0]["time_ms"], rows[1]["time_ms"]
        for r in rows:
            r["speedup_vs_eager"], r["speedup_vs_compiled"] = eager / r["time_ms"], compiled / r["time_ms"]
        results += rows
    return results
