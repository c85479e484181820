// h = x + r, y = rms_norm(h, w, eps) and rstd = 1/sqrt(mean(h^2) + eps) per row, one kernel.
// Twin of add_rms_norm.cu: same inputs (x, r, w, e), outputs (h, y, rstd), templates
// (T, HAS_WEIGHT) and launch: one threadgroup per row of the row-contiguous (rows, D) x
// and r, threads_per_threadgroup a multiple of 32 (<= 1024). e[0] is eps (float32).
//
// h is rounded to T as the unfused add rounds it, and the sum of its squares is taken
// in float32: each thread sums its elements (stride = threadgroup size), simd_sum
// reduces each simdgroup, and simdgroup 0 reduces the simdgroups' partial sums.
// y = T(T(h * rstd) * w), the rounding order of MLX's own rms_norm.
const int D = x_shape[x_ndim - 1];
const uint row = threadgroup_position_in_grid.x;
const uint tid = thread_position_in_threadgroup.x;
const uint nt = threads_per_threadgroup.x;
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const int64_t base = int64_t(row) * D;
threadgroup float partial[32];

float acc = 0.0f;
for (int i = int(tid); i < D; i += int(nt)) {
  const T hv = T(float(x[base + i]) + float(r[base + i]));
  h[base + i] = hv;
  const float hf = float(hv);
  acc += hf * hf;
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
const float rs = 1.0f / metal::sqrt(partial[0] * (1.0f / float(D)) + float(e[0]));
if (tid == 0) {
  rstd[row] = rs;
}
for (int i = int(tid); i < D; i += int(nt)) {
  const T n = T(float(h[base + i]) * rs);
  y[base + i] = HAS_WEIGHT ? T(float(n) * float(w[i])) : n;
}
