// z = x @ w.T + b and out = act(z) for a small number of rows M, one kernel.
// Twin of linear_activation.cu: same inputs, templates (T, MT, NT, HAS_BIAS),
// grid (one threadgroup of 8 simdgroups per 8 * NT output columns) and float32
// epilogue; the caller guarantees K % 8 == 0 and row-contiguous x (M, K), w (N, K).
//
// Apple GPUs have no m16n8k16 MMA, so the reduction is the GEMV shape MLX's own
// small-M kernels use: simdgroup s owns columns n0 + s + 8j, each lane sums its
// 8-element K slices (stride 256), and simd_sum finishes each dot product. The
// weight row is re-read once per 16 rows of x, from cache.
constexpr int LANES = 32;
const int M = x_shape[0];
const int K = x_shape[1];
const int N = w_shape[0];
const int lane = int(thread_index_in_simdgroup);
const int sg = int(simdgroup_index_in_threadgroup);
const int n0 = int(threadgroup_position_in_grid.x) * 8 * NT;
const int act = int(p[2]);
for (int j = 0; j < NT; j++) {
  const int col = n0 + sg + 8 * j;
  if (col >= N) {
    break;
  }
  const device T* wrow = w + int64_t(col) * K;
  for (int m0 = 0; m0 < M; m0 += 16) {
    float acc[16];
    for (int r = 0; r < 16; r++) {
      acc[r] = 0.0f;
    }
    for (int k = lane * 8; k < K; k += LANES * 8) {
      float wk[8];
      for (int i = 0; i < 8; i++) {
        wk[i] = float(wrow[k + i]);
      }
      for (int r = 0; r < 16 && m0 + r < M; r++) {
        const device T* xrow = x + int64_t(m0 + r) * K + k;
        float s = 0.0f;
        for (int i = 0; i < 8; i++) {
          s += float(xrow[i]) * wk[i];
        }
        acc[r] += s;
      }
    }
    for (int r = 0; r < 16 && m0 + r < M; r++) {
      float v = metal::simd_sum(acc[r]);
      if (lane == 0) {
        if (HAS_BIAS) {
          v += float(b[col]);
        }
        const int64_t o = int64_t(m0 + r) * N + col;
        z[o] = T(v);
        out[o] = T(fusion_activation(act, v));
      }
    }
  }
}
