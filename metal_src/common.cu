// mlx-fusion: helpers shared by every CUDA kernel (passed as `header` to
// mx.fast.cuda_kernel; MLX has already included cuda_fp16/cuda_bf16 and its
// device utils). Twin of common.metal: same functions, same constants, same
// math, plus 16-byte vector loads/stores.
//
// All arithmetic is done in float32 and rounded once on store.
//
// Lines from `// @only NAME` to `// @end` reach only the kernels whose KernelSpec lists NAME
// in `header_parts` (MLX hashes a kernel's whole source on every launch).

// No #include here: NVRTC has no <cstdint>; MLX's device headers (included
// before this header) already define int64_t.

// Op and activation codes arrive at run time (see common.metal for why). Unknown codes
// are an error: the math functions return NaN for them, and FUSION_DISPATCH runs the
// FUSION_INVALID instantiation, whose every output element is NaN.
#define FUSION_INVALID -1
#define FUSION_RELU 0
#define FUSION_GELU 1
#define FUSION_GELU_APPROX 2
#define FUSION_SILU 3

#define FUSION_ADD 0
#define FUSION_SUB 1
#define FUSION_MUL 2
#define FUSION_DIV 3

__device__ __forceinline__ float fusion_nan() { return __uint_as_float(0x7fc00000u); }

__device__ __forceinline__ float fusion_sigmoid(float x) {
  float y = 1.0f / (1.0f + expf(-fabsf(x)));
  return (x < 0.0f) ? 1.0f - y : y;
}

__device__ __forceinline__ float fusion_binary(int op, float a, float b) {
  switch (op) {
    case FUSION_ADD:
      return a + b;
    case FUSION_SUB:
      return a - b;
    case FUSION_MUL:
      return a * b;
    case FUSION_DIV:
      return a / b;
    default:
      return fusion_nan();
  }
}

__device__ __forceinline__ float fusion_activation(int act, float z) {
  switch (act) {
    case FUSION_RELU:
      return (z > 0.0f || isnan(z)) ? z : 0.0f;
    case FUSION_GELU:
      return z * (1.0f + erff(z * 0.70710678118654752f)) * 0.5f;
    case FUSION_GELU_APPROX: {
      float u = 0.79788456080286536f * (z + 0.044715f * z * z * z);
      return 0.5f * z * (1.0f + tanhf(u));
    }
    case FUSION_SILU:
      return z * fusion_sigmoid(z);
    default:
      return fusion_nan();
  }
}

__device__ __forceinline__ float fusion_activation_grad(int act, float z) {
  switch (act) {
    case FUSION_RELU:
      return z > 0.0f ? 1.0f : 0.0f;
    case FUSION_GELU: {
      float cdf = 0.5f * (1.0f + erff(z * 0.70710678118654752f));
      float pdf = 0.39894228040143268f * expf(-0.5f * z * z);
      return cdf + z * pdf;
    }
    case FUSION_GELU_APPROX: {
      float z2 = z * z;
      float t = tanhf(0.79788456080286536f * (z + 0.044715f * z2 * z));
      // 3 * z^2 first, as MLX's autodiff of z**3 forms it: it overflows (and the
      // derivative turns NaN) at the same |z|, ~1.06e19, as the unfused gradient.
      return 0.5f * (1.0f + t) +
          0.5f * z * (1.0f - t * t) * 0.79788456080286536f * (1.0f + 0.044715f * (3.0f * z2));
    }
    case FUSION_SILU: {
      float s = fusion_sigmoid(z);
      return s * (1.0f + z * (1.0f - s));
    }
    default:
      return fusion_nan();
  }
}

// Shape / Strides are MLX's fixed-size arrays passed by value.
template <typename S>
__device__ __forceinline__ int64_t fusion_size(const S& shape, int ndim) {
  int64_t n = 1;
  for (int d = 0; d < ndim; d++) {
    n *= shape[d];
  }
  return n;
}

// 0: row contiguous; >0: leading strides 0 and a contiguous trailing block of
// that many elements (element i at i % block); -1: general strides.
template <typename S, typename St>
__device__ __forceinline__ int64_t fusion_layout(const S& shape, const St& strides, int ndim) {
  int64_t expected = 1;
  int d = ndim - 1;
  for (; d >= 0; d--) {
    if (shape[d] != 1 && strides[d] != expected) {
      break;
    }
    expected *= shape[d];
  }
  if (d < 0) {
    return 0;
  }
  int64_t block = expected;
  for (; d >= 0; d--) {
    if (shape[d] != 1 && strides[d] != 0) {
      return -1;
    }
  }
  return block;
}

