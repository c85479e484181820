// out = act(a op b). Twin of binary_activation.metal (template T; m = (op, act);
// same layout classification), looping over 16-byte vectors: see common.cu.
constexpr int W = 16 / sizeof(T);
const int64_t n = max(fusion_size(a_shape, a_ndim), fusion_size(b_shape, b_ndim));
const int64_t la = fusion_operand_layout(n, a_shape, a_strides, a_ndim);
const int64_t lb = fusion_operand_layout(n, b_shape, b_strides, b_ndim);
FUSION_DISPATCH(m[0], m[1], fusion_binary_kernel, W, a, b, out, n,
                la, a_shape, a_strides, a_ndim, lb, b_shape, b_strides, b_ndim);
