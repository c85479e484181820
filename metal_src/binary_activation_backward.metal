// Backward of act(a op b) in one pass: dz = g * act'(a op b), recomputing the
// pre-activation instead of storing it, then the operand gradients of op at
// full output shape (the caller sums them over broadcast dimensions).
// add/sub write only dz, into da (db is a 1-element dummy); mul/div write da and db.
// Twin: binary_activation_backward.cu. Template: T; m = (op, act).
constexpr int WPT = 16 / sizeof(T);
const int op = m[0];
const int act = m[1];
const int64_t n = fusion_size(g_shape, g_ndim);
const int64_t la = fusion_operand_layout(n, a_shape, a_strides, a_ndim);
const int64_t lb = fusion_operand_layout(n, b_shape, b_strides, b_ndim);
const int64_t lg = fusion_layout(g_shape, g_strides, g_ndim);
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
    float dz = fusion_load(g, i, lg, g_shape, g_strides, g_ndim) *
        fusion_activation_grad(act, fusion_binary(op, x, y));
    if (op == FUSION_MUL) {
      da[i] = T(dz * y);
      db[i] = T(dz * x);
    } else if (op == FUSION_DIV) {
      da[i] = T(dz / y);
      db[i] = T(-(dz * x) / (y * y));
    } else {
      da[i] = T(dz);
    }
  }
}
