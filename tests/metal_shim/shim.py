"""Run `mx.fast.metal_kernel` sources on the CPU: render them as MLX does, compile with g++.

Two parts:

* `render_metal_kernel` is a Python port of how MLX 0.32 turns a metal_kernel body into a
  full Metal source: `write_signature`, `write_template`, `make_template_hash` and the kernel
  naming in mlx/backend/common/metal_kernel.cpp (mirror: /work/.mirror/ml-explore+mlx/repo),
  with the buffer order of CustomKernel::eval_gpu in mlx/backend/metal/custom_kernel.cpp.
* `ShimMetalKernel` has the keyword signature of `mx.fast.metal_kernel` and returns a callable
  like MLX's. A call renders the source, wraps it for g++ (Metal keywords defined away, a stub
  <metal_stdlib> from this directory, an `extern "C"` entry that runs the kernel for every
  thread of the grid in threadgroup-sized blocks, like `dispatch_threads`), builds a shared
  library (cached by a hash of its text), and runs it on numpy buffers.

Inputs are passed as MLX passes them: the array's own strides (numpy reads them through the
buffer protocol, zero-copy: a transposed mx.array arrives with swapped strides, a broadcast one
with 0 strides, a reversed slice with negative strides), or a row-contiguous copy when
`ensure_row_contiguous` is set and the array is not row-contiguous.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

__all__ = [
    "InputMeta",
    "RenderedKernel",
    "render",
    "ShimMetalKernel",
    "ShimCompileError",
    "render_metal_kernel",
    "compile_sources",
    "have_compiler",
    "CXX",
]

SHIM_DIR = Path(__file__).resolve().parent
CXX = os.environ.get("MLX_FUSION_SHIM_CXX", "g++")
CXXFLAGS = ["-std=c++17", "-O1", "-shared", "-fPIC", "-x", "c++", "-Wno-attributes", f"-I{SHIM_DIR}"]
CACHE_DIR = Path(tempfile.gettempdir()) / "mlx_fusion_metal_shim"

MAX_CONSTANT_ARRAY_SIZE = 8  # inputs with fewer elements go to the `constant` address space

# MLX's list, in MLX's order: an attribute is added when its name appears in the source.
METAL_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]

# get_type_string in mlx/backend/common/compiled.cpp; numpy dtype that holds the same bits.
_TYPES = {
    mx.float32: ("float", np.float32),
    mx.float16: ("float16_t", np.float16),
    mx.bfloat16: ("bfloat16_t", np.uint16),
    mx.bool_: ("bool", np.bool_),
    mx.int8: ("int8_t", np.int8),
    mx.int16: ("int16_t", np.int16),
    mx.int32: ("int32_t", np.int32),
    mx.int64: ("int64_t", np.int64),
    mx.uint8: ("uint8_t", np.uint8),
    mx.uint16: ("uint16_t", np.uint16),
    mx.uint32: ("uint32_t", np.uint32),
    mx.uint64: ("uint64_t", np.uint64),
}

# Sources that name these cannot be executed faithfully by a sequential CPU loop.
_NOT_EXECUTABLE = re.compile(r"\b(threadgroup_barrier|simdgroup_barrier|simd_\w+|quad_\w+|threadgroup)\b")


def type_string(dtype) -> str:
    try:
        return _TYPES[dtype][0]
    except KeyError:
        raise ValueError(f"[metal_shim] unsupported dtype {dtype}") from None


class ShimCompileError(RuntimeError):
    """g++ rejected a rendered kernel; the message holds the compiler's errors."""


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class InputMeta:
    dtype: mx.Dtype
    shape: Tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def _meta(x) -> InputMeta:
    if isinstance(x, InputMeta):
        return x
    if isinstance(x, tuple) and len(x) == 2:
        return InputMeta(x[0], tuple(x[1]))
    return InputMeta(x.dtype, tuple(x.shape))


def _template_value(v) -> str:
    # Python's bool is an int: MLX (python/src/fast.cpp) checks bool first; C++ prints it 1/0.
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, mx.Dtype):
        return type_string(v)
    raise ValueError("[metal_kernel] Invalid template argument. Must be `mlx.core.Dtype`, `int` or `bool`.")


def _template_param(v) -> str:
    return "bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "typename"


