// h = x + r, y = layer_norm(h, w, b, eps), and per row the float32 mean and
// rstd = 1/sqrt(var + eps), one kernel. Twin of add_layer_norm.metal: same inputs (x, r, w, b, e),
// outputs (h, y, mean, rstd), templates (T, HAS_WEIGHT, HAS_BIAS) and launch as
// add_rms_norm.cu (one block per row of the row-contiguous (rows, D) x and r).
//
// h is rounded to T as the unfused add rounds it. Two reductions in float32, as MLX's
// decomposition computes them: mean = sum(h) / D, then var = sum((h - mean)^2) / D (each
// per thread, __shfl_xor_sync per warp, warp 0 over the partial sums). y rounds like MLX:
// T(T(T((h - mean) * rstd) * w) + b).
const int D = x_shape[x_ndim - 1];
const unsigned row = blockIdx.x;
const unsigned tid = threadIdx.x;
const unsigned nt = blockDim.x;
const unsigned lane = tid & 31;
const unsigned warp = tid >> 5;
const unsigned groups = (nt + 31) / 32;
const int64_t base = int64_t(row) * D;
const float inv_d = 1.0f / float(D);
__shared__ float sums[32];
__shared__ float squares[32];

float acc = 0.0f;
for (int i = int(tid); i < D; i += int(nt)) {
  const T hv = static_cast<T>(float(x[base + i]) + float(r[base + i]));
  h[base + i] = hv;
  acc += float(hv);
}
for (int m = 16; m > 0; m >>= 1) {
  acc += __shfl_xor_sync(0xffffffffu, acc, m);
}
if (lane == 0) {
  sums[warp] = acc;
}
__syncthreads();
if (warp == 0) {
  float v = lane < groups ? sums[lane] : 0.0f;
  for (int m = 16; m > 0; m >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, m);
  }
  if (lane == 0) {
    sums[0] = v;
  }
}
__syncthreads();
const float mu = sums[0] * inv_d;

float acc2 = 0.0f;
for (int i = int(tid); i < D; i += int(nt)) {
  const float c = float(h[base + i]) - mu;
  acc2 += c * c;
}
for (int m = 16; m > 0; m >>= 1) {
  acc2 += __shfl_xor_sync(0xffffffffu, acc2, m);
}
if (lane == 0) {
  squares[warp] = acc2;
}
__syncthreads();
if (warp == 0) {
  float v = lane < groups ? squares[lane] : 0.0f;
  for (int m = 16; m > 0; m >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, m);
  }
  if (lane == 0) {
    squares[0] = v;
  }
}
__syncthreads();
const float rs = 1.0f / sqrtf(squares[0] * inv_d + float(e[0]));
if (tid == 0) {
  mean[row] = mu;
  rstd[row] = rs;
}
for (int i = int(tid); i < D; i += int(nt)) {
  const T n = static_cast<T>((float(h[base + i]) - mu) * rs);
  const T scaled = HAS_WEIGHT ? static_cast<T>(float(n) * float(w[i])) : n;
  y[base + i] = HAS_BIAS ? static_cast<T>(float(scaled) + float(b[i])) : scaled;
}
