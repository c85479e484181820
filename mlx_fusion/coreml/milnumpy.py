"""Re-run a saved ML Program in NumPy: the reference executor for machines without Core ML.

    outputs = run_package(path, {"in0": x})        # name -> fp16 ndarray
    ex = MilExecutor(path); ex(inputs); ex.paths    # which ops used coremltools' value inference

The package is read back the way Core ML would see it (the spec and the weight
blob, via coremltools' milproto loader). Each op is evaluated with
coremltools' own NumPy value inference (``op.value_inference()``) when it has
one that works on these inputs; otherwise with the small NumPy table below.
Every intermediate is rounded to fp16, as the program stores it. This checks the
*program* (ops, weights, layouts, names); it says nothing about the Neural
Engine's own arithmetic or speed.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Callable, Dict

import numpy as np

from . import require_coremltools

__all__ = ["MilExecutor", "run_package", "NUMPY_OPS", "load_program"]


def load_program(path):
    """(spec, pymil Program) of a saved .mlpackage."""
    ct = require_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = ct.utils.load_spec(str(path))
    weights = Path(path) / "Data" / "com.apple.CoreML" / "weights"
    return spec, load(spec, spec.specificationVersion, file_weights_dir=str(weights))


def _f(a):
    return np.asarray(a, dtype=np.float32)


def _erf(x):
    return np.vectorize(math.erf, otypes=[np.float32])(_f(x))


def _softmax(x, axis):
    x = _f(x)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _reduce(fn):
    return lambda a: fn(_f(a["x"]), axis=tuple(int(i) for i in np.atleast_1d(a["axes"])),
                        keepdims=bool(a.get("keep_dims", False)))


def _gelu(a):
    x, mode = _f(a["x"]), str(a.get("mode", "EXACT"))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1 + np.exp(-1.702 * x))
    return x * (1 + _erf(x / math.sqrt(2))) / 2


def _linear(a):
    y = _f(a["x"]) @ _f(a["weight"]).T
    return y + _f(a["bias"]) if a.get("bias") is not None else y


def _matmul(a):
    x, y = _f(a["x"]), _f(a["y"])
    if a.get("transpose_x"):
        x = np.swapaxes(x, -1, -2)
    if a.get("transpose_y"):
        y = np.swapaxes(y, -1, -2)
    return x @ y


def _layer_norm(a):
    x = _f(a["x"])
    axes = tuple(int(i) for i in np.atleast_1d(a["axes"]))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + float(a.get("epsilon", 1e-5)))
    if a.get("gamma") is not None:
        y = y * _f(a["gamma"])
    if a.get("beta") is not None:
        y = y + _f(a["beta"])
    return y


# MIL op type -> fn(args: name -> ndarray/scalar) -> ndarray (computed in fp32).
NUMPY_OPS: Dict[str, Callable] = {
    "identity": lambda a: a["x"],
    "cast": lambda a: a["x"],
    "add": lambda a: _f(a["x"]) + _f(a["y"]),
    "sub": lambda a: _f(a["x"]) - _f(a["y"]),
    "mul": lambda a: _f(a["x"]) * _f(a["y"]),
    "real_div": lambda a: _f(a["x"]) / _f(a["y"]),
    "maximum": lambda a: np.maximum(_f(a["x"]), _f(a["y"])),
    "minimum": lambda a: np.minimum(_f(a["x"]), _f(a["y"])),
    "pow": lambda a: np.power(_f(a["x"]), _f(a["y"])),
    "exp": lambda a: np.exp(_f(a["x"])),
    "log": lambda a: np.log(_f(a["x"]) + float(a.get("epsilon", 0.0))),
    "erf": lambda a: _erf(a["x"]),
    "tanh": lambda a: np.tanh(_f(a["x"])),
    "sigmoid": lambda a: 1 / (1 + np.exp(-_f(a["x"]))),
    "abs": lambda a: np.abs(_f(a["x"])),
    "square": lambda a: _f(a["x"]) ** 2,
    "sin": lambda a: np.sin(_f(a["x"])),
    "cos": lambda a: np.cos(_f(a["x"])),
    "sqrt": lambda a: np.sqrt(_f(a["x"])),
    "rsqrt": lambda a: 1 / np.sqrt(_f(a["x"]) + float(a.get("epsilon", 0.0))),
    "relu": lambda a: np.maximum(_f(a["x"]), 0),
    "silu": lambda a: _f(a["x"]) / (1 + np.exp(-_f(a["x"]))),
    "gelu": _gelu,
    "softmax": lambda a: _softmax(a["x"], int(a["axis"])),
    "reduce_sum": _reduce(np.sum),
    "reduce_mean": _reduce(np.mean),
    "reduce_prod": _reduce(np.prod),
    "reduce_max": _reduce(np.max),
    "reduce_min": _reduce(np.min),
    "reduce_log_sum_exp": _reduce(lambda x, axis, keepdims: np.log(np.sum(np.exp(x), axis=axis, keepdims=keepdims))),
    "reshape": lambda a: np.reshape(a["x"], [int(d) for d in a["shape"]]),
    "transpose": lambda a: np.transpose(a["x"], [int(p) for p in a["perm"]]),
    "tile": lambda a: np.tile(a["x"], [int(r) for r in a["reps"]]),
    "linear": _linear,
    "matmul": _matmul,
    "layer_norm": _layer_norm,
}


class MilExecutor:
    """A loaded program that can be called repeatedly with ``{input name: ndarray}``.

    Attributes:
        paths (Counter): ``("value_inference" | "numpy", op type) -> count`` over all calls.
        spec: the model spec; program: the pymil Program.
    """

    def __init__(self, path):
        self.spec, self.program = load_program(path)
        self.function = self.program.functions["main"]
        self.paths: Counter = Counter()

    def op_types(self) -> Counter:
        return Counter(op.op_type for op in self.function.operations if op.op_type != "const")

    def __call__(self, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        env: Dict[str, np.ndarray] = {}
        for name, var in self.function.inputs.items():
            x = np.asarray(inputs[name], dtype=np.float16)
            if tuple(x.shape) != tuple(var.shape):
                raise ValueError(f"input {name}: shape {x.shape}, program expects {tuple(var.shape)}")
            env[var.name] = x
        for op in self.function.operations:
            if op.op_type == "const":
                continue
            out = self._run_op(op, env)
            env[op.outputs[0].name] = out
        return {v.name: env[v.name] for v in self.function.outputs}

    def _value(self, var, env):
        return env[var.name] if var.name in env else var.val

    def _run_op(self, op, env) -> np.ndarray:
        want = tuple(op.outputs[0].shape)
        args = {}
        for k, v in op.inputs.items():
            if isinstance(v, (list, tuple)):
                args[k] = [self._value(x, env) for x in v]
                continue
            args[k] = self._value(v, env)
            if v.name in env:  # feed the computed value to coremltools' value inference
                sv = v.sym_type()
                sv.val = env[v.name]
                v._sym_val = sv
        out = None
        try:
            got = op.value_inference()
            got = np.asarray(got)
            if got.dtype.kind in "fiu" and tuple(got.shape) == want:
                out, path = got, "value_inference"
        except Exception:
            pass
        if out is None:
            fn = NUMPY_OPS.get(op.op_type)
            if fn is None:
                raise NotImplementedError(f"no NumPy implementation of MIL op {op.op_type}")
            out, path = np.asarray(fn(args)), "numpy"
        self.paths[(path, op.op_type)] += 1
        out = out.astype(np.float16)
        if tuple(out.shape) != want:
            raise ValueError(f"{op.op_type} {op.name}: computed {out.shape}, program says {want}")
        return out


def run_package(path, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Run a saved .mlpackage once in NumPy."""
    return MilExecutor(path)(inputs)