@dataclass(frozen=True)
class RenderedKernel:
    """A kernel as MLX would compile it, plus what the CPU wrapper needs."""

    kernel_name: str
    header: str
    signature: str  # from `template <...>` to the opening brace, as MLX writes it
    body: str
    instantiation: str  # the explicit instantiation line ('' without template args)
    call_name: str  # kernel_name or kernel_name<args>
    params: Tuple[Tuple[str, str], ...]  # (kind, c type) per buffer index
    attributes: Tuple[str, ...]

    @property
    def source(self) -> str:
        """The full source MLX hands to the Metal compiler (minus its metal::utils() prefix)."""
        return self.header + self.signature + self.body + "\n}\n" + self.instantiation


def render(name, input_names, output_names, source, header, inputs_meta, output_dtypes, template=None,
           atomic_outputs=False) -> RenderedKernel:
    """Port of mlx::core::fast::metal_kernel's naming + write_signature + instantiation."""
    metas = [_meta(x) for x in inputs_meta]
    if len(metas) != len(input_names):
        raise ValueError(f"[metal_kernel] Expected `inputs` to have size {len(input_names)} but got size {len(metas)}.")
    if len(output_dtypes) != len(output_names):
        raise ValueError(f"[metal_kernel] Expected `output_dtypes` to have size {len(output_names)}.")
    template = list(template or [])
    shape_infos = [tuple(f"{n}{suffix}" in source for suffix in ("_shape", "_strides", "_ndim")) for n in input_names]
    attributes = tuple(f"  {ty} {attr} [[{attr}]]" for attr, ty in METAL_ATTRIBUTES if attr in source)

    kernel_name = "custom_kernel_" + name
    template_def = ""
    if template:
        template_def = "<" + ", ".join(_template_value(v) for _, v in template) + ">"
        # make_template_hash: '<' and '>' -> '_', ", " -> '_', last char dropped
        kernel_name += "_" + template_def.replace("<", "_").replace(">", "_").replace(", ", "_")[:-1]
    for m in metas:
        kernel_name += "_" + type_string(m.dtype)
        kernel_name += "s" if m.ndim == 0 else "c" if m.size < MAX_CONSTANT_ARRAY_SIZE else ""
    for d in output_dtypes:
        kernel_name += "_" + type_string(d)

    sig = ""
    if template:
        sig += "template <" + ", ".join(f"{_template_param(v)} {n}" for n, v in template) + ">\n"
    sig += f"[[kernel]] void {kernel_name}(\n"
    params = []
    for n, m, (has_shape, has_strides, has_ndim) in zip(input_names, metas, shape_infos):
        location = "constant" if m.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if m.ndim == 0 else "*"
        sig += f"  const {location} {type_string(m.dtype)}{ref} {n} [[buffer({len(params)})]],\n"
        params.append(("scalar" if m.ndim == 0 else "in", type_string(m.dtype)))
        if m.ndim > 0:
            if has_shape:
                sig += f"  const constant int* {n}_shape [[buffer({len(params)})]],\n"
                params.append(("shape", "int"))
            if has_strides:
                sig += f"  const constant int64_t* {n}_strides [[buffer({len(params)})]],\n"
                params.append(("strides", "int64_t"))
            if has_ndim:
                sig += f"  const constant int& {n}_ndim [[buffer({len(params)})]],\n"
                params.append(("ndim", "int"))
    for i, (n, d) in enumerate(zip(output_names, output_dtypes)):
        ty = f"atomic<{type_string(d)}>" if atomic_outputs else type_string(d)
        # MLX compares the running buffer index with len(inputs) + len(outputs) - 1 here
        # (a quirk when shape buffers were added; harmless when attributes follow).
        last = len(params) >= len(metas) + len(output_names) - 1 and not attributes
        sig += f"  device {ty}* {n} [[buffer({len(params)})]]" + (") {\n" if last else ",\n")
        params.append(("out", ty))
    if attributes:
        sig += ",\n".join(attributes) + ") {\n"

    instantiation = ""
    call_name = kernel_name
    if template:
        call_name = kernel_name + template_def
        instantiation = (f'\ntemplate [[host_name("{kernel_name}")]] [[kernel]] decltype({call_name}) '
                         f"{call_name};\n")
    return RenderedKernel(kernel_name, header, sig, source, instantiation, call_name, tuple(params),
                          tuple(a.split()[1] for a in attributes))


