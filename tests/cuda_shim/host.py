"""Execute the CUDA kernel twins on the CPU: g++ compiles a rendered kernel as host C++.

The kernel text is exactly what `render_cuda_kernel` (the port of MLX's build_kernel)
produces, except that PRELUDE's device include is replaced by `host/cuda_host.h`: CUDA
keywords defined away, `blockIdx`/`threadIdx`/`blockDim`/`gridDim` as globals, `uint4`,
the bit casts, and 16-bit `__half`/`__nv_bfloat16` structs with round-to-nearest-even
conversions. For every kernel variant a generated `extern "C"` entry point builds the
Shape/Strides/ndim arguments from flat arrays and runs the kernel for every thread of
every block sequentially, with MLX's CUDA launch geometry (`grid` is the total thread
count: ceil(grid/threadgroup) blocks of min(threadgroup, grid) threads).

A body that uses block-level CUDA (`__syncthreads`, `__shared__`, warp shuffles, the
`mma.sync` of `FusionMma`) is *cooperative*: its entry runs the threads of each block as
fibers (tests/gpu_threads/gpu_threads.h) that meet at barriers and warp collectives, and
`mma.sync` has a host implementation with the PTX fragment layout (cuda_host.h). A block
that breaks a collective's rules (a deadlock, lanes in different collectives) raises
`HostLaunchError`.

Arrays are numpy arrays (any strided view: broadcast views with stride 0, transposes,
negative strides, offset slices); bfloat16 data is carried as uint16 bit patterns (see
`to_bf16` / `from_bf16`). Strides are passed in elements, as MLX does.

Compiled libraries are cached by a hash of their text (and the flags) under
tempfile.gettempdir()/mlx_fusion_cuda_host.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from . import PRELUDE, render_cuda_kernel

HOST_DIR = Path(__file__).resolve().parent / "host"
THREADS_DIR = Path(__file__).resolve().parent.parent / "gpu_threads"
CXX = os.environ.get("MLX_FUSION_SHIM_CXX", "g++")
CXXFLAGS = ["-std=c++17", "-O1", "-shared", "-fPIC", "-fno-strict-aliasing", "-x", "c++",
            "-Wno-unknown-pragmas", "-Wno-attributes", f"-I{HOST_DIR}", f"-I{THREADS_DIR}"]
CACHE_DIR = Path(tempfile.gettempdir()) / "mlx_fusion_cuda_host"
HOST_PRELUDE = '\n#include "cuda_host.h"\n\n'
MAX_NDIM = 10

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16,
          "int32": mx.int32}
NP_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16,
              "int32": np.int32}


class HostCompileError(AssertionError):
    pass


class HostLaunchError(RuntimeError):
    """A cooperative block broke the rules of a barrier or warp collective, or a kernel
    wrote outside an output."""


# Bodies naming these need the threads of a block to meet (see gpu_threads.h).
_COOPERATIVE = re.compile(r"__syncthreads|__shared__|__shfl_\w+|__syncwarp|\bFusionMma\b")


def is_cooperative(body: str) -> bool:
    return _COOPERATIVE.search(body) is not None


def have_compiler() -> bool:
    return shutil.which(CXX) is not None


# --- bfloat16 as uint16 bits ------------------------------------------------------

def to_bf16(x) -> np.ndarray:
    """float32 values -> bfloat16 bit patterns (uint16), rounded to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    return np.where(nan, np.uint16(0x7FC0), r).astype(np.uint16)


def from_bf16(bits) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def encode(x, dtype: str) -> np.ndarray:
    """float values -> the storage numpy array of `dtype` (rounded as the GPU would store them)."""
    if dtype == "bfloat16":
        return to_bf16(x)
    return np.asarray(x, dtype=np.float32).astype(NP_STORAGE[dtype])


def decode(x: np.ndarray, dtype: str) -> np.ndarray:
    """Storage array -> float32 values."""
    if dtype == "bfloat16":
        return from_bf16(x)
    return np.asarray(x).astype(np.float32)


