"""Block-level CUDA executed by the host shim (tests/gpu_threads/gpu_threads.h): shared
memory, barriers, warp shuffles and mma.sync m16n8k16, and the errors a GPU would hang on.
The same for the Metal shim: threadgroup memory, barriers and simd_* functions."""

from __future__ import annotations

import zlib

import mlx.core as mx
import numpy as np
import pytest

from mlx_fusion.kernels import kernel_source
from tests.cuda_shim.host import (
    CXX,
    HostKernel,
    HostLaunchError,
    Variant,
    aligned_empty,
    decode,
    encode,
    have_compiler,
    load,
    render_unit,
    run_variant,
)
from tests.metal_shim import ShimLaunchError, ShimMetalKernel

pytestmark = pytest.mark.skipif(not have_compiler(), reason=f"{CXX} is not on PATH")


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


COLLECTIVES = """
__shared__ float tile[64];
const int t = threadIdx.x;
tile[t] = float(x[blockIdx.x * blockDim.x + t]);
__syncthreads();
float v = tile[blockDim.x - 1 - t];  // another warp's element: needs the barrier
float s = v;
for (int d = 16; d > 0; d >>= 1) {
  s += __shfl_xor_sync(0xffffffffu, s, d);
}
const float down = __shfl_down_sync(0xffffffffu, v, 1);
out[blockIdx.x * blockDim.x + t] = static_cast<T>(v + 1000.0f * s + 1e6f * down);
"""


def test_block_collectives_execute():
    """__shared__ is the block's memory, __syncthreads orders it, shuffles move values
    between the lanes of a warp (a butterfly sum, a shift down with the top lane kept)."""
    k = HostKernel("collectives", "", COLLECTIVES, ("x",), ("out",), dtypes=("float32",))
    x = np.arange(128, dtype=np.float32)
    (out,) = k("float32", [x], [(128,)], 128, 64)
    want = np.empty(128)
    for b in range(2):
        v = x[64 * b:64 * b + 64][::-1]
        for t in range(64):
            warp = v[32 * (t // 32):32 * (t // 32) + 32]
            down = warp[t % 32 + 1] if t % 32 < 31 else v[t]
            want[64 * b + t] = v[t] + 1000.0 * warp.sum() + 1e6 * down
    np.testing.assert_allclose(out, want, rtol=1e-6)


MMA_TEST = """
// A (16 x 16) and B (16 x 8, k x n) row-major in a and b; each lane loads its fragments
// by the PTX ISA layout and the warp computes D = A B + C, C = 1.
const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
auto pack = [&](const T* m, int r0, int c0, int ld, int dr, int dc) {
  unsigned lo = reinterpret_cast<const unsigned short*>(m)[r0 * ld + c0];
  unsigned hi = reinterpret_cast<const unsigned short*>(m)[(r0 + dr) * ld + c0 + dc];
  return lo | (hi << 16);
};
unsigned a0 = pack(a, g, 2 * t, 16, 0, 1), a1 = pack(a, g + 8, 2 * t, 16, 0, 1);
unsigned a2 = pack(a, g, 2 * t + 8, 16, 0, 1), a3 = pack(a, g + 8, 2 * t + 8, 16, 0, 1);
unsigned b0 = pack(b, 2 * t, g, 8, 1, 0), b1 = pack(b, 2 * t + 8, g, 8, 1, 0);
float c[4] = {1.0f, 1.0f, 1.0f, 1.0f};
FusionMma<T>::run(c, a0, a1, a2, a3, b0, b1);
for (int i = 0; i < 4; i++) {
  d[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = c[i];
}
"""


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mma_sync_host_implementation(dtype):
    """mma.sync m16n8k16 on fragments loaded by the PTX ISA layout is the matrix product."""
    header = kernel_source("linear_activation", "cuda")[0]
    rng = _rng("mma", dtype)
    a = encode(rng.uniform(-2, 2, (16, 16)), dtype)
    b = encode(rng.uniform(-2, 2, (16, 8)), dtype)
    # 16-bit inputs, a float32 output: a variant by hand
    v = Variant(f"mma_{dtype}_f32", ("a", "b"), (dtype, dtype), ("d",), ("float32",), (("T", dtype),))
    d = aligned_empty((16, 8), "float32")
    run_variant(load(render_unit(header, MMA_TEST, [v])), v, [a, b], [d], 32, 32)
    want = decode(a, dtype).astype(np.float64) @ decode(b, dtype).astype(np.float64) + 1.0
    np.testing.assert_allclose(d, want, rtol=1e-6, atol=1e-6)


def test_divergent_syncthreads_is_reported():
    body = "if (threadIdx.x < 8) { __syncthreads(); }\nout[threadIdx.x] = x[threadIdx.x];"
    k = HostKernel("divergent", "", body, ("x",), ("out",), dtypes=("float32",))
    with pytest.raises(HostLaunchError, match="deadlock"):
        k("float32", [np.zeros(32, np.float32)], [(32,)], 32, 32)


# --- Metal ------------------------------------------------------------------------------

def test_threadgroup_memory_barriers_and_simd_functions_execute():
    """Threadgroup memory is shared by a threadgroup's threads, a barrier orders its writes
    before the reads, and simd_* functions combine the 32 lanes of a simdgroup."""
    body = """
    threadgroup float buf[64];
    const uint t = thread_index_in_threadgroup;
    buf[t] = a[thread_position_in_grid.x];
    threadgroup_barrier(metal::mem_flags::mem_threadgroup);
    const float mirrored = buf[threads_per_threadgroup.x - 1 - t];
    out[thread_position_in_grid.x] = mirrored + 1000.0f * metal::simd_sum(mirrored)
        + 1e6f * metal::simd_shuffle_xor(float(t), 1);
    """
    k = ShimMetalKernel("tg", ["a"], ["out"], body)
    a = np.arange(128, dtype=np.float32)
    out = np.array(k(inputs=[mx.array(a)], output_shapes=[(128,)], output_dtypes=[mx.float32], grid=(128, 1, 1),
                     threadgroup=(64, 1, 1))[0])
    want = np.empty(128, np.float32)
    for g in range(2):
        grp = a[64 * g:64 * g + 64][::-1]
        for t in range(64):
            simd = grp[32 * (t // 32):32 * (t // 32) + 32].sum()
            want[64 * g + t] = grp[t] + 1000.0 * simd + 1e6 * (t ^ 1)
    np.testing.assert_allclose(out, want, rtol=1e-6)


def test_divergent_barrier_is_reported():
    """A barrier that part of a threadgroup never reaches hangs a GPU: the shim raises."""
    body = """
    if (thread_index_in_threadgroup < 16) {
      threadgroup_barrier(metal::mem_flags::mem_threadgroup);
    }
    out[thread_position_in_grid.x] = a[thread_position_in_grid.x];
    """
    k = ShimMetalKernel("divergent", ["a"], ["out"], body)
    with pytest.raises(ShimLaunchError, match="deadlock"):
        k(inputs=[mx.zeros((32,))], output_shapes=[(32,)], output_dtypes=[mx.float32], grid=(32, 1, 1),
          threadgroup=(32, 1, 1))
