// dx = g * act'(x * scale + shift) * scale in one pass.
// Twin of scalar_activation_backward.metal (template T, ACT).
constexpr int WPT = 16 / sizeof(T);
const int64_t n = fusion_size(x_shape, x_ndim);
const int64_t base = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * WPT;
if (base >= n) {
  return;
}
const float scale = p[0];
const float shift = p[1];
float v[WPT], d[WPT];
fusion_load<WPT>(v, x, base, n, 0, x_shape, x_shape, x_ndim);
fusion_load<WPT>(d, g, base, n, 0, x_shape, x_shape, x_ndim);
#pragma unroll
for (int k = 0; k < WPT; k++) {
  d[k] = d[k] * fusion_activation_grad<ACT>(v[k] * scale + shift) * scale;
}
fusion_store<WPT>(dx, base, n, d);