def aligned_empty(shape, dtype: str, offset_elems: int = 0) -> np.ndarray:
    """A contiguous array whose data starts 16-byte aligned (plus `offset_elems` elements),
    like MLX's buffers (an offset mimics a view into the middle of a buffer)."""
    np_dt = np.dtype(NP_STORAGE[dtype])
    n = int(np.prod(shape)) if len(shape) else 1
    raw = np.empty((n + offset_elems) * np_dt.itemsize + 64, dtype=np.uint8)
    start = (-raw.ctypes.data) % 64 + offset_elems * np_dt.itemsize
    return raw[start:start + n * np_dt.itemsize].view(np_dt).reshape(shape)


# --- rendering ----------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """One instantiation of a kernel body: its C name and the dtypes of its arguments."""

    func_name: str
    input_names: Tuple[str, ...]
    input_dtypes: Tuple[str, ...]
    output_names: Tuple[str, ...]
    output_dtypes: Tuple[str, ...]
    template: Tuple[Tuple[str, object], ...]  # (name, dtype name / int / bool)


def _arg_flags(body: str, name: str) -> Tuple[bool, bool, bool]:
    # As MLX's build_kernel: shape/strides/ndim arguments for names the body mentions (ndim > 0).
    return (f"{name}_shape" in body, f"{name}_strides" in body, f"{name}_ndim" in body)


def _entry(body: str, v: Variant) -> str:
    """extern "C" const char* run_<func>(void** bufs, const int32_t* shapes, const int64_t* strides,
    const int32_t* ndims, unsigned grid_x, unsigned block_x): nullptr, or what went wrong."""
    from . import CUDA_TYPES

    ctype = lambda d: CUDA_TYPES[DTYPES[d]]
    lines = [f'extern "C" const char* run_{v.func_name}(void** bufs, const int32_t* shapes, '
             "const int64_t* strides, const int32_t* ndims, unsigned grid_x, unsigned block_x) {"]
    args = []
    for i, (name, dt) in enumerate(zip(v.input_names, v.input_dtypes)):
        has_shape, has_strides, has_ndim = _arg_flags(body, name)
        args.append(f"static_cast<const {ctype(dt)}*>(bufs[{i}])")
        if has_shape:
            lines.append(f"  mlx::core::cu::Shape {name}_shape{{}};")
            lines.append(f"  for (int d = 0; d < {MAX_NDIM}; d++) {name}_shape[d] = shapes[{i * MAX_NDIM} + d];")
            args.append(f"{name}_shape")
        if has_strides:
            lines.append(f"  mlx::core::cu::Strides {name}_strides{{}};")
            lines.append(f"  for (int d = 0; d < {MAX_NDIM}; d++) {name}_strides[d] = strides[{i * MAX_NDIM} + d];")
            args.append(f"{name}_strides")
        if has_ndim:
            args.append(f"ndims[{i}]")
    nin = len(v.input_names)
    for j, dt in enumerate(v.output_dtypes):
        args.append(f"static_cast<{ctype(dt)}*>(bufs[{nin + j}])")
    call = f"mlx::core::cu::{v.func_name}({', '.join(args)});"
    lines += ["  gridDim = dim3{grid_x, 1, 1};",
              "  blockDim = dim3{block_x, 1, 1};",
              "  for (unsigned bx = 0; bx < grid_x; bx++) {",
              "    blockIdx = dim3{bx, 0, 0};"]
    if is_cooperative(body):  # the block's threads as fibers, meeting at collectives
        lines += ["    const char* err = gpu_threads::run_block(",
                  f"        block_x, [&](unsigned) {{ {call} }}, fusion_host_set_thread);",
                  "    if (err != nullptr) return err;"]
    else:  # one thread after another
        lines += ["    for (unsigned tx = 0; tx < block_x; tx++) {",
                  "      threadIdx = dim3{tx, 0, 0};",
                  f"      {call}",
                  "    }"]
    lines += ["  }", "  return nullptr;", "}"]
    return "\n".join(lines) + "\n"


def render_unit(header: str, body: str, variants: Sequence[Variant]) -> str:
    """One translation unit: host prelude, the shared header once, every variant's kernel
    (rendered as MLX renders it, header="") and its entry point."""
    text = HOST_PRELUDE + header
    for v in variants:
        text += render_cuda_kernel(
            v.func_name, "", body, v.input_names, [DTYPES[d] for d in v.input_dtypes],
            [1] * len(v.input_names), v.output_names, [DTYPES[d] for d in v.output_dtypes],
            [(n, DTYPES[d] if isinstance(d, str) else d) for n, d in v.template])
        text += _entry(body, v)
    return text


