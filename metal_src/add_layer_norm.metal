// h = x + r, y = layer_norm(h, w, b, eps), and per row the float32 mean and
// rstd = 1/sqrt(var + eps), one kernel. Twin of add_layer_norm.cu: same inputs (x, r, w, b, e),
// outputs (h, y, mean, rstd), templates (T, HAS_WEIGHT, HAS_BIAS) and launch as
// add_rms_norm.metal (one threadgroup per row of the row-contiguous (rows, D) x and r).
//
// h is rounded to T as the unfused add rounds it. Two reductions in float32, as MLX's
// decomposition computes them: mean = sum(h) / D, then var = sum((h - mean)^2) / D (each
// per thread, simd_sum per simdgroup, simdgroup 0 over the partial sums). y rounds like
// MLX: T(T(T((h - mean) * rstd) * w) + b).
const int D = x_shape[x_ndim - 1];
const uint row = threadgroup_position_in_grid.x;
const uint tid = thread_position_in_threadgroup.x;
const uint nt = threads_per_threadgroup.x;
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint groups = (nt + 31) / 32;
const int64_t base = int64_t(row) * D;
const float inv_d = 1.0f / float(D);
threadgroup float sums[32];
threadgroup float squares[32];

float acc = 0.0f;
for (int i = int(tid); i < D; i += int(nt)) {
  const T hv = T(float(x[base + i]) + float(r[base + i]));
  h[base + i] = hv;
  acc += float(hv);
}
acc = metal::simd_sum(acc);
if (lane == 0) {
  sums[sg] = acc;
}
threadgroup_barrier(metal::mem_flags::mem_threadgroup);
if (sg == 0) {
  float v = metal::simd_sum(lane < groups ? sums[lane] : 0.0f);
  if (lane == 0) {
    sums[0] = v;
  }
}
threadgroup_barrier(metal::mem_flags::mem_threadgroup);
const float mu = sums[0] * inv_d;

float acc2 = 0.0f;
for (int i = int(tid); i < D; i += int(nt)) {
  const float c = float(h[base + i]) - mu;
  acc2 += c * c;
}
acc2 = metal::simd_sum(acc2);
if (lane == 0) {
  squares[sg] = acc2;
}
threadgroup_barrier(metal::mem_flags::mem_threadgroup);
if (sg == 0) {
  float v = metal::simd_sum(lane < groups ? squares[lane] : 0.0f);
  if (lane == 0) {
    squares[0] = v;
  }
}
threadgroup_barrier(metal::mem_flags::mem_threadgroup);
const float rs = 1.0f / metal::sqrt(squares[0] * inv_d + float(e[0]));
if (tid == 0) {
  mean[row] = mu;
  rstd[row] = rs;
}
for (int i = int(tid); i < D; i += int(nt)) {
  const T n = T((float(h[base + i]) - mu) * rs);
  const T scaled = HAS_WEIGHT ? T(float(n) * float(w[i])) : n;
  y[base + i] = HAS_BIAS ? T(float(scaled) + float(b[i])) : scaled;
}
