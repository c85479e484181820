"""What the never-wrong tests share: a config that fuses everything, an input, comparisons."""

import mlx.core as mx
import numpy as np

from mlx_fusion.config import FusionConfig
from mlx_fusion.fuse import FusionFallbackWarning

ALL = FusionConfig(min_tensor_size=0)
X = mx.random.normal((4, 8), key=mx.random.key(0))

# On a GPU the fused kernels' float32 exp/erf/tanh differ from MLX's own by an ulp or two, and a
# model's matmuls carry that into logits and gradients: max differences of 4e-5 to 9e-5 on values
# of 0.01 to 1 on the H200 (docs/testing.md), where the CPU paths are MLX's own expressions.
GPU_TOLERANCE = dict(atol=2e-4, rtol=1e-3)
# Whole tensors on a GPU (the zoo): a fused float32 linear kernel against cuBLAS, which may run
# float32 matmuls in TF32, moved single logits of qwen2 by 4.7e-4 (values up to ~1.5, sixth session);
# a fault shows up as O(1). Relative to the tensor's norm, and elementwise to its largest value.
GPU_RELATIVE = 2e-3


def on_gpu() -> bool:
    return mx.default_device() == mx.gpu


def close(a, b, atol=1e-5):
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    np.testing.assert_allclose(np.array(a), np.array(b), atol=atol, rtol=1e-5)


def fallback_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, FusionFallbackWarning)]
