// Cross entropy of each row of a logits chunk: lse = logsumexp(logits[row]) and
// loss = lse - logits[row, t[row]], both float32. Twin of cross_entropy_rows.cu: same inputs
// (logits (rows, V) row contiguous, t (rows,) int32), outputs (lse, loss), template T and
// launch: one threadgroup per row, threads_per_threadgroup a multiple of 32 (<= 1024).
//
// One pass over the row (online softmax): each thread keeps the running max m and the sum
// s of exp(x - m) over its elements (stride = threadgroup size); the (m, s) pairs are folded
// across each simdgroup (simd_shuffle_xor), then simdgroup 0 folds the simdgroups' pairs.
// As MLX's reference: a NaN logit makes the row NaN, and so does an infinite max (the
// reference shifts by the max, and inf - inf is NaN). t outside [0, V) (the op maps MLX's
// negative indices into range first) has no logit: the row's loss is NaN.
const int V = logits_shape[1];
const uint row = threadgroup_position_in_grid.x;
const uint tid = thread_position_in_threadgroup.x;
const uint nt = threads_per_threadgroup.x;
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const int64_t base = int64_t(row) * V;
threadgroup float part_m[32];
threadgroup float part_s[32];

float m = -INFINITY;
float s = 0.0f;
for (int j = int(tid); j < V; j += int(nt)) {
  const float x = float(logits[base + j]);
  if (x > m) {
    s = s * metal::exp(m - x) + 1.0f;
    m = x;
  } else {
    s += (x == m) ? 1.0f : metal::exp(x - m);
  }
}
for (ushort k = 16; k > 0; k >>= 1) {
  const float m2 = metal::simd_shuffle_xor(m, k);
  const float s2 = metal::simd_shuffle_xor(s, k);
  const float mm = m2 > m ? m2 : m;
  s = (m == mm ? s : s * metal::exp(m - mm)) + (m2 == mm ? s2 : s2 * metal::exp(m2 - mm));
  m = mm;
}
if (lane == 0) {
  part_m[sg] = m;
  part_s[sg] = s;
}
threadgroup_barrier(metal::mem_flags::mem_threadgroup);
if (sg == 0) {
  const bool live = lane < (nt + 31) / 32;
  m = live ? part_m[lane] : -INFINITY;
  s = live ? part_s[lane] : 0.0f;
  for (ushort k = 16; k > 0; k >>= 1) {
    const float m2 = metal::simd_shuffle_xor(m, k);
    const float s2 = metal::simd_shuffle_xor(s, k);
    const float mm = m2 > m ? m2 : m;
    s = (m == mm ? s : s * metal::exp(m - mm)) + (m2 == mm ? s2 : s2 * metal::exp(m2 - mm));
    m = mm;
  }
  if (lane == 0) {
    const float l = metal::isinf(m) ? NAN : m + metal::log(s);
    const int target = int(t[row]);
    const float picked = (target >= 0 && target < V) ? float(logits[base + target]) : NAN;
    lse[row] = l;
    loss[row] = l - picked;
  }
}