# --- compiling and loading -------------------------------------------------------------

_loaded: Dict[str, ctypes.CDLL] = {}


def compile_unit(text: str) -> Path:
    """Build `text` into a shared library (cached by hash); return its path."""
    header_text = (HOST_DIR / "cuda_host.h").read_text() + (THREADS_DIR / "gpu_threads.h").read_text()
    key = hashlib.sha256("\0".join([text, header_text, CXX, *CXXFLAGS]).encode()).hexdigest()[:20]
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    so = CACHE_DIR / f"{key}.so"
    if so.exists():
        return so
    tag = f"{key}.{os.getpid()}.{id(text)}"
    src = CACHE_DIR / f"{tag}.cu.cpp"
    tmp = CACHE_DIR / f"{tag}.so.tmp"
    src.write_text(text)
    try:
        proc = subprocess.run([CXX, *CXXFLAGS, "-o", str(tmp), str(src)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise HostCompileError(f"{CXX} failed on {src}:\n" + proc.stderr[-8000:])
        os.replace(tmp, so)
    finally:
        if so.exists():
            src.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return so


def load(text: str) -> ctypes.CDLL:
    so = compile_unit(text)
    lib = _loaded.get(str(so))
    if lib is None:
        lib = ctypes.CDLL(str(so))
        _loaded[str(so)] = lib
    return lib


# --- running -----------------------------------------------------------------------

def launch_dims(grid: int, threadgroup: int = 256) -> Tuple[int, int]:
    """(blocks, threads per block) as MLX's CUDA CustomKernel::eval_gpu computes them."""
    block = min(threadgroup, grid)
    return (grid + threadgroup - 1) // threadgroup, block


def run_variant(lib: ctypes.CDLL, v: Variant, inputs: Sequence[np.ndarray],
                outputs: Sequence[np.ndarray], grid: int, threadgroup: int = 256) -> None:
    """Run variant `v` over numpy inputs (any strides) writing into numpy outputs (contiguous)."""
    assert len(inputs) == len(v.input_names) and len(outputs) == len(v.output_names)
    n_in = len(inputs)
    shapes = np.zeros(n_in * MAX_NDIM, dtype=np.int32)
    strides = np.zeros(n_in * MAX_NDIM, dtype=np.int64)
    ndims = np.zeros(max(n_in, 1), dtype=np.int32)
    ptrs = (ctypes.c_void_p * (n_in + len(outputs)))()
    for i, (x, dt) in enumerate(zip(inputs, v.input_dtypes)):
        want = np.dtype(NP_STORAGE[dt])
        if x.dtype != want:
            raise TypeError(f"input {v.input_names[i]}: {x.dtype}, expected {want} for {dt}")
        if x.ndim > MAX_NDIM:
            raise ValueError("too many dimensions")
        shapes[i * MAX_NDIM:i * MAX_NDIM + x.ndim] = x.shape
        strides[i * MAX_NDIM:i * MAX_NDIM + x.ndim] = [s // x.itemsize for s in x.strides]
        ndims[i] = x.ndim
        ptrs[i] = x.ctypes.data
    for j, (y, dt) in enumerate(zip(outputs, v.output_dtypes)):
        if y.dtype != np.dtype(NP_STORAGE[dt]) or not y.flags.c_contiguous or not y.flags.writeable:
            raise TypeError(f"output {v.output_names[j]} must be a writable contiguous {dt} array")
        ptrs[n_in + j] = y.ctypes.data
    blocks, block = launch_dims(int(grid), int(threadgroup))
    fn = getattr(lib, f"run_{v.func_name}")
    fn.restype = ctypes.c_char_p
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_uint, ctypes.c_uint]
    err = fn(ctypes.cast(ptrs, ctypes.c_void_p), shapes.ctypes.data, strides.ctypes.data,
             ndims.ctypes.data, blocks, block)
    if err is not None:
        raise HostLaunchError(f"{v.func_name}: {err.decode()}")


_GUARD = 256  # canary bytes on either side of every output
_CANARY = 0xA5


def guarded_empty(shape, dtype: str):
    """(raw buffer, 16-byte aligned output view inside it): writes past either end of the
    view change the canary bytes around it."""
    np_dt = np.dtype(NP_STORAGE[dtype])
    nbytes = (int(np.prod(shape)) if len(shape) else 1) * np_dt.itemsize
    raw = np.full(2 * _GUARD + nbytes + 64, _CANARY, dtype=np.uint8)
    start = (-(raw.ctypes.data + _GUARD)) % 64 + _GUARD
    return raw, raw[start:start + nbytes].view(np_dt).reshape(shape), start


def check_guards(name, raw, start, nbytes):
    if (raw[:start] != _CANARY).any() or (raw[start + nbytes:] != _CANARY).any():
        raise HostLaunchError(f"{name} wrote outside an output")


class HostKernel:
    """The variants of one kernel body, compiled together in one unit: template T for each
    dtype, times each of `templates` (extra (name, int/bool) lists, e.g. linear_activation's
    MT/NT/HAS_BIAS)."""

    def __init__(self, name: str, header: str, body: str, input_names, output_names,
                 dtypes: Sequence[str] = ("float32", "float16", "bfloat16"), templates=((),)):
        self.name = name
        self.variants: Dict[tuple, Variant] = {}
        for dt in dtypes:
            in_dt = tuple("float32" if n == "p" else "int32" if n == "m" else dt for n in input_names)
            for extra in templates:
                extra = tuple(extra)
                suffix = "".join(f"_{n}{int(v)}" for n, v in extra)
                self.variants[(dt, extra)] = Variant(
                    f"{name}_{dt}{suffix}", tuple(input_names), in_dt, tuple(output_names),
                    tuple(dt for _ in output_names), (("T", dt),) + extra)
        self.text = render_unit(header, body, list(self.variants.values()))
        self._lib: Optional[ctypes.CDLL] = None

    def build(self) -> "HostKernel":
        if self._lib is None:
            self._lib = load(self.text)
        return self

    def __call__(self, dtype: str, inputs, output_shapes, grid: int, threadgroup: int = 256,
                 fill=np.nan, template=()) -> List[np.ndarray]:
        """Run the (`dtype`, `template`) variant; outputs (16-byte aligned, prefilled with
        `fill` so that unwritten elements show, canaries around them so that writes past
        them raise) come back in their storage dtype."""
        self.build()
        v = self.variants[(dtype, tuple(template))]
        raws, outs = [], []
        for shape in output_shapes:
            raw, y, start = guarded_empty(tuple(shape), dtype)
            y[...] = encode(np.full(tuple(shape), fill, dtype=np.float32), dtype)
            raws.append((raw, start, y.nbytes))
            outs.append(y)
        run_variant(self._lib, v, inputs, outs, grid, threadgroup)
        for raw, start, nbytes in raws:
            check_guards(v.func_name, raw, start, nbytes)
        return outs


def spec_templates(spec) -> Tuple[Tuple[Tuple[str, object], ...], ...]:
    """Every combination of a KernelSpec's non-dtype template arguments."""
    import itertools

    names = [n for n, _ in spec.templates]
    return tuple(tuple(zip(names, values)) for values in itertools.product(*(v for _, v in spec.templates)))


def kernel_from_sources(name: str, header: Optional[str] = None, body: Optional[str] = None,
                        **kw) -> HostKernel:
    """HostKernel for a kernel of mlx_fusion.kernels.KERNEL_SPECS (every dtype and template
    value the spec lists), from its sources or from a given (mutated) header/body."""
    from mlx_fusion.kernels import KERNEL_SPECS, kernel_source

    spec = KERNEL_SPECS[name]
    src_header, src_body = kernel_source(name, "cuda")
    kw.setdefault("dtypes", tuple(spec.dtypes))
    kw.setdefault("templates", spec_templates(spec))
    return HostKernel(name, src_header if header is None else header, src_body if body is None else body,
                      spec.input_names, spec.output_names, **kw)
