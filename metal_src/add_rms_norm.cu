// h = x + r, y = rms_norm(h, w, eps) and rstd = 1/sqrt(mean(h^2) + eps) per row, one kernel.
// Twin of add_rms_norm.metal: same inputs (x, r, w, e), outputs (h, y, rstd), templates
// (T, HAS_WEIGHT) and launch: one block per row of the row-contiguous (rows, D) x and r,
// blockDim.x a multiple of 32 (<= 1024). e[0] is eps (float32).
//
// h is rounded to T as the unfused add rounds it; the sum of its squares is taken in
// float32: per thread (stride blockDim.x), per warp (__shfl_xor_sync), then warp 0 sums
// the warps' partial sums from shared memory. y = T(T(h * rstd) * w), as MLX rounds.
const int D = x_shape[x_ndim - 1];
const unsigned row = blockIdx.x;
const unsigned tid = threadIdx.x;
const unsigned nt = blockDim.x;
const unsigned lane = tid & 31;
const unsigned warp = tid >> 5;
const int64_t base = int64_t(row) * D;
__shared__ float partial[32];

float acc = 0.0f;
for (int i = int(tid); i < D; i += int(nt)) {
  const T hv = static_cast<T>(float(x[base + i]) + float(r[base + i]));
  h[base + i] = hv;
  const float hf = float(hv);
  acc += hf * hf;
}
for (int m = 16; m > 0; m >>= 1) {
  acc += __shfl_xor_sync(0xffffffffu, acc, m);
}
if (lane == 0) {
  partial[warp] = acc;
}
__syncthreads();
if (warp == 0) {
  float v = lane < (nt + 31) / 32 ? partial[lane] : 0.0f;
  for (int m = 16; m > 0; m >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, m);
  }
  if (lane == 0) {
    partial[0] = v;
  }
}
__syncthreads();
const float rs = 1.0f / sqrtf(partial[0] * (1.0f / float(D)) + float(e[0]));
if (tid == 0) {
  rstd[row] = rs;
}
for (int i = int(tid); i < D; i += int(nt)) {
  const T n = static_cast<T>(float(h[base + i]) * rs);
  y[base + i] = HAS_WEIGHT ? static_cast<T>(float(n) * float(w[i])) : n;
}
