// Stand-in for MLX's mlx/backend/cuda/device/utils.cuh in compile-only tests:
// just the types a mx.fast.cuda_kernel signature uses (MLX 0.32: Shape and
// Strides are fixed-size arrays of MAX_NDIM = 10, passed by value).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cuda/std/cstdint>
using cuda::std::int64_t;

#define MAX_NDIM 10
namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, MAX_NDIM>;
using Strides = cuda::std::array<int64_t, MAX_NDIM>;
}  // namespace mlx::core::cu
