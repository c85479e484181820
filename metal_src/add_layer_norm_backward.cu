// Backward of add_layer_norm: dx (= dr) = dh + rstd * (g - mean(g) - n * mean(g * n)) per row,
// with g = dy * w (dy without a weight) and n = (h - mean) * rstd. Twin of
// add_layer_norm_backward.metal; launch as add_layer_norm.cu; mean and rstd are the forward's
// float32 (rows,) outputs. Both sums in one pass, float32; dw and db are reduced by the caller.
const int D = h_shape[h_ndim - 1];
const unsigned row = blockIdx.x;
const unsigned tid = threadIdx.x;
const unsigned nt = blockDim.x;
const unsigned lane = tid & 31;
const unsigned warp = tid >> 5;
const unsigned groups = (nt + 31) / 32;
const int64_t base = int64_t(row) * D;
const float mu = float(mean[row]);
const float rs = float(rstd[row]);
__shared__ float g_sums[32];
__shared__ float gn_sums[32];

float acc_g = 0.0f;
float acc_gn = 0.0f;
for (int i = int(tid); i < D; i += int(nt)) {
  const float g = HAS_WEIGHT ? float(dy[base + i]) * float(w[i]) : float(dy[base + i]);
  acc_g += g;
  acc_gn += g * (float(h[base + i]) - mu) * rs;
}
for (int m = 16; m > 0; m >>= 1) {
  acc_g += __shfl_xor_sync(0xffffffffu, acc_g, m);
  acc_gn += __shfl_xor_sync(0xffffffffu, acc_gn, m);
}
if (lane == 0) {
  g_sums[warp] = acc_g;
  gn_sums[warp] = acc_gn;
}
__syncthreads();
if (warp == 0) {
  float a = lane < groups ? g_sums[lane] : 0.0f;
  float c = lane < groups ? gn_sums[lane] : 0.0f;
  for (int m = 16; m > 0; m >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, m);
    c += __shfl_xor_sync(0xffffffffu, c, m);
  }
  if (lane == 0) {
    g_sums[0] = a;
    gn_sums[0] = c;
  }
}
__syncthreads();
const float mean_g = g_sums[0] * (1.0f / float(D));
const float mean_gn = gn_sums[0] * (1.0f / float(D));
for (int i = int(tid); i < D; i += int(nt)) {
  const float g = HAS_WEIGHT ? float(dy[base + i]) * float(w[i]) : float(dy[base + i]);
  const float n = (float(h[base + i]) - mu) * rs;
  dx[base + i] = static_cast<T>(float(dh[base + i]) + rs * (g - mean_g - n * mean_gn));
}
