"""`HostCudaKernel`: a stand-in for `mx.fast.cuda_kernel` that runs the CUDA source on the CPU.

With `kernels.use_backend("cuda", HostCudaKernel)` the fused ops take their CUDA path and
launch their kernels exactly as they would on a GPU (same inputs, grid, threadgroup and
template arguments); each call is rendered as MLX's `build_kernel` renders it, compiled as
host C++ (host.py, cached) and run eagerly on the evaluated inputs. Every launch is recorded
in `HostCudaKernel.launches`, outputs included (hidden ones such as linear's `z` too).

Like the Metal shim it evaluates its inputs, so it works under `mx.grad` but not inside
`mx.compile` / `mx.vmap`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from .host import DTYPES, Variant, check_guards, encode, guarded_empty, load, render_unit, run_variant

__all__ = ["HostCudaKernel", "Launch", "recording_factory"]

_NAMES = {dt: name for name, dt in DTYPES.items()}


@dataclass
class Launch:
    """One recorded kernel call: what the op passed and what the kernel wrote (storage dtype:
    bfloat16 as uint16 bits)."""

    name: str
    template: Tuple
    grid: Tuple[int, int, int]
    threadgroup: Tuple[int, int, int]
    inputs: List[np.ndarray]
    outputs: List[np.ndarray]
    output_dtypes: Tuple[str, ...]


def _to_numpy(x: mx.array) -> np.ndarray:
    return np.array(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x, copy=False)


def _from_numpy(a: np.ndarray, dtype) -> mx.array:
    out = mx.array(np.ascontiguousarray(a))
    return out.view(mx.bfloat16) if dtype == mx.bfloat16 else out


class HostCudaKernel:
    """Keyword signature of `mx.fast.cuda_kernel`; the object is called like MLX's.

    `edit` (class attribute): a function (name, header, body) -> (header, body) applied to
    the sources first: `recording_factory(edit)` makes mutants of a kernel this way."""

    launches: List[Launch] = []
    edit: Optional[Callable[[str, str, str], Tuple[str, str]]] = None

    def __init__(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                 shared_memory=0, atomic_outputs=False):
        if type(self).edit is not None:
            header, source = type(self).edit(name, header, source)
        self.name = name
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 init_value=None, verbose=False, stream=None):
        if len(inputs) != len(self.input_names) or len(output_shapes) != len(self.output_names):
            raise ValueError(f"[cuda_kernel] {self.name}: wrong number of inputs or outputs")
        if tuple(grid[1:]) != (1, 1) or tuple(threadgroup[1:]) != (1, 1):
            raise NotImplementedError("[cuda shim] only 1-D launches are modelled")
        arrays = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        mx.eval(arrays)
        template = tuple((n, _NAMES[v] if isinstance(v, mx.Dtype) else v) for n, v in (template or ()))
        in_dtypes = tuple(_NAMES[x.dtype] for x in arrays)
        out_dtypes = tuple(_NAMES[d] for d in output_dtypes)
        key = hashlib.sha256(repr((self.name, template, in_dtypes, out_dtypes)).encode()).hexdigest()[:12]
        v = Variant(f"{self.name}_{key}", self.input_names, in_dtypes, self.output_names, out_dtypes, template)
        text = render_unit(self.header, self.source, [v])
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{text}\n```")
        np_inputs = []
        for x in arrays:
            a = _to_numpy(x)
            np_inputs.append(np.ascontiguousarray(a) if self.ensure_row_contiguous else a)
        fill = np.nan if init_value is None else init_value  # unwritten elements show as NaN
        guarded = [guarded_empty(tuple(s), d) for s, d in zip(output_shapes, out_dtypes)]
        outs = [y for _, y, _ in guarded]
        for y, d in zip(outs, out_dtypes):
            y[...] = encode(np.full(y.shape, fill, dtype=np.float32), d)
        run_variant(load(text), v, np_inputs, outs, grid[0], threadgroup[0])
        for (raw, y, start), name in zip(guarded, self.output_names):
            check_guards(f"{self.name} (output `{name}`)", raw, start, y.nbytes)
        HostCudaKernel.launches.append(Launch(self.name, template, tuple(grid), tuple(threadgroup),
                                              np_inputs, outs, out_dtypes))
        return [_from_numpy(y, d) for y, d in zip(outs, output_dtypes)]


_mutants: List[type] = []  # kept alive: kernels.get_kernel caches kernel objects by id(factory)


def recording_factory(edit: Optional[Callable[[str, str, str], Tuple[str, str]]] = None) -> type:
    """A HostCudaKernel factory whose kernels are built from edit(name, header, body)."""
    if edit is None:
        return HostCudaKernel
    cls = type("MutatedHostCudaKernel", (HostCudaKernel,), {"edit": staticmethod(edit)})
    _mutants.append(cls)
    return cls
