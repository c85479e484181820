// out = act(a op b). Twin of binary_activation.metal (template T, m = (op, act),
// same indexing) plus the template constant U: each thread moves U 16-byte vectors per
// operand, strided by the block size so every warp access is coalesced; all
// loads are issued before the first store (memory-level parallelism).
constexpr int WPT = 16 / sizeof(T);
const int op = m[0];
const int act = m[1];
const int64_t n = max(fusion_size(a_shape, a_ndim), fusion_size(b_shape, b_ndim));
const int64_t start = int64_t(blockIdx.x) * blockDim.x * U * WPT;
if (start >= n) {
  return;
}
const int64_t la = fusion_operand_layout(n, a_shape, a_strides, a_ndim);
const int64_t lb = fusion_operand_layout(n, b_shape, b_strides, b_ndim);
float x[U][WPT], y[U][WPT];
#pragma unroll
for (int u = 0; u < U; u++) {
  const int64_t base = start + (int64_t(u) * blockDim.x + threadIdx.x) * WPT;
  if (base < n) {
    fusion_load<WPT>(x[u], a, base, n, la, a_shape, a_strides, a_ndim);
    fusion_load<WPT>(y[u], b, base, n, lb, b_shape, b_strides, b_ndim);
  }
}
FUSION_DISPATCH(op, act, fusion_forward_n, U * WPT, &x[0][0], &y[0][0]);
#pragma unroll
for (int u = 0; u < U; u++) {
  const int64_t base = start + (int64_t(u) * blockDim.x + threadIdx.x) * WPT;
  if (base < n) {
    fusion_store<WPT>(out, base, n, x[u]);
  }
}