template <typename S, typename St>
__device__ __forceinline__ int64_t fusion_offset(int64_t i, const S& shape, const St& strides, int ndim) {
  int64_t loc = 0;
  for (int d = ndim - 1; d >= 0 && i > 0; d--) {
    loc += (i % shape[d]) * strides[d];
    i /= shape[d];
  }
  return loc;
}

template <typename T>
__device__ __forceinline__ float fusion_float(T x) {
  return static_cast<float>(x);
}

// Elements <-> the 32-bit words of a 16-byte vector, by shifts and masks on
// registers. (Reading a __half/__nv_bfloat16 array through a pointer to a
// local uint4 can force it into local memory: see docs/performance.md.)
template <typename T>
struct FusionBits;

template <>
struct FusionBits<float> {
  static constexpr int per_word = 1;
  __device__ static float get(unsigned w, int) { return __uint_as_float(w); }
  __device__ static unsigned put(unsigned, int, float v) { return __float_as_uint(v); }
};

template <>
struct FusionBits<__half> {
  static constexpr int per_word = 2;
  __device__ static float get(unsigned w, int i) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> (16 * i))));
  }
  __device__ static unsigned put(unsigned w, int i, float v) {
    unsigned bits = __half_as_ushort(__float2half_rn(v));
    return (w & ~(0xffffu << (16 * i))) | (bits << (16 * i));
  }
};

// bfloat16 is the top half of a float32: widening is a shift, and narrowing
// rounds to nearest even with integer ops (NaN stays a quiet NaN), so no
// conversion routine is involved.
template <>
struct FusionBits<__nv_bfloat16> {
  static constexpr int per_word = 2;
  __device__ static float get(unsigned w, int i) {
    return __uint_as_float(i ? (w & 0xffff0000u) : (w << 16));
  }
  __device__ static unsigned put(unsigned w, int i, float v) {
    unsigned u = __float_as_uint(v);
    unsigned bits = isnan(v) ? 0x7fc0u : ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return (w & ~(0xffffu << (16 * i))) | (bits << (16 * i));
  }
};

template <typename T>
__device__ __forceinline__ bool fusion_aligned(const T* p) {
  return (reinterpret_cast<unsigned long long>(p) & 15) == 0;
}

// Layout of an operand of an n-element output; a one-element operand is a row
// broadcast of block 1 (see common.metal).
template <typename S, typename St>
__device__ __forceinline__ int64_t fusion_operand_layout(int64_t n, const S& shape, const St& strides, int ndim) {
  return (fusion_size(shape, ndim) == 1 && n != 1) ? 1 : fusion_layout(shape, strides, ndim);
}

// W consecutive elements starting at `base` (a multiple of W) as floats.
// Full and row-broadcast operands use one 16-byte load when aligned and in
// bounds; a one-element operand is read once; the rest use element loads.
template <int W, typename T, typename S, typename St>
__device__ __forceinline__ void fusion_load(
    float* dst, const T* x, int64_t base, int64_t n, int64_t layout,
    const S& shape, const St& strides, int ndim) {
  if (layout == 1) {
    float v = fusion_float(x[0]);
#pragma unroll
    for (int k = 0; k < W; k++) {
      dst[k] = v;
    }
  } else {
    if (layout >= 0 && base + W <= n && (layout == 0 || layout % W == 0)) {
      const T* p = x + (layout == 0 ? base : base % layout);
      if (fusion_aligned(p)) {
        uint4 raw = *reinterpret_cast<const uint4*>(p);
        unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
        constexpr int P = FusionBits<T>::per_word;
#pragma unroll
        for (int k = 0; k < W; k++) {
          dst[k] = FusionBits<T>::get(words[k / P], k % P);
        }
        return;
      }
    }
#pragma unroll
    for (int k = 0; k < W; k++) {
      int64_t i = base + k;
      if (i < n) {
        int64_t off = layout == 0 ? i : (layout > 0 ? i % layout : fusion_offset(i, shape, strides, ndim));
        dst[k] = fusion_float(x[off]);
      } else {
        dst[k] = 0.0f;
      }
    }
  }
}

template <int W, typename T>
__device__ __forceinline__ void fusion_store(T* out, int64_t base, int64_t n, const float* src) {
  if (base + W <= n && fusion_aligned(out + base)) {
    unsigned words[4] = {0u, 0u, 0u, 0u};
    constexpr int P = FusionBits<T>::per_word;
#pragma unroll
    for (int k = 0; k < W; k++) {
      words[k / P] = FusionBits<T>::put(words[k / P], k % P, src[k]);
    }
    *reinterpret_cast<uint4*>(out + base) = make_uint4(words[0], words[1], words[2], words[3]);
  } else {
    for (int k = 0; k < W && base + k < n; k++) {
      out[base + k] = T(src[k]);
    }
  }
}