def render_metal_kernel(name, input_names, output_names, source, header, inputs_meta, output_dtypes,
                        template=None, atomic_outputs=False) -> Tuple[str, str]:
    """(kernel_name, full_source) exactly as MLX would generate them (without metal::utils()).

    inputs_meta: per input an mx.array, a numpy-like object with .dtype/.shape, or (dtype, shape).
    """
    r = render(name, input_names, output_names, source, header, inputs_meta, output_dtypes, template,
               atomic_outputs)
    return r.kernel_name, r.source


# ----------------------------------------------------------------------------- CPU wrapper

_PRELUDE = """\
#include <metal_stdlib>
// What the generated signature needs from MLX's metal::utils() (utils.h, bf16.h): nothing else.
typedef half float16_t;
typedef metal::bfloat bfloat16_t;
using metal::atomic;
// Metal address spaces and attributes mean nothing to the CPU.
#define device
#define constant
#define thread
#define threadgroup
"""

_ENTRY = """
extern "C" void shim_entry_{name}(void* const* b, const unsigned* grid, const unsigned* tg_req) {{
  const uint3 threads_per_grid(grid[0], grid[1], grid[2]);
  const uint3 grid_size = threads_per_grid, grid_origin(0u, 0u, 0u);
  const uint3 dispatch_threads_per_threadgroup(metal::min(tg_req[0], grid[0]), metal::min(tg_req[1], grid[1]),
                                               metal::min(tg_req[2], grid[2]));
  const uint3 D = dispatch_threads_per_threadgroup;
  const uint3 threadgroups_per_grid((grid[0] + D.x - 1) / D.x, (grid[1] + D.y - 1) / D.y, (grid[2] + D.z - 1) / D.z);
  const uint thread_execution_width = 32, threads_per_simdgroup = 32;
  const uint dispatch_simdgroups_per_threadgroup = (D.x * D.y * D.z + 31) / 32;
  const uint dispatch_quadgroups_per_threadgroup = (D.x * D.y * D.z + 3) / 4;
  for (uint gz = 0; gz < threadgroups_per_grid.z; ++gz)
  for (uint gy = 0; gy < threadgroups_per_grid.y; ++gy)
  for (uint gx = 0; gx < threadgroups_per_grid.x; ++gx) {{
    const uint3 threadgroup_position_in_grid(gx, gy, gz);
    // Non-uniform threadgroups (dispatch_threads): edge groups are smaller.
    const uint3 threads_per_threadgroup(metal::min(D.x, grid[0] - gx * D.x), metal::min(D.y, grid[1] - gy * D.y),
                                        metal::min(D.z, grid[2] - gz * D.z));
    const uint3 T = threads_per_threadgroup;
    const uint simdgroups_per_threadgroup = (T.x * T.y * T.z + 31) / 32;
    const uint quadgroups_per_threadgroup = (T.x * T.y * T.z + 3) / 4;
    for (uint lz = 0; lz < T.z; ++lz)
    for (uint ly = 0; ly < T.y; ++ly)
    for (uint lx = 0; lx < T.x; ++lx) {{
      const uint3 thread_position_in_threadgroup(lx, ly, lz);
      const uint3 thread_position_in_grid(gx * D.x + lx, gy * D.y + ly, gz * D.z + lz);
      const uint thread_index_in_threadgroup = lx + T.x * (ly + T.y * lz);
      const uint thread_index_in_simdgroup = thread_index_in_threadgroup % 32;
      const uint simdgroup_index_in_threadgroup = thread_index_in_threadgroup / 32;
      const uint thread_index_in_quadgroup = thread_index_in_threadgroup % 4;
      const uint quadgroup_index_in_threadgroup = thread_index_in_threadgroup / 4;
      {call}({args});
    }}
  }}
}}
"""


def _entry(r: RenderedKernel) -> str:
    args = []
    for i, (kind, ty) in enumerate(r.params):
        if kind in ("scalar", "ndim"):
            args.append(f"*(const {ty}*)b[{i}]")
        elif kind == "out":
            args.append(f"({ty}*)b[{i}]")
        else:
            args.append(f"(const {ty}*)b[{i}]")
    args += list(r.attributes)
    body = _ENTRY.format(name=r.kernel_name, call=r.call_name, args=", ".join(args))
    return body


