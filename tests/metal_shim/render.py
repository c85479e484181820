"""Render `mx.fast.metal_kernel` sources exactly as MLX does (no compiler involved).

A Python port of how MLX 0.32 turns a metal_kernel body into a full Metal source:
`write_signature`, `write_template`, `make_template_hash` and the kernel naming in
mlx/backend/common/metal_kernel.cpp (mirror: /work/.mirror/ml-explore+mlx/repo), with the
buffer order of CustomKernel::eval_gpu in mlx/backend/metal/custom_kernel.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import mlx.core as mx
import numpy as np

__all__ = ["InputMeta", "RenderedKernel", "render", "render_metal_kernel", "type_string", "METAL_ATTRIBUTES"]

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
def type_string(dtype) -> str:
    try:
        return _TYPES[dtype][0]
    except KeyError:
        raise ValueError(f"[metal_shim] unsupported dtype {dtype}") from None


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
