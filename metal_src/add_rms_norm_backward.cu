// Backward of add_rms_norm: dx (= dr) = dh + rstd * (g - n * mean(g * n)) per row, with
// g = dy * w (dy without a weight), n = h * rstd. Twin of add_rms_norm_backward.metal;
// launch as add_rms_norm.cu (one block per row of the row-contiguous (rows, D) h, dy, dh;
// rstd float32 (rows,), saved by the forward). All arithmetic in float32; dw is reduced
// over rows by the caller.
const int D = h_shape[h_ndim - 1];
const unsigned row = blockIdx.x;
const unsigned tid = threadIdx.x;
const unsigned nt = blockDim.x;
const unsigned lane = tid & 31;
const unsigned warp = tid >> 5;
const int64_t base = int64_t(row) * D;
const float rs = float(rstd[row]);
__shared__ float partial[32];

float acc = 0.0f;
for (int i = int(tid); i < D; i += int(nt)) {
  const float g = HAS_WEIGHT ? float(dy[base + i]) * float(w[i]) : float(dy[base + i]);
  acc += g * float(h[base + i]);
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
// mean(g * n) * rstd = sum(g * h) * rstd^2 / D
const float c = partial[0] * rs * rs * (1.0f / float(D));
for (int i = int(tid); i < D; i += int(nt)) {
  const float g = HAS_WEIGHT ? float(dy[base + i]) * float(w[i]) : float(dy[base + i]);
  dx[base + i] = static_cast<T>(float(dh[base + i]) + rs * (g - float(h[base + i]) * c));
}
