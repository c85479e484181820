"""The CUDA twins compile (nvcc, sm_90) in the exact form MLX's cuda_kernel
generates. Running them needs a GPU: see docs/testing.md for the H100 runs."""

import mlx.core as mx
import pytest

from mlx_fusion.kernels import KERNEL_SPECS, kernel_source
from tests.cuda_shim import PRELUDE, compile_cuda, nvcc, render_cuda_kernel

pytestmark = pytest.mark.skipif(nvcc() is None, reason="nvcc is not on PATH")

@pytest.mark.parametrize("name", sorted(KERNEL_SPECS))
def test_cuda_kernel_compiles(name):
    spec = KERNEL_SPECS[name]
    header, body = kernel_source(name, "cuda")
    units = [PRELUDE + header]
    for i, template in enumerate(spec.instantiations()):
        dt = template[0][1]
        in_dtypes = [mx.float32 if n == "p" else mx.int32 if n == "m" else dt for n in spec.input_names]
        units.append(render_cuda_kernel(
            f"k{i}", "", body, spec.input_names, in_dtypes, [1] * len(in_dtypes),
            spec.output_names, [dt] * len(spec.output_names), template))
    compile_cuda(units)


def test_cuda_compile_error_is_reported():
    header, _ = kernel_source("binary_activation", "cuda")
    bad = render_cuda_kernel("bad", "", "out[0] = undeclared_name;", ["a"], [mx.float32], [1],
                             ["out"], [mx.float32], [])
    with pytest.raises(AssertionError, match="undeclared_name"):
        compile_cuda([PRELUDE + header, bad])
