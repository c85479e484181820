"""Compile-only check of the CUDA twins with nvcc, without a GPU.

`render_cuda_kernel` is a port of `build_kernel` in MLX's
mlx/backend/cuda/custom_kernel.cpp (MLX 0.32): the same default header, the
same `__global__` signature (typed pointers; `__grid_constant__` Shape/Strides
and int ndim for names the body mentions) and template arguments turned into
`constexpr`/`using` lines at the top of the body.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx

HERE = Path(__file__).resolve().parent
CUDA_TYPES = {
    mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16",
    mx.int32: "int32_t", mx.uint32: "uint32_t", mx.int64: "int64_t", mx.bool_: "bool",
}


def nvcc() -> str | None:
    return shutil.which("nvcc")


PRELUDE = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'


def render_cuda_kernel(func_name, header, source, input_names, input_dtypes, input_ndims,
                       output_names, output_dtypes, template):
    """The text MLX compiles for one kernel call. Pass header="" (and prepend
    PRELUDE + header once) to put several kernels in one translation unit."""
    src = (PRELUDE + header) if header else ""
    src += "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    src += f"__global__ void {func_name}(\n"
    for name, dt, nd in zip(input_names, input_dtypes, input_ndims):
        src += f"    const {CUDA_TYPES[dt]}* {name},\n"
        if nd > 0:
            if f"{name}_shape" in source:
                src += f"    const __grid_constant__ Shape {name}_shape,\n"
            if f"{name}_strides" in source:
                src += f"    const __grid_constant__ Strides {name}_strides,\n"
            if f"{name}_ndim" in source:
                src += f"    const __grid_constant__ int {name}_ndim,\n"
    src += ",\n".join(f"    {CUDA_TYPES[dt]}* {n}" for n, dt in zip(output_names, output_dtypes)) + ") {\n"
    for name, arg in template:
        if isinstance(arg, bool):
            src += f"  constexpr bool {name} = {'true' if arg else 'false'};\n"
        elif isinstance(arg, int):
            src += f"  constexpr int {name} = {arg};\n"
        else:
            src += f"  using {name} = {CUDA_TYPES[arg]};\n"
    src += "\n" + source + "\n}\n\n} // namespace mlx::core::cu\n"
    return src


def compile_cuda(sources: list[str], arch: str = "sm_90") -> None:
    """Compile the given translation-unit texts together (one nvcc call); raise on error."""
    text = "\n".join(sources)
    key = hashlib.sha256((text + arch).encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / "mlx_fusion_cuda_check"
    cache.mkdir(exist_ok=True)
    done = cache / f"{key}.ok"
    if done.exists():
        return
    cu = cache / f"{key}.{os.getpid()}.cu"
    cu.write_text(text)
    proc = subprocess.run(
        [nvcc(), "-std=c++17", f"-arch={arch}", "-c", "-o", os.devnull, "-I", str(HERE), str(cu)],
        capture_output=True, text=True,
    )
    cu.unlink()
    if proc.returncode != 0:
        raise AssertionError("nvcc failed:\n" + proc.stderr[-6000:])
    done.touch()
