"""Compile rendered Metal kernels as C++ with g++ (cached), with a CPU entry per kernel.

The prelude defines the Metal address spaces away and includes the stub <metal_stdlib> of
this directory; each kernel gets an `extern "C"` entry that walks the grid one threadgroup
at a time, like `dispatch_threads`. A kernel that uses threadgroup memory, barriers or
simdgroup functions is *cooperative*: its entry runs the threads of each threadgroup as
fibers that meet at barriers and simdgroup collectives (tests/gpu_threads/gpu_threads.h),
and its `threadgroup` array declarations become function-local statics (one threadgroup
runs at a time, so those are the threadgroup's memory).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from .render import RenderedKernel

__all__ = ["CXX", "ShimCompileError", "compile_sources", "have_compiler", "is_cooperative", "lookup"]

SHIM_DIR = Path(__file__).resolve().parent
THREADS_DIR = SHIM_DIR.parent / "gpu_threads"
CXX = os.environ.get("MLX_FUSION_SHIM_CXX", "g++")
CXXFLAGS = ["-std=c++17", "-O1", "-shared", "-fPIC", "-x", "c++", "-Wno-attributes", f"-I{SHIM_DIR}",
            f"-I{THREADS_DIR}"]
CACHE_DIR = Path(tempfile.gettempdir()) / "mlx_fusion_metal_shim"

# Sources naming these need the threads of a threadgroup to meet.
_COOPERATIVE = re.compile(r"\b(threadgroup_barrier|simdgroup_barrier|simd_\w+|quad_\w+|threadgroup)\b")
# `threadgroup float buf[32];` (a declaration, not a pointer): threadgroup memory.
_THREADGROUP_ARRAY = re.compile(r"(^|[;{}])(\s*)threadgroup(\s+[\w:<>, ]+?\s+\w+\s*\[)", re.M)


def is_cooperative(source: str) -> bool:
    return _COOPERATIVE.search(source) is not None


class ShimCompileError(RuntimeError):
    """g++ rejected a rendered kernel; the message holds the compiler's errors."""


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

# The grid, as `dispatch_threads` runs it: threadgroups in order, the edge ones smaller.
_ENTRY = """
extern "C" const char* shim_entry_{name}(void* const* b, const unsigned* grid, const unsigned* tg_req) {{
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
    const uint3 threads_per_threadgroup(metal::min(D.x, grid[0] - gx * D.x), metal::min(D.y, grid[1] - gy * D.y),
                                        metal::min(D.z, grid[2] - gz * D.z));
    const uint3 T = threads_per_threadgroup;
    const uint simdgroups_per_threadgroup = (T.x * T.y * T.z + 31) / 32;
    const uint quadgroups_per_threadgroup = (T.x * T.y * T.z + 3) / 4;
    auto run_thread = [&](uint tid) {{
      const uint lx = tid % T.x, ly = (tid / T.x) % T.y, lz = tid / (T.x * T.y);
      const uint3 thread_position_in_threadgroup(lx, ly, lz);
      const uint3 thread_position_in_grid(gx * D.x + lx, gy * D.y + ly, gz * D.z + lz);
      const uint thread_index_in_threadgroup = tid;
      const uint thread_index_in_simdgroup = thread_index_in_threadgroup % 32;
      const uint simdgroup_index_in_threadgroup = thread_index_in_threadgroup / 32;
      const uint thread_index_in_quadgroup = thread_index_in_threadgroup % 4;
      const uint quadgroup_index_in_threadgroup = thread_index_in_threadgroup / 4;
      {call}({args});
    }};
{run}
  }}
  return nullptr;
}}
"""
# One thread after another, or (cooperative kernels) the threadgroup's threads as fibers.
_RUN_SEQUENTIAL = "    for (uint tid = 0; tid < T.x * T.y * T.z; ++tid) run_thread(tid);"
_RUN_COOPERATIVE = """\
    const char* err = gpu_threads::run_block(T.x * T.y * T.z, run_thread);
    if (err != nullptr) return err;"""


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
    run = _RUN_COOPERATIVE if is_cooperative(r.body) else _RUN_SEQUENTIAL
    return _ENTRY.format(name=r.kernel_name, call=r.call_name, args=", ".join(args), run=run)


def _cpu_body(body: str) -> str:
    """The body as compiled for the CPU: threadgroup arrays become statics (shared by the
    threadgroup's fibers; one threadgroup runs at a time). Lines are kept."""
    return _THREADGROUP_ARRAY.sub(r"\1\2static\3", body)


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
                  f'#line 1 "{label}.body"\n', _cpu_body(k.body), "\n}\n",
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
        _stub_digest = _digest((SHIM_DIR / "metal_stdlib").read_text() + (THREADS_DIR / "gpu_threads.h").read_text()
                               + " ".join([CXX] + CXXFLAGS))
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


def lookup(r: RenderedKernel) -> Optional[Path]:
    idx = _index_file(r)
    if idx.exists():
        lib = CACHE_DIR / idx.read_text().strip()
        if lib.exists():
            return lib
    return None
