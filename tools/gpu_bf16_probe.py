"""Why is the bfloat16 elementwise kernel slower than mx.compile on CUDA? Time
stripped-down variants of add+relu at 64M bf16 elements, all under mx.compile.

    PYTHONPATH=. python3 tools/gpu_bf16_probe.py
"""
import mlx.core as mx

from mlx_fusion import ops
from mlx_fusion.timing import time_call
from mlx_fusion.kernels import kernel_source

HEADER = kernel_source("binary_activation", "cuda")[0]

MINIMAL = """
  const {I} n = {I}(a_shape[0]) * {I}(a_shape[1]);
  const {I} base = ({I}(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  if (base >= n) return;
  uint4 ra = *reinterpret_cast<const uint4*>(a + base);
  uint4 rb = *reinterpret_cast<const uint4*>(b + base);
  unsigned wa[4] = {{ra.x, ra.y, ra.z, ra.w}}, wb[4] = {{rb.x, rb.y, rb.z, rb.w}}, wo[4] = {{0, 0, 0, 0}};
#pragma unroll
  for (int k = 0; k < 8; k++) {{
    float z = FusionBits<T>::get(wa[k / 2], k % 2) + FusionBits<T>::get(wb[k / 2], k % 2);
    z = (z > 0.0f || isnan(z)) ? z : 0.0f;
    wo[k / 2] = FusionBits<T>::put(wo[k / 2], k % 2, z);
  }}
  *reinterpret_cast<uint4*>(out + base) = make_uint4(wo[0], wo[1], wo[2], wo[3]);
"""

HELPERS = """
  const int64_t n = max(fusion_size(a_shape, a_ndim), fusion_size(b_shape, b_ndim));
  const int64_t base = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * W;
  if (base >= n) return;
  const int64_t la = {LA};
  const int64_t lb = {LB};
  float x[W], y[W];
  fusion_load<W>(x, a, base, n, la, a_shape, a_strides, a_ndim);
  fusion_load<W>(y, b, base, n, lb, b_shape, b_strides, b_ndim);
#pragma unroll
  for (int k = 0; k < W; k++) {{
    x[k] = fusion_activation(0, fusion_binary(0, x[k], y[k]));
  }}
  fusion_store<W>(out, base, n, x);
"""


LOOP = """
  const int64_t n = max(fusion_size(a_shape, a_ndim), fusion_size(b_shape, b_ndim));
  const int64_t la = fusion_operand_layout(n, a_shape, a_strides, a_ndim);
  const int64_t lb = fusion_operand_layout(n, b_shape, b_strides, b_ndim);
  const int64_t step = int64_t(gridDim.x) * blockDim.x * W;
#pragma unroll 1
  for (int64_t base = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * W; base < n; base += step) {{
    float x[W], y[W];
    fusion_load<W>(x, a, base, n, la, a_shape, a_strides, a_ndim);
    fusion_load<W>(y, b, base, n, lb, b_shape, b_strides, b_ndim);
#pragma unroll
    for (int k = 0; k < W; k++) {{
      x[k] = fusion_activation(0, fusion_binary(0, x[k], y[k]));
    }}
    fusion_store<W>(out, base, n, x);
  }}
"""


def kernel(name, body):
    return mx.fast.cuda_kernel(name, ["a", "b"], ["out"], body, header=HEADER, ensure_row_contiguous=False)


def main():
    n = 2**26
    a, b = (mx.random.normal((n // 4096, 4096)).astype(mx.bfloat16) for _ in range(2))
    mx.eval(a, b)
    variants = {
        "minimal u32": kernel("p_min32", MINIMAL.format(I="unsigned")),
        "minimal i64": kernel("p_min64", MINIMAL.format(I="int64_t")),
        "helpers, layout 0": kernel("p_h0", HELPERS.format(LA="0", LB="0")),
        "helpers, layout computed": kernel("p_hl", HELPERS.format(
            LA="fusion_operand_layout(n, a_shape, a_strides, a_ndim)",
            LB="fusion_operand_layout(n, b_shape, b_strides, b_ndim)")),
    }
    for loops in (2, 4, 8, 16):
        variants[f"grid-stride x{loops}"] = (kernel("p_loop", LOOP), loops)
    t = dict(calls_per_eval=20, repeats=15)
    gb = 3 * a.nbytes / 1e9
    tf = time_call(mx.compile(lambda a, b: ops.fused_binary(a, b)), [a, b], **t)
    print(f"fused_binary          {gb / tf:7.0f} GB/s")
    for dt in (mx.bfloat16, mx.float32):
        a, b = a.astype(dt), b.astype(dt)
        w = 16 // dt.size
        gb = 3 * a.nbytes / 1e9
        tc = time_call(mx.compile(lambda a, b: mx.maximum(a + b, 0)), [a, b], **t)
        print(f"{str(dt)[9:]:<9} mx.compile {gb / tc:7.0f} GB/s")
        for name, k in variants.items():
            k, loops = k if isinstance(k, tuple) else (k, 1)
            if dt != mx.bfloat16 and loops == 1:
                continue
            f = mx.compile(lambda a, b, k=k, loops=loops: k(
                inputs=[a, b], output_shapes=[a.shape], output_dtypes=[a.dtype],
                grid=(n // (w * loops), 1, 1), threadgroup=(256, 1, 1),
                template=[("T", dt), ("W", w)])[0])
            ok = mx.array_equal(f(a, b), mx.maximum(a + b, 0)).item()
            print(f"{str(dt)[9:]:<9} {name:<24}{gb / time_call(f, [a, b], **t):7.0f} GB/s  exact={ok}", flush=True)


if __name__ == "__main__":
    main()
