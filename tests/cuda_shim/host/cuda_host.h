// Host stand-in for the CUDA device environment of a mx.fast.cuda_kernel, so
// that a rendered kernel compiles as plain C++17 (g++) and runs on the CPU:
// the CUDA keywords are defined away, the built-in index variables are
// globals set by the generated entry point (tests/cuda_shim/host.py), and
// __half / __nv_bfloat16 are 16-bit structs with round-to-nearest-even
// conversions. Replaces PRELUDE's "mlx/backend/cuda/device/utils.cuh".
// Block-level CUDA (__syncthreads, __shared__, warp shuffles, mma.sync) runs the
// block's threads as fibers (gpu_threads.h); see the end of this file.
#pragma once
#include <math.h>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
// One block runs at a time, so a block's shared memory can be a function-local static.
#define __shared__ static
// Tells common.cu to route mma.sync to the host implementation below.
#define FUSION_CUDA_HOST 1

using std::isnan;

struct dim3 {
  unsigned x, y, z;
};
// One thread at a time runs the kernel: these are set before each call.
static dim3 gridDim = {1, 1, 1}, blockDim = {1, 1, 1}, blockIdx = {0, 0, 0}, threadIdx = {0, 0, 0};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }

// --- float16: IEEE binary16 bits; conversions by bit manipulation, RNE -------
namespace fusion_host {
inline float half_bits_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: value = man * 2^-24
      float f = std::ldexp(float(man), -24);
      return (h & 0x8000u) ? -f : f;
    }
  } else {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  }
  return __uint_as_float(u);
}

inline uint16_t float_to_half_bits(float f) {
  uint32_t u = __float_as_uint(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) {  // inf or nan
    return sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u);
  }
  if (a >= 0x477ff000u) {  // rounds to >= 65520: overflow to inf
    return sign | 0x7c00u;
  }
  if (a < 0x38800000u) {  // below the smallest normal (2^-14): subnormal or zero
    // value in units of 2^-24, rounded to nearest even (exact in double)
    double v = double(__uint_as_float(a)) * 16777216.0;
    double r = std::nearbyint(v);  // default rounding mode: to nearest even
    return sign | uint16_t(r);
  }
  uint32_t exp = (a >> 23) - 112u;
  uint32_t man = a & 0x7fffffu;
  uint32_t bits = (exp << 10) | (man >> 13);
  uint32_t rest = man & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (bits & 1u))) {
    bits += 1;  // may carry into the exponent: still correct
  }
  return sign | uint16_t(bits);
}

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u = __float_as_uint(f);
  if (std::isnan(f)) {
    return uint16_t(((u >> 16) & 0x8000u) | 0x7fc0u);
  }
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
}  // namespace fusion_host

struct __half {
  uint16_t bits;
  __half() = default;
  __half(float f) : bits(fusion_host::float_to_half_bits(f)) {}
  __half(double f) : bits(fusion_host::float_to_half_bits(float(f))) {}
  explicit __half(int i) : bits(fusion_host::float_to_half_bits(float(i))) {}
  operator float() const { return fusion_host::half_bits_to_float(bits); }
};
static_assert(sizeof(__half) == 2, "__half must be 16 bits");

struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : bits(fusion_host::float_to_bf16_bits(f)) {}
  __nv_bfloat16(double f) : bits(fusion_host::float_to_bf16_bits(float(f))) {}
  explicit __nv_bfloat16(int i) : bits(fusion_host::float_to_bf16_bits(float(i))) {}
  operator float() const { return __uint_as_float(uint32_t(bits) << 16); }
};
static_assert(sizeof(__nv_bfloat16) == 2, "__nv_bfloat16 must be 16 bits");

inline float __half2float(__half h) { return float(h); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __float2half(float f) { return __half(f); }
inline __half __ushort_as_half(unsigned short u) {
  __half h;
  h.bits = u;
  return h;
}
inline unsigned short __half_as_ushort(__half h) { return h.bits; }

inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
  __nv_bfloat16 h;
  h.bits = u;
  return h;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }

namespace cuda {
namespace std {
using ::std::array;
using ::std::int32_t;
using ::std::int64_t;
}  // namespace std
}  // namespace cuda

namespace cooperative_groups {}

#define MAX_NDIM 10
namespace mlx::core::cu {
using Shape = std::array<int32_t, MAX_NDIM>;
using Strides = std::array<int64_t, MAX_NDIM>;
}  // namespace mlx::core::cu

// --- block-level CUDA on fibers (tests/gpu_threads/gpu_threads.h) -------------
#include "gpu_threads.h"

inline void __syncthreads() { gpu_threads::barrier(); }

enum { FUSION_HOST_SYNCWARP = 1, FUSION_HOST_SHFL, FUSION_HOST_MMA };

