// out = act(x * scale + shift), p = (scale, shift) in float32.
// Twin of scalar_activation.metal (template T, ACT); x is row contiguous.
constexpr int WPT = 16 / sizeof(T);
const int64_t n = fusion_size(x_shape, x_ndim);
const int64_t base = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * WPT;
if (base >= n) {
  return;
}
const float scale = p[0];
const float shift = p[1];
float v[WPT];
fusion_load<WPT>(v, x, base, n, 0, x_shape, x_shape, x_ndim);
#pragma unroll
for (int k = 0; k < WPT; k++) {
  v[k] = fusion_activation<ACT>(v[k] * scale + shift);
}
fusion_store<WPT>(out, base, n, v);
