"""What the never-wrong tests share: a config that fuses everything, an input, comparisons."""

import mlx.core as mx
import numpy as np

from mlx_fusion.config import FusionConfig
from mlx_fusion.fuse import FusionFallbackWarning

ALL = FusionConfig(min_tensor_size=0)
X = mx.random.normal((4, 8), key=mx.random.key(0))


def close(a, b, atol=1e-5):
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    np.testing.assert_allclose(np.array(a), np.array(b), atol=atol, rtol=1e-5)


def fallback_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, FusionFallbackWarning)]
