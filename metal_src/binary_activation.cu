// out = act(a op b). Twin of binary_activation.metal (same template
// constants T, OP, ACT and indexing), with 16-byte vector accesses.
constexpr int WPT = 16 / sizeof(T);
const int64_t n = max(fusion_size(a_shape, a_ndim), fusion_size(b_shape, b_ndim));
const int64_t base = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * WPT;
if (base >= n) {
  return;
}
const int64_t la = fusion_operand_layout(n, a_shape, a_strides, a_ndim);
const int64_t lb = fusion_operand_layout(n, b_shape, b_strides, b_ndim);
float x[WPT], y[WPT], r[WPT];
fusion_load<WPT>(x, a, base, n, la, a_shape, a_strides, a_ndim);
fusion_load<WPT>(y, b, base, n, lb, b_shape, b_strides, b_ndim);
#pragma unroll
for (int k = 0; k < WPT; k++) {
  r[k] = fusion_activation<ACT>(fusion_binary<OP>(x[k], y[k]));
}
fusion_store<WPT>(out, base, n, r);
