// Backward of add_rms_norm: dx (= dr) = dh + rstd * (g - n * mean(g * n)) per row, with
// g = dy * w (dy without a weight), n = h * rstd. Twin of add_rms_norm_backward.cu; launch
// as add_rms_norm.metal (one threadgroup per row of the row-contiguous (rows, D) h, dy, dh;
// rstd float32 (rows,), saved by the forward). All arithmetic in float32; dw is reduced
// over rows by the caller.
const int D = h_shape[h_ndim - 1];
const uint row = threadgroup_position_in_grid.x;
const uint tid = thread_position_in_threadgroup.x;
const uint nt = threads_per_threadgroup.x;
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const int64_t base = int64_t(row) * D;
const float rs = float(rstd[row]);
threadgroup float partial[32];

float acc = 0.0f;
for (int i = int(tid); i < D; i += int(nt)) {
  const float g = HAS_WEIGHT ? float(dy[base + i]) * float(w[i]) : float(dy[base + i]);
  acc += g * float(h[base + i]);
}
acc = metal::simd_sum(acc);
if (lane == 0) {
  partial[sg] = acc;
}
threadgroup_barrier(metal::mem_flags::mem_threadgroup);
if (sg == 0) {
  float v = lane < (nt + 31) / 32 ? partial[lane] : 0.0f;
  v = metal::simd_sum(v);
  if (lane == 0) {
    partial[0] = v;
  }
}
threadgroup_barrier(metal::mem_flags::mem_threadgroup);
// mean(g * n) * rstd = sum(g * h) * rstd^2 / D
const float c = partial[0] * rs * rs * (1.0f / float(D));
for (int i = int(tid); i < D; i += int(nt)) {
  const float g = HAS_WEIGHT ? float(dy[base + i]) * float(w[i]) : float(dy[base + i]);
  dx[base + i] = T(float(dh[base + i]) + rs * (g - float(h[base + i]) * c));
}
