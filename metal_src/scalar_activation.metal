// out = act(x * scale + shift), p = (scale, shift, act code) in float32.
// Twin: scalar_activation.cu. Template: T. x is row contiguous.
constexpr int WPT = 16 / sizeof(T);
const int64_t n = fusion_size(x_shape, x_ndim);
const float scale = p[0];
const float shift = p[1];
const int act = int(p[2]);
// Grid-stride loop, as in the CUDA twin: each thread walks several 16-byte chunks.
const int64_t step = int64_t(threads_per_grid.x) * WPT;
for (int64_t base = int64_t(thread_position_in_grid.x) * WPT; base < n; base += step) {
  for (int k = 0; k < WPT; k++) {
    const int64_t i = base + k;
    if (i >= n) {
      break;
    }
    out[i] = T(fusion_activation(act, float(x[i]) * scale + shift));
  }
}
