// Backward of act(a op b) in one pass. Twin of binary_activation_backward.metal
// (template T, m = (op, act); U vectors per thread as in binary_activation.cu):
// dz = g * act'(a op b); add/sub write dz into da only, mul/div write both
// operand gradients at full output shape.
constexpr int WPT = 16 / sizeof(T);
const int op = m[0];
const int act = m[1];
const int64_t n = fusion_size(g_shape, g_ndim);
const int64_t start = int64_t(blockIdx.x) * blockDim.x * U * WPT;
if (start >= n) {
  return;
}
const int64_t la = fusion_operand_layout(n, a_shape, a_strides, a_ndim);
const int64_t lb = fusion_operand_layout(n, b_shape, b_strides, b_ndim);
const int64_t lg = fusion_layout(g_shape, g_strides, g_ndim);
float x[U][WPT], y[U][WPT], dz[U][WPT];
#pragma unroll
for (int u = 0; u < U; u++) {
  const int64_t base = start + (int64_t(u) * blockDim.x + threadIdx.x) * WPT;
  if (base < n) {
    fusion_load<WPT>(x[u], a, base, n, la, a_shape, a_strides, a_ndim);
    fusion_load<WPT>(y[u], b, base, n, lb, b_shape, b_strides, b_ndim);
    fusion_load<WPT>(dz[u], g, base, n, lg, g_shape, g_strides, g_ndim);
  }
}
FUSION_DISPATCH(op, act, fusion_dz_n, U * WPT, &dz[0][0], &x[0][0], &y[0][0]);
#pragma unroll
for (int u = 0; u < U; u++) {
  const int64_t base = start + (int64_t(u) * blockDim.x + threadIdx.x) * WPT;
  if (base >= n) {
    continue;
  }
  if (op == FUSION_MUL) {
#pragma unroll
    for (int k = 0; k < WPT; k++) {
      float d = dz[u][k];
      dz[u][k] = d * y[u][k];
      y[u][k] = d * x[u][k];
    }
    fusion_store<WPT>(da, base, n, dz[u]);
    fusion_store<WPT>(db, base, n, y[u]);
  } else if (op == FUSION_DIV) {
#pragma unroll
    for (int k = 0; k < WPT; k++) {
      float d = dz[u][k];
      dz[u][k] = d / y[u][k];
      y[u][k] = -(d * x[u][k]) / (y[u][k] * y[u][k]);
    }
    fusion_store<WPT>(da, base, n, dz[u]);
    fusion_store<WPT>(db, base, n, y[u]);
  } else {
    fusion_store<WPT>(da, base, n, dz[u]);
  }
}
