"""The model SPEC the CLI accepts: a string that names a model and its example inputs.

    model, inputs = load_spec("mlp:width=1024,depth=4,batch=64")   # a demo model (models/demos.py)
    model, inputs = load_spec("path/to/file.py:factory")            # factory() -> (model, example_inputs)
    model, inputs = load_spec("mlx-lm:llama:hidden_size=64")        # a builder registered for a prefix

Demo options are integers (>= 1) but ``dtype`` (float32, float16, bfloat16).
`SPEC_BUILDERS` maps a prefix (``"mlx-lm"``) to ``"module:function"``, imported when a
SPEC starting with ``<prefix>:`` is loaded and called with the whole SPEC string; it
returns ``(model, example_inputs)`` and raises `SpecError` (or ValueError) for a bad SPEC.

A bad SPEC raises `SpecError` with an `exit_code`: 3 for a SPEC that does not parse or
names an unknown model/option/value, 4 for a factory file (or builder) that cannot be
loaded or returns the wrong thing.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .demos import DEMO_MODELS

__all__ = ["SpecError", "ModelSpec", "parse_spec", "load_spec", "describe_demos", "parameter_count",
           "SPEC_BUILDERS", "DTYPES", "EXIT_BAD_SPEC", "EXIT_LOAD_FAILED"]

EXIT_BAD_SPEC = 3
EXIT_LOAD_FAILED = 4

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class SpecError(ValueError):
    """A model SPEC that cannot be turned into (model, inputs); `exit_code` for the CLI."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_SPEC):
        super().__init__(message)
        self.exit_code = exit_code


# SPEC prefix -> "module:function" building (model, example_inputs) from the whole SPEC.
SPEC_BUILDERS: Dict[str, str] = {"mlx-lm": "mlx_fusion.lm.spec:build"}


@dataclass
class ModelSpec:
    """A parsed SPEC: a demo name with options, a factory in a Python file, or a SPEC for
    the builder registered for its prefix (`prefix`)."""

    text: str
    name: str = ""
    options: Dict[str, Any] = field(default_factory=dict)
    path: str = ""
    factory: str = ""
    prefix: str = ""

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
    prefix = text.partition(":")[0]
    if prefix in SPEC_BUILDERS:
        return ModelSpec(text, prefix=prefix)
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
    return _check_result(spec, result, "factory")


def _check_result(spec: ModelSpec, result, what: str) -> Tuple[Callable, Tuple[mx.array, ...]]:
    """(model, inputs as a tuple) from what a factory or builder returned, else SpecError (4)."""
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and callable(result[0])):
        raise SpecError(f"{spec.text}: the {what} must return (model, example_inputs), got "
                        f"{type(result).__name__}", EXIT_LOAD_FAILED)
    model, inputs = result
    inputs = (inputs,) if isinstance(inputs, mx.array) else tuple(inputs) if isinstance(inputs, (tuple, list)) else None
    if not inputs or not all(isinstance(a, mx.array) for a in inputs):
        raise SpecError(f"{spec.text}: example_inputs must be an mx.array or a tuple/list of them",
                        EXIT_LOAD_FAILED)
    if isinstance(model, nn.Module):
        mx.eval(model.parameters())
    return model, inputs


def _build_prefixed(spec: ModelSpec) -> Tuple[Callable, Tuple[mx.array, ...]]:
    target = SPEC_BUILDERS[spec.prefix]
    module_name, _, function = target.partition(":")
    try:
        build = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as e:
        raise SpecError(f"{spec.text}: {spec.prefix!r} SPECs need {target} ({type(e).__name__}: {e})",
                        EXIT_LOAD_FAILED) from e
    try:
        result = build(spec.text)
    except SpecError:
        raise
    except ValueError as e:  # the builder's "bad SPEC"
        raise SpecError(f"{spec.text}: {e}") from e
    except Exception as e:
        raise SpecError(f"{spec.text}: building the model raised {type(e).__name__}: {e}", EXIT_LOAD_FAILED) from e
    return _check_result(spec, result, "builder")


def load_spec(spec, seed: int = 0) -> Tuple[Callable, Tuple[mx.array, ...]]:
    """(model, example inputs) for a SPEC string or `ModelSpec`. Raises `SpecError`."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.prefix:
        return _build_prefixed(spec)
    return _load_factory(spec) if spec.is_file else _build_demo(spec, seed)


def describe_demos() -> List[str]:
    """One help line per demo model: name, what it is, options with defaults."""
    return [f"{name}: {d.help} ({', '.join(f'{k}={v}' for k, v in d.defaults.items())})"
            for name, d in DEMO_MODELS.items()]


def parameter_count(model) -> int:
    if not isinstance(model, nn.Module):
        return 0
    return sum(math.prod(v.shape) for _, v in tree_flatten(model.parameters()))
