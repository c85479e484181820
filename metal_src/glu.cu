// out = act(g) * u. Twin of glu.metal (template T; m = (act code,)); g and u are row
// contiguous and of one shape. 16-byte vector loads/stores and a grid-stride loop
// (FUSION_GRID_LOOP, common.cu), with the activation a compile-time constant per case.
constexpr int W = 16 / sizeof(T);
const int64_t n = fusion_size(g_shape, g_ndim);
#define GLU_LOOP(ACT)                                                 \
  {                                                                   \
    FUSION_GRID_LOOP(base, n) {                                       \
      float x[W], y[W];                                               \
      fusion_load<W>(x, g, base, n, 0, g_shape, g_shape, g_ndim);     \
      fusion_load<W>(y, u, base, n, 0, g_shape, g_shape, g_ndim);     \
      _Pragma("unroll") for (int k = 0; k < W; k++) {                 \
        x[k] = fusion_activation(ACT, x[k]) * y[k];                   \
      }                                                               \
      fusion_store<W>(out, base, n, x);                               \
    }                                                                 \
  }
switch (m[0]) {
  case FUSION_GELU: GLU_LOOP(FUSION_GELU) break;
  case FUSION_GELU_APPROX: GLU_LOOP(FUSION_GELU_APPROX) break;
  case FUSION_SILU: GLU_LOOP(FUSION_SILU) break;
  default: GLU_LOOP(FUSION_RELU) break;
}
#undef GLU_LOOP
