"""`ShimMetalKernel`: a stand-in for `mx.fast.metal_kernel` that runs the source on the CPU.

A call renders the source as MLX would (render.py), builds it (compile.py: cached by a hash
of the text) and runs it on numpy buffers. Inputs are passed as MLX passes them: the array's
own strides (numpy reads them through the buffer protocol, zero-copy: a transposed mx.array
arrives with swapped strides, a broadcast one with 0 strides, a reversed slice with negative
strides), or a row-contiguous copy when `ensure_row_contiguous` is set and the array is not
row-contiguous.
"""

from __future__ import annotations

import ctypes
import itertools
from pathlib import Path
from typing import Dict, Sequence

import mlx.core as mx
import numpy as np

from .compile import compile_sources, lookup
from .render import _TYPES, InputMeta, RenderedKernel, render

__all__ = ["ShimMetalKernel", "ShimLaunchError"]


class ShimLaunchError(RuntimeError):
    """A kernel wrote outside an output, or a threadgroup broke a barrier's or simdgroup
    collective's rules (a deadlock, lanes in different collectives)."""


def _to_numpy(x: mx.array) -> np.ndarray:
    """Zero-copy numpy view with the array's real strides (bfloat16 through a uint16 view)."""
    if x.dtype == mx.bfloat16:
        x = x.view(mx.uint16)
    return np.array(x, copy=False)


def _from_numpy(a: np.ndarray, dtype) -> mx.array:
    out = mx.array(a)
    return out.view(mx.bfloat16) if dtype == mx.bfloat16 else out


def _fill_value(value: float, dtype):
    if dtype == mx.bfloat16:
        return np.array(mx.array(value, mx.bfloat16).view(mx.uint16))
    return np.array(value).astype(_TYPES[dtype][1])


_GUARD = 1024  # bytes of canary around each output buffer
_CANARY = 0xA5


def _guarded_output(shape, dtype, init_value):
    """(buffer with canaries, output view): writes past either end are caught after the call."""
    np_dtype = np.dtype(_TYPES[dtype][1])
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.full(2 * _GUARD + n * np_dtype.itemsize, _CANARY, dtype=np.uint8)
    view = raw[_GUARD:_GUARD + n * np_dtype.itemsize].view(np_dtype).reshape(tuple(shape))
    if init_value is not None:
        view[...] = _fill_value(init_value, dtype)
    return raw, view


def _check_guards(kernel_name, raws, names):
    for raw, name in zip(raws, names):
        if (raw[:_GUARD] != _CANARY).any() or (raw[-_GUARD:] != _CANARY).any():
            raise ShimLaunchError(f"[metal_shim] {kernel_name} wrote outside output `{name}`")


_libs: Dict[Path, ctypes.CDLL] = {}