// ---------------------------------------------------------------------------
// Whole-kernel loops, one per kernel family, with op and activation as
// compile-time constants. Each thread classifies the operand layouts once and
// then walks the array in 16-byte vectors with a grid-stride loop, several
// vectors per thread: classifying per vector cost 22% of the bandwidth for
// bfloat16 on an H100, and unrolling several vectors per thread (more
// registers) cost more than it hid (docs/performance.md).
// FUSION_DISPATCH picks the instantiation once per thread.

#define FUSION_GRID_LOOP(base, n)                                                  \
  const int64_t fusion_step = int64_t(gridDim.x) * blockDim.x * W;                  \
  _Pragma("unroll 1") for (int64_t base = (int64_t(blockIdx.x) * blockDim.x +     \
                                           threadIdx.x) * W;                       \
                           base < (n); base += fusion_step)

// @only binary
template <int OP, int ACT, int W, typename T, typename S, typename St>
__device__ __forceinline__ void fusion_binary_kernel(
    const T* a, const T* b, T* out, int64_t n,
    int64_t la, const S& as, const St& ast, int andim,
    int64_t lb, const S& bs, const St& bst, int bndim) {
  FUSION_GRID_LOOP(base, n) {
    float x[W], y[W];
    fusion_load<W>(x, a, base, n, la, as, ast, andim);
    fusion_load<W>(y, b, base, n, lb, bs, bst, bndim);
#pragma unroll
    for (int k = 0; k < W; k++) {
      x[k] = fusion_activation(ACT, fusion_binary(OP, x[k], y[k]));
    }
    fusion_store<W>(out, base, n, x);
  }
}
// @end

// @only binary_backward
// dz = g * act'(a op b); add/sub write dz to da only, mul/div both operand gradients.
template <int OP, int ACT, int W, typename T, typename S, typename St>
__device__ __forceinline__ void fusion_binary_backward_kernel(
    const T* a, const T* b, const T* g, T* da, T* db, int64_t n,
    int64_t la, const S& as, const St& ast, int andim,
    int64_t lb, const S& bs, const St& bst, int bndim,
    int64_t lg, const S& gs, const St& gst, int gndim) {
  FUSION_GRID_LOOP(base, n) {
    float x[W], y[W], d[W];
    fusion_load<W>(x, a, base, n, la, as, ast, andim);
    fusion_load<W>(y, b, base, n, lb, bs, bst, bndim);
    fusion_load<W>(d, g, base, n, lg, gs, gst, gndim);
#pragma unroll
    for (int k = 0; k < W; k++) {
      float dz = d[k] * fusion_activation_grad(ACT, fusion_binary(OP, x[k], y[k]));
      if constexpr (OP == FUSION_MUL) {
        d[k] = dz * y[k];
        y[k] = dz * x[k];
      } else if constexpr (OP == FUSION_DIV) {
        d[k] = dz / y[k];
        y[k] = -(dz * x[k]) / (y[k] * y[k]);
      } else {
        d[k] = dz;
      }
    }
    fusion_store<W>(da, base, n, d);
    if constexpr (OP == FUSION_MUL || OP == FUSION_DIV) {
      fusion_store<W>(db, base, n, y);
    }
  }
}
// @end

// @only affine
template <int ACT, int W, typename T, typename S>
__device__ __forceinline__ void fusion_affine_kernel(
    const T* x, T* out, int64_t n, float scale, float shift, const S& xs, int xndim) {
  FUSION_GRID_LOOP(base, n) {
    float v[W];
    fusion_load<W>(v, x, base, n, 0, xs, xs, xndim);
#pragma unroll
    for (int k = 0; k < W; k++) {
      v[k] = fusion_activation(ACT, v[k] * scale + shift);
    }
    fusion_store<W>(out, base, n, v);
  }
}
// @end

// @only affine_backward
template <int ACT, int W, typename T, typename S>
__device__ __forceinline__ void fusion_affine_backward_kernel(
    const T* x, const T* g, T* dx, int64_t n, float scale, float shift, const S& xs, int xndim) {
  FUSION_GRID_LOOP(base, n) {
    float v[W], d[W];
    fusion_load<W>(v, x, base, n, 0, xs, xs, xndim);
    fusion_load<W>(d, g, base, n, 0, xs, xs, xndim);
#pragma unroll
    for (int k = 0; k < W; k++) {
      d[k] = d[k] * fusion_activation_grad(ACT, v[k] * scale + shift) * scale;
    }
    fusion_store<W>(dx, base, n, d);
  }
}
// @end

