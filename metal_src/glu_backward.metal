// Backward of act(g) * u in one pass, from g and u only (act(g) is recomputed, not
// stored): dg = dy * u * act'(g), du = dy * act(g).
// Twin: glu_backward.cu. Template: T; m = (act code,). g, u, dy row contiguous, one shape.
constexpr int WPT = 16 / sizeof(T);
const int act = m[0];
const int64_t n = fusion_size(g_shape, g_ndim);
const int64_t step = int64_t(threads_per_grid.x) * WPT;
for (int64_t base = int64_t(thread_position_in_grid.x) * WPT; base < n; base += step) {
  for (int k = 0; k < WPT; k++) {
    const int64_t i = base + k;
    if (i >= n) {
      break;
    }
    const float z = float(g[i]);
    const float d = float(dy[i]);
    dg[i] = T(d * float(u[i]) * fusion_activation_grad(act, z));
    du[i] = T(d * fusion_activation(act, z));
  }
}
