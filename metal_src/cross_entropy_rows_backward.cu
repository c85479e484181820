// The gradient of cross_entropy_rows w.r.t. the logits chunk:
// dlogits[row, j] = (exp(logits[row, j] - lse[row]) - [j == t[row]]) * g[row], float32 math,
// written in T (the logits' dtype). Twin of cross_entropy_rows_backward.metal: same inputs
// (logits (rows, V), t (rows,) int32, lse (rows,) float32 from the forward, g (rows,) float32
// cotangent of each row's loss), output dlogits (rows, V), template T and launch: one block
// per row, threads striding over V.
//
// A row whose t is outside [0, V) has no logit (its loss was NaN): its gradient is NaN.
const int V = logits_shape[1];
const unsigned row = blockIdx.x;
const unsigned tid = threadIdx.x;
const unsigned nt = blockDim.x;
const int64_t base = int64_t(row) * V;
const int target = int(t[row]);
const float l = (target >= 0 && target < V) ? float(lse[row]) : fusion_nan();
const float gr = float(g[row]);
for (int j = int(tid); j < V; j += int(nt)) {
  const float p = expf(float(logits[base + j]) - l);
  dlogits[base + j] = static_cast<T>((j == target ? p - 1.0f : p) * gr);
}
