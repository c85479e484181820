// Backward of add_layer_norm: dx (= dr) = dh + rstd * (g - mean(g) - n * mean(g * n)) per row,
// with g = dy * w (dy without a weight) and n = (h - mean) * rstd. Twin of
// add_layer_norm_backward.cu; launch as add_layer_norm.metal; mean and rstd are the forward's
// float32 (rows,) outputs. Both sums in one pass, float32; dw and db are reduced by the caller.
const int D = h_shape[h_ndim - 1];
const uint row = threadgroup_position_in_grid.x;
const uint tid = thread_position_in_threadgroup.x;
const uint nt = threads_per_threadgroup.x;
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint groups = (nt + 31) / 32;
const int64_t base = int64_t(row) * D;
const float mu = float(mean[row]);
const float rs = float(rstd[row]);
threadgroup float g_sums[32];
threadgroup float gn_sums[32];

float acc_g = 0.0f;
float acc_gn = 0.0f;
for (int i = int(tid); i < D; i += int(nt)) {
  const float g = HAS_WEIGHT ? float(dy[base + i]) * float(w[i]) : float(dy[base + i]);
  acc_g += g;
  acc_gn += g * (float(h[base + i]) - mu) * rs;
}
acc_g = metal::simd_sum(acc_g);
acc_gn = metal::simd_sum(acc_gn);
if (lane == 0) {
  g_sums[sg] = acc_g;
  gn_sums[sg] = acc_gn;
}
threadgroup_barrier(metal::mem_flags::mem_threadgroup);
if (sg == 0) {
  float a = metal::simd_sum(lane < groups ? g_sums[lane] : 0.0f);
  float c = metal::simd_sum(lane < groups ? gn_sums[lane] : 0.0f);
  if (lane == 0) {
    g_sums[0] = a;
    gn_sums[0] = c;
  }
}
threadgroup_barrier(metal::mem_flags::mem_threadgroup);
const float mean_g = g_sums[0] * (1.0f / float(D));
const float mean_gn = gn_sums[0] * (1.0f / float(D));
for (int i = int(tid); i < D; i += int(nt)) {
  const float g = HAS_WEIGHT ? float(dy[base + i]) * float(w[i]) : float(dy[base + i]);
  const float n = (float(h[base + i]) - mu) * rs;
  dx[base + i] = T(float(dh[base + i]) + rs * (g - mean_g - n * mean_gn));
}
