// dx = g * act'(x * scale + shift) * scale in one pass.
// Twin of scalar_activation_backward.metal (template T; p = (scale, shift, act code)).
constexpr int W = 16 / sizeof(T);
const int64_t n = fusion_size(x_shape, x_ndim);
FUSION_DISPATCH_ACT(int(p[2]), fusion_affine_backward_kernel, W, x, g, dx, n, p[0], p[1], x_shape, x_ndim);