inline void __syncwarp(unsigned = 0xffffffffu) {
  char none = 0;
  gpu_threads::warp_exchange(FUSION_HOST_SYNCWARP, &none, 1);
}

// __shfl_*_sync on 32-bit values (the full-warp mask is the only one modelled).
template <typename V>
V fusion_host_shfl(V v, int src) {
  static_assert(sizeof(V) <= 8, "shuffle of a value wider than 8 bytes");
  const unsigned char* table = gpu_threads::warp_exchange(FUSION_HOST_SHFL, &v, sizeof(V));
  const unsigned lanes = gpu_threads::warp_lanes();
  V out;
  std::memcpy(&out, table + (unsigned(src) % lanes) * gpu_threads::MAX_PAYLOAD, sizeof(V));
  return out;
}
template <typename V>
V __shfl_sync(unsigned, V v, int src, int width = 32) {
  const int lane = int(gpu_threads::lane_index());
  return fusion_host_shfl(v, (lane / width) * width + src % width);
}
template <typename V>
V __shfl_xor_sync(unsigned, V v, int mask, int width = 32) {
  const int lane = int(gpu_threads::lane_index());
  return fusion_host_shfl(v, (lane / width) * width + ((lane % width) ^ mask) % width);
}
template <typename V>
V __shfl_down_sync(unsigned, V v, unsigned delta, int width = 32) {
  const int lane = int(gpu_threads::lane_index());
  const int src = (lane % width) + int(delta);
  return fusion_host_shfl(v, src < width ? lane + int(delta) : lane);
}
template <typename V>
V __shfl_up_sync(unsigned, V v, unsigned delta, int width = 32) {
  const int lane = int(gpu_threads::lane_index());
  return fusion_host_shfl(v, (lane % width) >= int(delta) ? lane - int(delta) : lane);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, D = A * B + C, for
// the whole warp: every lane posts its fragments, and each lane's D is computed from
// the full A (16 x 16), B (16 x 8) and C (16 x 8) rebuilt with the fragment layouts of
// the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type"), with
// g = lane >> 2 (groupID) and t = lane % 4 (threadID_in_group):
//   A: a_i (two elements per register, the lower index in the low 16 bits) at
//      row g + 8 * ((i >> 1) & 1), column 2t + (i & 1) + 8 * (i >= 4)
//   B: b_i at k = 2t + (i & 1) + 8 * (i >= 2), n = g
//   C, D: c_i at row g + 8 * (i >= 2), column 2t + (i & 1)
// The products are summed in double and rounded once to float32 (tensor cores
// accumulate in float32 in an unspecified order: the tests allow for that).
inline float fusion_host_mma_elem(bool bf16, unsigned word, int half) {
  const uint16_t bits = uint16_t(word >> (16 * half));
  return bf16 ? __uint_as_float(uint32_t(bits) << 16) : fusion_host::half_bits_to_float(bits);
}

inline void fusion_host_mma_m16n8k16(const char* type, float* c, unsigned a0, unsigned a1, unsigned a2,
                                     unsigned a3, unsigned b0, unsigned b1) {
  struct Fragments {
    unsigned a[4], b[2];
    float c[4];
  } mine = {{a0, a1, a2, a3}, {b0, b1}, {c[0], c[1], c[2], c[3]}};
  static_assert(sizeof(Fragments) <= gpu_threads::MAX_PAYLOAD, "fragments too large");
  if (gpu_threads::warp_lanes() != 32) gpu_threads::fail("mma.sync needs a full warp");
  const bool bf16 = std::strcmp(type, "bf16") == 0;
  const unsigned char* table = gpu_threads::warp_exchange(FUSION_HOST_MMA, &mine, sizeof(mine));
  float A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < 32; lane++) {
    Fragments f;
    std::memcpy(&f, table + lane * gpu_threads::MAX_PAYLOAD, sizeof(f));
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 8; i++) {
      A[g + 8 * ((i >> 1) & 1)][2 * t + (i & 1) + 8 * (i >= 4)] = fusion_host_mma_elem(bf16, f.a[i / 2], i & 1);
    }
    for (int i = 0; i < 4; i++) {
      B[2 * t + (i & 1) + 8 * (i >= 2)][g] = fusion_host_mma_elem(bf16, f.b[i / 2], i & 1);
      C[g + 8 * (i >= 2)][2 * t + (i & 1)] = f.c[i];
    }
  }
  const int lane = int(gpu_threads::lane_index()), g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; i++) {
    const int row = g + 8 * (i >= 2), col = 2 * t + (i & 1);
    double s = C[row][col];
    for (int k = 0; k < 16; k++) s += double(A[row][k]) * double(B[k][col]);
    c[i] = float(s);
  }
}

// The generated entry's per-fiber hook: threadIdx is a global, set on every resume.
inline void fusion_host_set_thread(unsigned t) { threadIdx = dim3{t, 0, 0}; }
