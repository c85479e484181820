// mlx-fusion: helpers shared by every Metal kernel (passed as `header` to
// mx.fast.metal_kernel). Twin: common.cu. Keep the two in step: same
// functions, same constants, same math.
//
// All arithmetic is done in float32 and rounded once on store, so a fused
// half/bfloat16 result is at least as accurate as the unfused chain.

#include <metal_stdlib>

// Op and activation codes arrive at run time in a small int32 array (m[0] =
// op, m[1] = act; scalar kernels read act from p[2]): one kernel per dtype
// instead of one per (op, activation, dtype) keeps the JIT work to a dozen
// kernels, and the branch is uniform across the grid, so it costs next to
// nothing in a memory-bound kernel.
// Activation codes; must match patterns.Activation.code (tests/test_activation_tables.py).
// An unknown op or activation code is an error, not a fall-through to the last case:
// the codes arrive at run time (no static_assert can see them) and Metal has no trap,
// so the math functions return NaN for them and the whole output is NaN-poisoned.
#define FUSION_RELU 0
#define FUSION_GELU 1
#define FUSION_GELU_APPROX 2
#define FUSION_SILU 3

// Binary op codes; must match patterns.BinaryOp.code.
#define FUSION_ADD 0
#define FUSION_SUB 1
#define FUSION_MUL 2
#define FUSION_DIV 3

// erf with < 1 ulp error: the same approximation MLX's own Metal erf uses
// (mlx/backend/metal/kernels/erf.h, after N. Juffa), so fused GELU tracks
// mlx.nn.gelu closely. Metal's standard library has no erf.
inline float fusion_erf(float a) {
  float r, s, t, u;
  t = metal::abs(a);
  s = a * a;
  if (t > 0.927734375f) {
    r = metal::fma(-1.72853470e-5f, t, 3.83197126e-4f);
    u = metal::fma(-3.88396438e-3f, t, 2.42546219e-2f);
    r = metal::fma(r, s, u);
    r = metal::fma(r, t, -1.06777877e-1f);
    r = metal::fma(r, t, -6.34846687e-1f);
    r = metal::fma(r, t, -1.28717512e-1f);
    r = metal::fma(r, t, -t);
    // r <= -0.93 here, so 1 - exp(r) loses nothing to cancellation.
    r = 1.0f - metal::exp(r);
    r = metal::copysign(r, a);
  } else {
    r = -5.96761703e-4f;
    r = metal::fma(r, s, 4.99119423e-3f);
    r = metal::fma(r, s, -2.67681349e-2f);
    r = metal::fma(r, s, 1.12819925e-1f);
    r = metal::fma(r, s, -3.76125336e-1f);
    r = metal::fma(r, s, 1.28379166e-1f);
    r = metal::fma(r, a, a);
  }
  return r;
}

// Numerically stable logistic function (as MLX's Sigmoid).
inline float fusion_sigmoid(float x) {
  float y = 1.0f / (1.0f + metal::exp(-metal::abs(x)));
  return (x < 0.0f) ? 1.0f - y : y;
}

inline float fusion_binary(int op, float a, float b) {
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
      return NAN;
  }
}

inline float fusion_activation(int act, float z) {
  switch (act) {
    case FUSION_RELU:
      // NaN propagates, as in MLX's maximum(z, 0).
      return (z > 0.0f || metal::isnan(z)) ? z : 0.0f;
    case FUSION_GELU:
      return z * (1.0f + fusion_erf(z * 0.70710678118654752f)) * 0.5f;
    case FUSION_GELU_APPROX: {
      float u = 0.79788456080286536f * (z + 0.044715f * z * z * z);
      return 0.5f * z * (1.0f + metal::precise::tanh(u));
    }
    case FUSION_SILU:
      return z * fusion_sigmoid(z);
    default:
      return NAN;
  }
}

// d activation / dz, written so that g * fusion_activation_grad(z) matches the
// gradient MLX's autodiff gives for the unfused expression.
inline float fusion_activation_grad(int act, float z) {
  switch (act) {
    case FUSION_RELU:
      // MLX: maximum's vjp multiplies the cotangent by (z > 0).
      return z > 0.0f ? 1.0f : 0.0f;
    case FUSION_GELU: {
      float cdf = 0.5f * (1.0f + fusion_erf(z * 0.70710678118654752f));
      float pdf = 0.39894228040143268f * metal::exp(-0.5f * z * z);
      return cdf + z * pdf;
    }
    case FUSION_GELU_APPROX: {
      float z2 = z * z;
      float t = metal::precise::tanh(0.79788456080286536f * (z + 0.044715f * z2 * z));
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
      return NAN;
  }
}

// Number of elements of an input from its shape buffer.
inline int64_t fusion_size(const constant int* shape, int ndim) {
  int64_t n = 1;
  for (int d = 0; d < ndim; d++) {
    n *= shape[d];
  }
  return n;
}

// How a kernel should index an input that was broadcast to the output shape:
//   0  row contiguous: element i is at i
//  >0  "row broadcast": leading strides are 0 and the trailing block of C
//      elements is contiguous, so element i is at i % C (a bias vector)
//  -1  anything else: walk the strides.
// Computed once per thread from the shape/strides MLX passes; it costs a loop
// over ndim and saves a division per dimension per element on the common paths.
inline int64_t fusion_layout(const constant int* shape, const constant int64_t* strides, int ndim) {
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

// Offset of logical element i of a strided array.
inline int64_t fusion_offset(int64_t i, const constant int* shape, const constant int64_t* strides, int ndim) {
  int64_t loc = 0;
  for (int d = ndim - 1; d >= 0 && i > 0; d--) {
    loc += (i % shape[d]) * strides[d];
    i /= shape[d];
  }
  return loc;
}

// Layout of an operand of an n-element output: a one-element operand is a
// row broadcast of block 1 (always element 0), so scalars need no template
// variant of their own.
inline int64_t fusion_operand_layout(
    int64_t n, const constant int* shape, const constant int64_t* strides, int ndim) {
  return (fusion_size(shape, ndim) == 1 && n != 1) ? 1 : fusion_layout(shape, strides, ndim);
}

// Element i of an input with the given layout (see fusion_layout). P is the
// pointer type MLX chose: inputs of fewer than 8 elements arrive in the
// `constant` address space.
template <typename P>
inline float fusion_load(
    P x, int64_t i, int64_t layout,
    const constant int* shape, const constant int64_t* strides, int ndim) {
  if (layout == 0) {
    return float(x[i]);
  } else if (layout > 0) {
    return float(x[i % layout]);
  }
  return float(x[fusion_offset(i, shape, strides, ndim)]);
}