// Codes outside the tables (op or act not in 0..3) select FUSION_INVALID: NaN output.
#define FUSION_DISPATCH(op, act, F, W, ...)                                          \
  switch ((unsigned(op) < 4u && unsigned(act) < 4u) ? (op) * 4 + (act) : -1) {      \
    case 0: F<0, 0, W>(__VA_ARGS__); break;                                          \
    case 1: F<0, 1, W>(__VA_ARGS__); break;                                          \
    case 2: F<0, 2, W>(__VA_ARGS__); break;                                          \
    case 3: F<0, 3, W>(__VA_ARGS__); break;                                          \
    case 4: F<1, 0, W>(__VA_ARGS__); break;                                          \
    case 5: F<1, 1, W>(__VA_ARGS__); break;                                          \
    case 6: F<1, 2, W>(__VA_ARGS__); break;                                          \
    case 7: F<1, 3, W>(__VA_ARGS__); break;                                          \
    case 8: F<2, 0, W>(__VA_ARGS__); break;                                          \
    case 9: F<2, 1, W>(__VA_ARGS__); break;                                          \
    case 10: F<2, 2, W>(__VA_ARGS__); break;                                         \
    case 11: F<2, 3, W>(__VA_ARGS__); break;                                         \
    case 12: F<3, 0, W>(__VA_ARGS__); break;                                         \
    case 13: F<3, 1, W>(__VA_ARGS__); break;                                         \
    case 14: F<3, 2, W>(__VA_ARGS__); break;                                         \
    case 15: F<3, 3, W>(__VA_ARGS__); break;                                         \
    default: F<FUSION_INVALID, FUSION_INVALID, W>(__VA_ARGS__); break;               \
  }

#define FUSION_DISPATCH_ACT(act, F, W, ...)               \
  switch (unsigned(act) < 4u ? (act) : -1) {              \
    case 0: F<0, W>(__VA_ARGS__); break;                  \
    case 1: F<1, W>(__VA_ARGS__); break;                  \
    case 2: F<2, W>(__VA_ARGS__); break;                  \
    case 3: F<3, W>(__VA_ARGS__); break;                  \
    default: F<FUSION_INVALID, W>(__VA_ARGS__); break;    \
  }

// @only mma
// --- linear_activation: tensor-core tiles for small-M GEMMs -------------------
// One m16n8k16 MMA (16-bit inputs, float32 accumulate) on 32-bit words holding
// two elements each. Fragment layouts: PTX ISA, "Matrix Fragments for
// mma.m16n8k16 with floating point type". The CPU shim (tests/cuda_shim, which
// defines FUSION_CUDA_HOST) runs the same instruction for a warp of fibers.
template <typename T>
struct FusionMma;

#if defined(__CUDA_ARCH__)
#define FUSION_MMA_ASM(PTX)                                                                   \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX "." PTX                          \
               ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"               \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                              \
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#elif defined(FUSION_CUDA_HOST)
#define FUSION_MMA_ASM(PTX) fusion_host_mma_m16n8k16(PTX, c, a0, a1, a2, a3, b0, b1);
#else
#define FUSION_MMA_ASM(PTX)
#endif

#define FUSION_MMA(CT, PTX)                                                                   \
  template <>                                                                                 \
  struct FusionMma<CT> {                                                                      \
    __device__ static void run(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3,  \
                               unsigned b0, unsigned b1) {                                    \
      FUSION_MMA_ASM(PTX)                                                                     \
    }                                                                                         \
  };

FUSION_MMA(__nv_bfloat16, "bf16")
FUSION_MMA(__half, "f16")

// Eight consecutive 16-bit elements as one 16-byte word vector (zeros when !ok);
// element loads where the rows are not 16-byte aligned.
template <typename T>
__device__ __forceinline__ uint4 fusion_load8(const T* p, bool ok, bool aligned) {
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (ok) {
    if (aligned) {
      v = *reinterpret_cast<const uint4*>(p);
    } else {
      const unsigned short* q = reinterpret_cast<const unsigned short*>(p);
      v.x = q[0] | (unsigned(q[1]) << 16);
      v.y = q[2] | (unsigned(q[3]) << 16);
      v.z = q[4] | (unsigned(q[5]) << 16);
      v.w = q[6] | (unsigned(q[7]) << 16);
    }
  }
  return v;
}
// @end
