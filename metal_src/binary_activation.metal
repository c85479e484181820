// out = act(a op b) over the broadcast output shape. Twin: binary_activation.cu.
// Template: T (compute and output dtype); m = (op, act). An operand is either one
// element or broadcast to the output shape as a stride-0 view (never copied);
// its layout is classified once per thread.
// Each step handles WPT consecutive elements (16 bytes of output).
constexpr int WPT = 16 / sizeof(T);
const int op = m[0];
const int act = m[1];
const int64_t n = metal::max(fusion_size(a_shape, a_ndim), fusion_size(b_shape, b_ndim));
const int64_t la = fusion_operand_layout(n, a_shape, a_strides, a_ndim);
const int64_t lb = fusion_operand_layout(n, b_shape, b_strides, b_ndim);
// Grid-stride loop, as in the CUDA twin: the layouts above are classified once per
// thread, then each thread walks several 16-byte chunks.
const int64_t step = int64_t(threads_per_grid.x) * WPT;
for (int64_t base = int64_t(thread_position_in_grid.x) * WPT; base < n; base += step) {
  for (int k = 0; k < WPT; k++) {
    const int64_t i = base + k;
    if (i >= n) {
      break;
    }
    float x = fusion_load(a, i, la, a_shape, a_strides, a_ndim);
    float y = fusion_load(b, i, lb, b_shape, b_strides, b_ndim);
    out[i] = T(fusion_activation(act, fusion_binary(op, x, y)));
  }
}