def _translation_unit(kernels: Sequence[RenderedKernel], label: str) -> str:
    """One C++ file for kernels sharing a header: the header once, each kernel and its entry.

    `#line` markers make g++ report errors as `<label>.header:LINE` / `<kernel>.body:LINE`,
    i.e. lines of the header / body strings (= lines of common.metal / <name>.metal).
    """
    header = kernels[0].header
    assert all(k.header == header for k in kernels)
    parts = [_PRELUDE, f'#line 1 "{label}.header"\n', header, "\n"]
    for k in kernels:
        parts += [f'#line 1 "{k.kernel_name}.signature"\n', k.signature,
                  f'#line 1 "{label}.body"\n', k.body, "\n}\n",
                  f'#line 1 "{k.kernel_name}.instantiation"\n', k.instantiation,
                  f'#line 1 "{k.kernel_name}.shim_entry"\n', _entry(k)]
    return "".join(parts)


def have_compiler() -> bool:
    return shutil.which(CXX) is not None


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


_stub_digest: Optional[str] = None


def _build_key(tu: str) -> str:
    global _stub_digest
    if _stub_digest is None:
        _stub_digest = _digest((SHIM_DIR / "metal_stdlib").read_text() + " ".join([CXX] + CXXFLAGS))
    return _digest(_stub_digest + tu)


def _compile(tu: str) -> Path:
    """Compile a translation unit to a shared library, reusing a cached build of the same text."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    key = _build_key(tu)
    lib = CACHE_DIR / f"{key}.so"
    if lib.exists():
        return lib
    if not have_compiler():
        raise ShimCompileError(f"[metal_shim] no C++ compiler ({CXX}) on PATH")
    src = CACHE_DIR / f"{key}.cpp"
    fd, tmp_src = tempfile.mkstemp(dir=CACHE_DIR, prefix=f"{key}.", suffix=".cpp")
    with os.fdopen(fd, "w") as f:
        f.write(tu)
    os.replace(tmp_src, src)  # keep the source next to the library, for reading errors
    tmp_lib = CACHE_DIR / f"{key}.{os.getpid()}.tmp.so"
    proc = subprocess.run([CXX, *CXXFLAGS, str(src), "-o", str(tmp_lib)], capture_output=True, text=True,
                          env={**os.environ, "LC_ALL": "C"})  # ASCII quotes in messages
    if proc.returncode != 0:
        log = CACHE_DIR / f"{key}.log"
        log.write_text(proc.stderr)
        errors = [ln for ln in proc.stderr.splitlines()
                  if re.search(r": error:|: In (function|instantiation)|required from", ln)]
        raise ShimCompileError(f"[metal_shim] g++ rejected the kernel source {src} (full log: {log}):\n"
                               + "\n".join(errors[:30]))
    os.replace(tmp_lib, lib)  # atomic: concurrent workers never load a half-written library
    return lib


def _index_file(r: RenderedKernel) -> Path:
    return CACHE_DIR / "index" / _build_key(r.source + r.call_name)


def compile_sources(kernels: Sequence[RenderedKernel], label: str = "kernel") -> Path:
    """Compile several rendered kernels (same header) into ONE library and return its path.

    Each kernel is also recorded in an on-disk index (rendered source -> library), so a later
    call of the same kernel, in this process or another, loads it instead of compiling again.
    """
    lib = _compile(_translation_unit(kernels, label))
    (CACHE_DIR / "index").mkdir(exist_ok=True)
    for k in kernels:
        idx = _index_file(k)
        if not idx.exists():
            tmp = idx.with_name(f"{idx.name}.{os.getpid()}.tmp")
            tmp.write_text(lib.name)
            os.replace(tmp, idx)
    return lib


def _lookup(r: RenderedKernel) -> Optional[Path]:
    idx = _index_file(r)
    if idx.exists():
        lib = CACHE_DIR / idx.read_text().strip()
        if lib.exists():
            return lib
    return None


# ----------------------------------------------------------------------------- execution


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
            raise RuntimeError(f"[metal_shim] {kernel_name} wrote outside output `{name}`")


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
        lib_path = _lookup(r)
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
            f.restype = None
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
        if _NOT_EXECUTABLE.search(self.source):
            raise NotImplementedError(f"[metal_shim] {self.name}: threadgroup memory / simdgroup functions "
                                      "cannot be executed by the sequential CPU shim")
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
            entry((ctypes.c_void_p * len(ptrs))(*ptrs), (ctypes.c_uint * 3)(*grid),
                  (ctypes.c_uint * 3)(*threadgroup))
            _check_guards(r.kernel_name, raws, self.output_names)
        return list(outs)
