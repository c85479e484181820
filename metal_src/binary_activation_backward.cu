// Backward of act(a op b) in one pass. Twin of binary_activation_backward.metal
// (template T; m = (op, act)): dz = g * act'(a op b); add/sub write dz into da
// only, mul/div write both operand gradients at full output shape.
constexpr int W = 16 / sizeof(T);
const int64_t n = fusion_size(g_shape, g_ndim);
const int64_t la = fusion_operand_layout(n, a_shape, a_strides, a_ndim);
const int64_t lb = fusion_operand_layout(n, b_shape, b_strides, b_ndim);
const int64_t lg = fusion_layout(g_shape, g_strides, g_ndim);
FUSION_DISPATCH(m[0], m[1], fusion_binary_backward_kernel, W, a, b, g, da, db, n,
                la, a_shape, a_strides, a_ndim, lb, b_shape, b_strides, b_ndim,
                lg, g_shape, g_strides, g_ndim);
