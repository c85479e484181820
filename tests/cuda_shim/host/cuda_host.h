// Host stand-in for the CUDA device environment of a mx.fast.cuda_kernel, so
// that a rendered kernel compiles as plain C++17 (g++) and runs on the CPU:
// the CUDA keywords are defined away, the built-in index variables are
// globals set by the generated entry point (tests/cuda_shim/host.py), and
// __half / __nv_bfloat16 are 16-bit structs with round-to-nearest-even
// conversions. Replaces PRELUDE's "mlx/backend/cuda/device/utils.cuh".
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
