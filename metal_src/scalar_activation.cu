// out = act(x * scale + shift), p = (scale, shift, act code) in float32.
// Twin of scalar_activation.metal (template T); x is row contiguous.
constexpr int W = 16 / sizeof(T);
const int64_t n = fusion_size(x_shape, x_ndim);
FUSION_DISPATCH_ACT(int(p[2]), fusion_affine_kernel, W, x, out, n, p[0], p[1], x_shape, x_ndim);
