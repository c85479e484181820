// out = act(x * scale + shift), p = (scale, shift, act code) in float32.
// Twin of scalar_activation.metal (template T; U vectors per thread as in
// binary_activation.cu); x is row contiguous.
constexpr int WPT = 16 / sizeof(T);
const int64_t n = fusion_size(x_shape, x_ndim);
const int64_t start = int64_t(blockIdx.x) * blockDim.x * U * WPT;
if (start >= n) {
  return;
}
const float scale = p[0];
const float shift = p[1];
const int act = int(p[2]);
float v[U][WPT];
#pragma unroll
for (int u = 0; u < U; u++) {
  const int64_t base = start + (int64_t(u) * blockDim.x + threadIdx.x) * WPT;
  if (base < n) {
    fusion_load<WPT>(v[u], x, base, n, 0, x_shape, x_shape, x_ndim);
  }
}
FUSION_DISPATCH_ACT(act, fusion_affine_n, U * WPT, &v[0][0], scale, shift);
#pragma unroll
for (int u = 0; u < U; u++) {
  const int64_t base = start + (int64_t(u) * blockDim.x + threadIdx.x) * WPT;
  if (base < n) {
    fusion_store<WPT>(out, base, n, v[u]);
  }
}
