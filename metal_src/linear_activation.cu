// z = x @ w.T + b and out = act(z) for a small number of rows M (decode-like
// shapes), one kernel: the GEMM's epilogue adds the bias and applies the
// activation in float32 registers, then rounds once. Twin of
// linear_activation.metal. Templates: T (half/bfloat16), MT (M <= 16 * MT),
// NT (8-column tiles per block), HAS_BIAS. Caller guarantees K % 8 == 0 and
// row-contiguous x (M, K), w (N, K); p[2] = activation code.
//
// A block of 8 warps owns 8 * NT output columns and all rows; warp j sums the
// 32-wide K chunks j, j + 8, ... with m16n8k16 tensor-core MMAs whose A and B
// fragments come straight from global memory as 16-byte loads: lane (g, t)
// loads w[col g][k + 8t .. k + 8t + 8) and x[row g (and g + 8)][same k]. Since a
// dot product does not care about the order of k, the MMA's logical k index is
// mapped to those 8 physical elements identically in A and B (words 0-1 feed
// the first MMA, words 2-3 the second). The 8 partial tiles meet in shared
// memory, where the epilogue runs.
constexpr int WARPS = 8;
constexpr int U = 4;  // K chunks whose loads are issued before their MMAs
const int M = x_shape[0];
const int K = x_shape[1];
const int N = w_shape[0];
const int lane = threadIdx.x & 31;
const int warp = threadIdx.x >> 5;
const int g = lane >> 2;
const int t = lane & 3;
const int n0 = blockIdx.x * (8 * NT);
const bool aligned = fusion_aligned(x) && fusion_aligned(w);

const T* xr[MT][2];
bool xok[MT][2];
#pragma unroll
for (int mt = 0; mt < MT; mt++) {
#pragma unroll
  for (int h = 0; h < 2; h++) {
    const int row = mt * 16 + g + 8 * h;
    xok[mt][h] = row < M;
    xr[mt][h] = x + int64_t(xok[mt][h] ? row : 0) * K;
  }
}
const T* wr[NT];
bool wok[NT];
#pragma unroll
for (int nt = 0; nt < NT; nt++) {
  const int col = n0 + nt * 8 + g;
  wok[nt] = col < N;
  wr[nt] = w + int64_t(wok[nt] ? col : 0) * K;
}

float acc[MT][NT][4] = {};

// The loop bound is the same for every lane of a warp: MMAs need the whole warp.
for (int kb = warp * 32; kb < K; kb += WARPS * 32 * U) {
  uint4 xv[U][MT][2];
  uint4 wv[U][NT];
#pragma unroll
  for (int u = 0; u < U; u++) {
    const int k = kb + u * WARPS * 32 + 8 * t;
    const bool kin = k < K;
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
      for (int h = 0; h < 2; h++) {
        xv[u][mt][h] = fusion_load8(xr[mt][h] + k, kin && xok[mt][h], aligned);
      }
    }
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
      wv[u][nt] = fusion_load8(wr[nt] + k, kin && wok[nt], aligned);
    }
  }
#pragma unroll
  for (int u = 0; u < U; u++) {
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
      for (int nt = 0; nt < NT; nt++) {
        FusionMma<T>::run(acc[mt][nt], xv[u][mt][0].x, xv[u][mt][1].x, xv[u][mt][0].y, xv[u][mt][1].y,
                          wv[u][nt].x, wv[u][nt].y);
        FusionMma<T>::run(acc[mt][nt], xv[u][mt][0].z, xv[u][mt][1].z, xv[u][mt][0].w, xv[u][mt][1].w,
                          wv[u][nt].z, wv[u][nt].w);
      }
    }
  }
}

// Epilogue: sum the warps' partial tiles, add the bias, activate, round once.
// Accumulator c of tile (mt, nt) in lane (g, t) is row mt*16 + g (+8 for c >= 2),
// column nt*8 + 2t (+1 for odd c).
constexpr int R = MT * NT * 4;
__shared__ float partial[WARPS][R][32];
#pragma unroll
for (int mt = 0; mt < MT; mt++) {
#pragma unroll
  for (int nt = 0; nt < NT; nt++) {
#pragma unroll
    for (int c = 0; c < 4; c++) {
      partial[warp][(mt * NT + nt) * 4 + c][lane] = acc[mt][nt][c];
    }
  }
}
__syncthreads();
const int act = int(p[2]);
for (int e = threadIdx.x; e < R * 32; e += WARPS * 32) {
  const int r = e >> 5;
  const int l = e & 31;
  const int c = r & 3;
  const int row = (r / (NT * 4)) * 16 + (l >> 2) + ((c & 2) ? 8 : 0);
  const int col = n0 + ((r >> 2) % NT) * 8 + 2 * (l & 3) + (c & 1);
  if (row < M && col < N) {
    float v = 0.0f;
#pragma unroll
    for (int j = 0; j < WARPS; j++) {
      v += partial[j][r][l];
    }
    if (HAS_BIAS) {
      v += fusion_float(b[col]);
    }
    const int64_t o = int64_t(row) * N + col;
    z[o] = static_cast<T>(v);
    out[o] = static_cast<T>(fusion_activation(act, v));
  }
}