class ShimMetalKernel:
    """Stand-in for `mx.fast.metal_kernel` that runs the Metal source on the CPU (eagerly).

    `speculate` (class or instance attribute): {template name: values}. On a cache miss, the
    call is also rendered for every combination of these values (for template args the call
    has) and all of them are compiled in one g++ run, so sweeping e.g. OP x ACT costs one
    compile instead of sixteen.
    """

    speculate: Dict[str, Sequence] = {}

    def __init__(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True,
                 atomic_outputs=False):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous
        self.atomic_outputs = atomic_outputs
        self._entries: Dict[str, ctypes._CFuncPtr] = {}

    # -- building
    def _render(self, metas, output_dtypes, template) -> RenderedKernel:
        return render(self.name, self.input_names, self.output_names, self.source, self.header, metas,
                      output_dtypes, template, self.atomic_outputs)

    def _entry_for(self, metas, output_dtypes, template):
        r = self._render(metas, output_dtypes, template)
        fn = self._entries.get(r.source)
        if fn is not None:
            return r, fn
        variants = [r]
        lib_path = lookup(r)
        if lib_path is None:
            axes = [(i, list(self.speculate[n])) for i, (n, _) in enumerate(template or [])
                    if n in self.speculate]
            for combo in itertools.product(*[vals for _, vals in axes]):
                t = list(template or [])
                for (i, _), v in zip(axes, combo):
                    t[i] = (t[i][0], v)
                v = self._render(metas, output_dtypes, t)
                if v.kernel_name != r.kernel_name:
                    variants.append(v)
            lib_path = compile_sources(variants, self.name)
        lib = _libs.get(lib_path) or _libs.setdefault(lib_path, ctypes.CDLL(str(lib_path)))
        for v in variants:
            f = getattr(lib, f"shim_entry_{v.kernel_name}")
            f.restype = ctypes.c_char_p
            f.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_uint),
                          ctypes.POINTER(ctypes.c_uint)]
            self._entries[v.source] = f
        return r, self._entries[r.source]

    # -- calling, like MLX's kernel objects
    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 init_value=None, verbose=False, stream=None):
        if len(inputs) != len(self.input_names):
            raise ValueError(f"[metal_kernel] Expected `inputs` to have size {len(self.input_names)} "
                             f"but got size {len(inputs)}.")
        if len(output_shapes) != len(self.output_names) or len(output_dtypes) != len(self.output_names):
            raise ValueError("[metal_kernel] output_shapes/output_dtypes must match output_names")
        arrays = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]  # as MLX's to_array
        mx.eval(arrays)
        r, entry = self._entry_for(arrays, list(output_dtypes), template)
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{r.source}\n```")
        np_inputs = []
        for x in arrays:
            a = _to_numpy(x)  # the array's own strides
            if self.ensure_row_contiguous and not a.flags.c_contiguous:
                a = np.ascontiguousarray(a)  # MLX: copy_gpu(..., CopyType::General)
            np_inputs.append(a)
        outs = self._launch(r, entry, np_inputs, output_shapes, output_dtypes, grid, threadgroup, init_value)
        return [_from_numpy(o, d) for o, d in zip(outs, output_dtypes)]

    def run_numpy(self, inputs: Sequence[np.ndarray], input_dtypes, output_shapes, output_dtypes, grid,
                  threadgroup, template=None, init_value=0):
        """Run on numpy arrays with *their* strides (transposed views, stride-0 broadcasts, negative
        strides), whatever ensure_row_contiguous says: for testing strided code paths directly.
        bfloat16 arrays are passed and returned as uint16 bit patterns."""
        metas = [InputMeta(d, a.shape) for a, d in zip(inputs, input_dtypes)]
        r, entry = self._entry_for(metas, list(output_dtypes), template)
        return self._launch(r, entry, list(inputs), output_shapes, output_dtypes, grid, threadgroup, init_value)

    def _launch(self, r, entry, np_inputs, output_shapes, output_dtypes, grid, threadgroup, init_value):
        if int(np.prod(threadgroup)) > 1024:
            raise ValueError(f"Thread group size ({int(np.prod(threadgroup))}) is greater than the maximum "
                             "allowed threads per threadgroup (1024).")
        # Buffer order of CustomKernel::eval_gpu: per input data, [shape], [strides], [ndim]; outputs.
        keep, ptrs = [], []
        for a, n in zip(np_inputs, self.input_names):
            ptrs.append(a.ctypes.data)
            if a.ndim > 0:
                extra = {"_shape": np.array(a.shape, np.int32),
                         "_strides": np.array([st // a.itemsize for st in a.strides], np.int64),
                         "_ndim": np.array(a.ndim, np.int32)}
                for suffix, buf in extra.items():
                    if n + suffix in self.source:
                        keep.append(buf)
                        ptrs.append(buf.ctypes.data)
        raws, outs = zip(*[_guarded_output(s, d, init_value) for s, d in zip(output_shapes, output_dtypes)])
        ptrs += [o.ctypes.data for o in outs]
        if all(g > 0 for g in grid):
            err = entry((ctypes.c_void_p * len(ptrs))(*ptrs), (ctypes.c_uint * 3)(*grid),
                        (ctypes.c_uint * 3)(*threadgroup))
            if err is not None:
                raise ShimLaunchError(f"[metal_shim] {r.kernel_name}: {err.decode()}")
            _check_guards(r.kernel_name, raws, self.output_names)
        return list(outs)
