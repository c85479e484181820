// dg = dy * u * act'(g), du = dy * act(g) in one pass, recomputing act(g).
// Twin of glu_backward.metal (template T; m = (act code,)); g, u, dy row contiguous.
constexpr int W = 16 / sizeof(T);
const int64_t n = fusion_size(g_shape, g_ndim);
#define GLU_BACKWARD_LOOP(ACT)                                        \
  {                                                                   \
    FUSION_GRID_LOOP(base, n) {                                       \
      float x[W], y[W], d[W];                                         \
      fusion_load<W>(x, g, base, n, 0, g_shape, g_shape, g_ndim);     \
      fusion_load<W>(y, u, base, n, 0, g_shape, g_shape, g_ndim);     \
      fusion_load<W>(d, dy, base, n, 0, g_shape, g_shape, g_ndim);    \
      _Pragma("unroll") for (int k = 0; k < W; k++) {                 \
        const float z = x[k];                                         \
        x[k] = d[k] * y[k] * fusion_activation_grad(ACT, z);          \
        y[k] = d[k] * fusion_activation(ACT, z);                      \
      }                                                               \
      fusion_store<W>(dg, base, n, x);                                \
      fusion_store<W>(du, base, n, y);                                \
    }                                                                 \
  }
switch (m[0]) {
  case FUSION_GELU: GLU_BACKWARD_LOOP(FUSION_GELU) break;
  case FUSION_GELU_APPROX: GLU_BACKWARD_LOOP(FUSION_GELU_APPROX) break;
  case FUSION_SILU: GLU_BACKWARD_LOOP(FUSION_SILU) break;
  default: GLU_BACKWARD_LOOP(FUSION_RELU) break;
}
#undef GLU_BACKWARD_LOOP
