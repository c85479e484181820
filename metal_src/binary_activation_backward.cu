// Backward of act(a op b) in one pass. Twin of binary_activation_backward.metal
// (template T, OP, ACT): dz = g * act'(a op b); add/sub write dz
// into da only, mul/div write both operand gradients at full output shape.
constexpr int WPT = 16 / sizeof(T);
const int64_t n = fusion_size(g_shape, g_ndim);
const int64_t base = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * WPT;
if (base >= n) {
  return;
}
const int64_t la = fusion_operand_layout(n, a_shape, a_strides, a_ndim);
const int64_t lb = fusion_operand_layout(n, b_shape, b_strides, b_ndim);
const int64_t lg = fusion_layout(g_shape, g_strides, g_ndim);
float x[WPT], y[WPT], dz[WPT];
fusion_load<WPT>(x, a, base, n, la, a_shape, a_strides, a_ndim);
fusion_load<WPT>(y, b, base, n, lb, b_shape, b_strides, b_ndim);
fusion_load<WPT>(dz, g, base, n, lg, g_shape, g_strides, g_ndim);
#pragma unroll
for (int k = 0; k < WPT; k++) {
  dz[k] *= fusion_activation_grad<ACT>(fusion_binary<OP>(x[k], y[k]));
}
if constexpr (OP == FUSION_MUL) {
  float ga[WPT], gb[WPT];
#pragma unroll
  for (int k = 0; k < WPT; k++) {
    ga[k] = dz[k] * y[k];
    gb[k] = dz[k] * x[k];
  }
  fusion_store<WPT>(da, base, n, ga);
  fusion_store<WPT>(db, base, n, gb);
} else if constexpr (OP == FUSION_DIV) {
  float ga[WPT], gb[WPT];
#pragma unroll
  for (int k = 0; k < WPT; k++) {
    ga[k] = dz[k] / y[k];
    gb[k] = -(dz[k] * x[k]) / (y[k] * y[k]);
  }
  fusion_store<WPT>(da, base, n, ga);
  fusion_store<WPT>(db, base, n, gb);
} else {
  fusion_store<WPT>(da, base, n, dz);
}
