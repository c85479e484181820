// Cross entropy of each row of a logits chunk: lse = logsumexp(logits[row]) and
// loss = lse - logits[row, t[row]], both float32. Twin of cross_entropy_rows.metal: same
// inputs (logits (rows, V) row contiguous, t (rows,) int32), outputs (lse, loss), template T
// and launch: one block per row, blockDim.x a multiple of 32 (<= 1024).
//
// One pass over the row (online softmax): each thread keeps the running max m and the sum
// s of exp(x - m) over its elements (stride blockDim.x); the (m, s) pairs are folded across
// each warp (__shfl_xor_sync), then warp 0 folds the warps' pairs from shared memory.
// As MLX's reference: a NaN logit makes the row NaN, and so does an infinite max (the
// reference shifts by the max, and inf - inf is NaN). t outside [0, V) (the op maps MLX's
// negative indices into range first) has no logit: the row's loss is NaN.
const int V = logits_shape[1];
const unsigned row = blockIdx.x;
const unsigned tid = threadIdx.x;
const unsigned nt = blockDim.x;
const unsigned lane = tid & 31;
const unsigned warp = tid >> 5;
const int64_t base = int64_t(row) * V;
// Spelled with bits, not INFINITY / isinf: NVRTC compiles this without the C math headers.
const float kInf = __uint_as_float(0x7f800000u);
__shared__ float part_m[32];
__shared__ float part_s[32];

float m = -kInf;
float s = 0.0f;
for (int j = int(tid); j < V; j += int(nt)) {
  const float x = float(logits[base + j]);
  if (x > m) {
    s = s * expf(m - x) + 1.0f;
    m = x;
  } else {
    s += (x == m) ? 1.0f : expf(x - m);
  }
}
for (int k = 16; k > 0; k >>= 1) {
  const float m2 = __shfl_xor_sync(0xffffffffu, m, k);
  const float s2 = __shfl_xor_sync(0xffffffffu, s, k);
  const float mm = m2 > m ? m2 : m;
  s = (m == mm ? s : s * expf(m - mm)) + (m2 == mm ? s2 : s2 * expf(m2 - mm));
  m = mm;
}
if (lane == 0) {
  part_m[warp] = m;
  part_s[warp] = s;
}
__syncthreads();
if (warp == 0) {
  const bool live = lane < (nt + 31) / 32;
  m = live ? part_m[lane] : -kInf;
  s = live ? part_s[lane] : 0.0f;
  for (int k = 16; k > 0; k >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, k);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, k);
    const float mm = m2 > m ? m2 : m;
    s = (m == mm ? s : s * expf(m - mm)) + (m2 == mm ? s2 : s2 * expf(m2 - mm));
    m = mm;
  }
  if (lane == 0) {
    const float l = fabsf(m) == kInf ? fusion_nan() : m + logf(s);
    const int target = int(t[row]);
    const float picked = (target >= 0 && target < V) ? float(logits[base + target]) : fusion_nan();
    lse[row] = l;
    loss[row] = l - picked;
  }
}
