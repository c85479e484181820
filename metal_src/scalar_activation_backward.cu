// dx = g * act'(x * scale + shift) * scale in one pass.
// Twin of scalar_activation_backward.metal (template T, p = (scale, shift,
// act code); U vectors per
// thread as in binary_activation.cu).
constexpr int WPT = 16 / sizeof(T);
const int64_t n = fusion_size(x_shape, x_ndim);
const int64_t start = int64_t(blockIdx.x) * blockDim.x * U * WPT;
if (start >= n) {
  return;
}
const float scale = p[0];
const float shift = p[1];
const int act = int(p[2]);
float v[U][WPT], d[U][WPT];
#pragma unroll
for (int u = 0; u < U; u++) {
  const int64_t base = start + (int64_t(u) * blockDim.x + threadIdx.x) * WPT;
  if (base < n) {
    fusion_load<WPT>(v[u], x, base, n, 0, x_shape, x_shape, x_ndim);
    fusion_load<WPT>(d[u], g, base, n, 0, x_shape, x_shape, x_ndim);
  }
}
FUSION_DISPATCH_ACT(act, fusion_affine_dx_n, U * WPT, &d[0][0], &v[0][0], scale, shift);
#pragma unroll
for (int u = 0; u < U; u++) {
  const int64_t base = start + (int64_t(u) * blockDim.x + threadIdx.x) * WPT;
  if (base < n) {
    fusion_store<WPT>(dx, base, n, d[u]);
  }
}
