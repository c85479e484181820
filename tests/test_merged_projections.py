"""FusionConfig(merge_projections=True): q/k/v and gate/up as one matmul each, exactly as unfused."""

import importlib
import warnings

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten

pytest.importorskip("mlx_lm")

from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models import cache as kv  # noqa: E402

from mlx_fusion import _merged_replay  # noqa: E402
from mlx_fusion.config import FusionConfig  # noqa: E402
from mlx_fusion.fuse import FusionFallbackWarning, fuse  # noqa: E402
from mlx_fusion.graph.merge import NODE_OP  # noqa: E402
from tests._fuse_helpers import GPU_TOLERANCE, on_gpu  # noqa: E402

MERGE = FusionConfig(min_tensor_size=0, merge_projections=True)
PLAIN = FusionConfig(min_tensor_size=0)
BASE = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, vocab_size=64, max_position_embeddings=128, rope_theta=10000.0, rope_traditional=False,
            rope_scaling=None, rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False)
ARCHS = {"llama": ("llama", {}), "mistral": ("llama", {"model_type": "mistral"}), "qwen2": ("qwen2", {}),
         "gemma": ("gemma", {})}
TOL = {mx.float32: 1e-5, mx.bfloat16: 2e-2}
PROMPT = mx.array([1, 5, 9, 3, 7, 2, 8, 4, 6, 11, 13])


def build(name, dtype=mx.float32, seed=0):
    module, overrides = ARCHS[name]
    arch = importlib.import_module(f"mlx_lm.models.{module}")
    mx.random.seed(seed)
    model = arch.Model(arch.ModelArgs.from_dict({**BASE, "model_type": name, **overrides}))
    if dtype != mx.float32:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def tokens(shape=(1, 12)):
    return mx.random.randint(0, BASE["vocab_size"], shape, key=mx.random.key(1))


def builds() -> int:
    return _merged_replay.BUILDS.count


def graphs(fused):
    return [g for _, s in fused.fusion_states() for g in s.graphs]


def gemms(graph) -> int:
    return sum(graph.op_counts().get(op, 0) for op in ("Matmul", "AddMM", "QuantizedMatmul", "FusedLinear", NODE_OP))


def close(a, b, dtype) -> bool:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    if on_gpu() and dtype == mx.bfloat16:
        # cuBLAS rounds one merged bf16 matmul differently from three separate ones, and a few
        # ulps move single logits by more than an elementwise bound (the H200, docs/testing.md)
        return (mx.linalg.norm(a - b) / mx.linalg.norm(b)).item() <= TOL[dtype]
    tol = max(TOL[dtype], GPU_TOLERANCE["atol"]) if on_gpu() else TOL[dtype]
    return mx.allclose(a, b, atol=tol, rtol=tol).item()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_and_matmuls_merge(arch, dtype):
    model, x = build(arch, dtype), tokens()
    want = model(x)
    fused, plain = fuse(model, MERGE), fuse(model, PLAIN)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusionFallbackWarning)
        first = builds()
        assert close(fused(x), want, dtype)  # first call: weights recorded, the separate matmuls run
        assert builds() == first
        for _ in range(2):  # then built once per site, and reused
            assert close(fused(x), want, dtype)
        assert builds() == first + 2 * BASE["num_hidden_layers"]
        plain(x)
    (merged,), (unmerged,) = graphs(fused), graphs(plain)
    assert merged.op_counts().get(NODE_OP) == 2 * BASE["num_hidden_layers"]
    # per layer: q/k/v -> 1 and gate/up -> 1, so 3 matmuls fewer
    assert gemms(merged) == gemms(unmerged) - 3 * BASE["num_hidden_layers"]
    assert fused.fusion_stats.by_pattern["merged-projections"] == 4


def test_off_by_default():
    model = build("llama")
    fused = fuse(model, PLAIN)
    fused(tokens())
    assert all(g.op_counts().get(NODE_OP, 0) == 0 for g in graphs(fused))


def test_concatenation_along_outputs_is_bitwise_on_cpu():
    """Each output element is the same dot product over K: bit-identical (measured on the CPU)."""
    if mx.default_device() != mx.cpu:
        pytest.skip("a GPU GEMM may block K differently for another N: compared within tolerance elsewhere")
    for dtype in (mx.float32, mx.bfloat16):
        x = mx.random.normal((3, 64), key=mx.random.key(0)).astype(dtype)
        ws = [mx.random.normal((n, 64), key=mx.random.key(n)).astype(dtype) for n in (64, 32, 32)]
        parts = mx.split(x @ mx.concatenate(ws).T, [64, 96], axis=-1)
        assert all(mx.array_equal(p, x @ w.T).item() for p, w in zip(parts, ws))


def greedy(model, n, cache_kind="kv"):
    cache = kv.make_prompt_cache(model)
    return [int(t) for t, _ in generate_step(PROMPT, model, max_tokens=n, prompt_cache=cache)]


@pytest.mark.parametrize("compile", [True, False])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_decode_same_tokens_no_retrace(arch, compile):
    model = build(arch)
    want = greedy(model, 10)
    fused = fuse(model, MERGE, compile=compile)
    before = builds()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusionFallbackWarning)
        assert greedy(fused, 10) == want
        first = len(graphs(fused))
        assert greedy(fused, 16)[:10] == want
    assert len(graphs(fused)) == first  # more tokens, no new trace
    assert builds() > before  # the decode steps ran merged
    merged = sum(s.stats.by_pattern.get("merged-projections", 0) for _, s in fused.fusion_states())
    assert merged > 0


def test_replaced_weight_gives_the_new_result():
    model, x = build("llama"), tokens()
    fused = fuse(model, MERGE)
    for _ in range(3):
        fused(x)
    n = builds()
    attn = model.layers[0].self_attn
    attn.q_proj.weight = attn.q_proj.weight * 2 + 1
    want = model(x)
    assert close(fused(x), want, mx.float32)  # new weights: the separate matmuls
    assert close(fused(x), want, mx.float32)  # rebuilt for the new weights
    assert builds() == n + 1
    # the old concatenation was dropped: one per site
    state = fused._fusion
    assert len(state.weights.records) == 2 * BASE["num_hidden_layers"]


def test_training_never_builds_and_grads_match():
    x = tokens((2, 8))
    loss = lambda m: m(x).astype(mx.float32).square().mean()  # noqa: E731
    ref_model, model = build("llama"), build("llama")
    fused = fuse(model, MERGE)
    opt_ref, opt = optim.SGD(learning_rate=0.1), optim.SGD(learning_rate=0.1)
    n = builds()
    for _ in range(3):
        (l1, g1), (l2, g2) = nn.value_and_grad(ref_model, loss)(ref_model), nn.value_and_grad(fused, loss)(fused)
        tol = GPU_TOLERANCE if on_gpu() else dict(atol=1e-5, rtol=1e-5)
        assert mx.allclose(l1, l2, **tol).item()
        for (k, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
            assert mx.allclose(a, b, **tol).item(), k
        opt_ref.update(ref_model, g1)
        opt.update(fused, g2)
        mx.eval(ref_model.parameters(), fused.parameters())
    assert builds() == n


def test_input_gradients_through_merged_weights():
    model, x = build("llama"), tokens()
    h = model.model.embed_tokens(x)
    layer = model.layers[0]
    fused = fuse(layer, MERGE)
    f = lambda m: lambda h: m(h, None, None).square().sum()  # noqa: E731
    n = builds()
    for _ in range(2):
        fused(h, None, None)
    assert builds() == n + 2  # q/k/v and gate/up; the grads below read them (the same weight arrays)
    got, want = mx.grad(f(fused))(h), mx.grad(f(layer))(h)
    assert mx.allclose(got, want, atol=1e-5).item()
    assert builds() == n + 2


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_projections_merge(bits):
    model, x = build("llama"), tokens()
    nn.quantize(model, group_size=32, bits=bits)
    want = model(x)
    fused = fuse(model, MERGE)
    for _ in range(3):
        assert close(fused(x), want, mx.float32)
    (g,) = graphs(fused)
    merged = [n for n in g.nodes if n.op == NODE_OP]
    assert len(merged) == 4 and all(n.params["kind"] == "QuantizedMatmul" for n in merged)


def test_decode_merges_qkv_of_the_split_attention_but_not_o_proj():
    model = build("llama")  # o_proj has q_proj's layout (32 -> 32) but reads another input
    fused = fuse(model, MERGE)
    want = greedy(model, 6)
    assert greedy(fused, 6) == want
    attn = {name: s for name, s in fused.fusion_states() if name.endswith("self_attn")}
    assert len(attn) == BASE["num_hidden_layers"]
    a = model.layers[0].self_attn
    qkv = sum(p.nbytes for p in (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight))
    assert all(s.weights.nbytes() == qkv for s in attn.values())
    assert all(s.stats.by_pattern["merged-projections"] == 1 for s in attn.values())
    # a replaced weight: the next steps run the new weights (unmerged once, then rebuilt)
    a.k_proj.weight = a.k_proj.weight * 0.5
    assert greedy(fused, 6) == greedy(model, 6)


def test_decode_merges_quantized_qkv_and_biases():
    model = build("qwen2")  # q/k/v with biases
    nn.quantize(model, group_size=32, bits=4)
    want = greedy(model, 6)
    fused = fuse(model, MERGE)
    n = builds()
    assert greedy(fused, 6) == want
    assert builds() > n
    attn = [s for name, s in fused.fusion_states() if name.endswith("self_attn")]
    assert all(s.weights.nbytes() > 0 for s in attn)


class Box:
    """A stateful argument: a call that gets one runs split (its children called one by one)."""


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)
        self.o_proj = nn.Linear(16, 16)  # q_proj's layout, another input: not merged

    def __call__(self, x, box):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(q * mx.concatenate([k, v], axis=-1))


def test_split_call_training_never_builds_and_grads_match():
    mx.random.seed(3)
    ref, model = Attention(), Attention()
    model.update(ref.parameters())
    mx.eval(ref.parameters(), model.parameters())
    fused, x, box = fuse(model, MERGE), mx.random.normal((2, 5, 16)), Box()
    n = builds()
    for _ in range(3):
        assert mx.array_equal(fused(x, box), ref(x, box)).item()
    assert builds() == n + 1
    # grads w.r.t. the input through the merged weights
    f = lambda m: lambda x: m(x, box).square().sum()  # noqa: E731
    assert mx.allclose(mx.grad(f(fused))(x), mx.grad(f(ref))(x), atol=1e-5).item()
    # training: fresh tracers each call, so the concatenation is never built for them
    loss = lambda m: m(x, box).square().mean()  # noqa: E731
    opt_ref, opt = optim.SGD(learning_rate=0.1), optim.SGD(learning_rate=0.1)
    for _ in range(3):
        (l1, g1), (l2, g2) = nn.value_and_grad(ref, loss)(ref), nn.value_and_grad(fused, loss)(fused)
        assert mx.allclose(l1, l2).item()
        for (k, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
            assert mx.allclose(a, b, atol=1e-6).item(), k
        opt_ref.update(ref, g1)
        opt.update(fused, g2)
        mx.eval(ref.parameters(), fused.parameters())
    assert builds() == n + 1
    assert mx.allclose(fused(x, box), ref(x, box)).item()  # new weights, after the update: exact again


def test_weight_written_in_place_needs_clear_fusion_cache():
    """A write in place keeps the array's identity (the documented limit): clearing the cache rebuilds."""
    model, x = build("llama"), tokens()
    fused = fuse(model, MERGE)
    for _ in range(3):
        fused(x)
    w = model.layers[0].mlp.up_proj.weight
    w[...] = w * 2
    fused.clear_fusion_cache()
    want = model(x)
    for _ in range(3):
        assert close(fused(x), want, mx.float32)


def test_lora_training_never_builds_and_grads_match():
    """LoRA: nn.value_and_grad hands even the frozen base weights over as new arrays each call."""
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    def lora(model):
        model.freeze()
        linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0})
        mx.random.seed(4)
        for path, p in tree_flatten(model.trainable_parameters()):
            if path.endswith("lora_b"):
                model.update(tree_unflatten([(path, mx.random.normal(p.shape) * 0.1)]))
        mx.eval(model.parameters())
        return model

    ref, model, x = lora(build("llama")), lora(build("llama")), tokens((2, 8))
    model.update(ref.parameters())
    fused = fuse(model, MERGE)
    loss = lambda m: m(x).astype(mx.float32).square().mean()  # noqa: E731
    opt_ref, opt = optim.SGD(learning_rate=0.1), optim.SGD(learning_rate=0.1)
    n = builds()
    for _ in range(3):
        (l1, g1), (l2, g2) = nn.value_and_grad(ref, loss)(ref), nn.value_and_grad(fused, loss)(fused)
        tol = GPU_TOLERANCE if on_gpu() else dict(atol=1e-5, rtol=1e-5)
        assert mx.allclose(l1, l2, **tol).item()
        assert any("lora_a" in k for k, _ in tree_flatten(g2))
        for (k, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
            assert mx.allclose(a, b, **tol).item(), k
        opt_ref.update(ref, g1)
        opt.update(fused, g2)
        mx.eval(ref.parameters(), fused.parameters())
    assert builds() == n


def test_explain_reports_merged_sites():
    import mlx_fusion

    model = build("qwen2")  # q/k/v with biases: AddMM sites
    fused = fuse(model, MERGE)
    fused(tokens())
    rows = [d for d in mlx_fusion.explain(fused).fused if d.pattern == "merged-projections"]
    want = [f"model.layers.{i}.{m}" for i in range(2) for m in ("mlp", "self_attn")]
    assert sorted(d.module for d in rows) == want
    assert any("3 projections" in d.reason and "AddMM" in d.reason for d in rows)


def test_excluded_modules_are_not_merged():
    model, x = build("llama"), tokens()
    fused = fuse(model, MERGE, exclude=["model.layers.0.self_attn", "model.layers.1.mlp"])
    for _ in range(3):
        assert close(fused(x), model(x), mx.float32)
    (g,) = graphs(fused)
    modules = sorted(n.module for n in g.nodes if n.op == NODE_OP)
    assert modules == ["model.layers.0.mlp", "model.layers.1.self_attn"]
    fused = fuse(model, MERGE, exclude=["model.layers.*.self_attn.k_proj"])  # decode: q and v still merge
    assert greedy(fused, 6) == greedy(model, 6)
    attn = [s for name, s in fused.fusion_states() if name.endswith("self_attn")]
    a = model.layers[0].self_attn
    assert all(s.weights.nbytes() == a.q_proj.weight.nbytes + a.v_proj.weight.nbytes for s in attn)


class GatedDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.drop = nn.Linear(16, 32, bias=False), nn.Linear(16, 32, bias=False), nn.Dropout(0.5)

    def __call__(self, x):
        return self.drop(nn.silu(self.gate(x)) * self.up(x))


def test_functions_and_random_draws_merge():
    """fuse(fn) with weights in closure cells; and a merged graph that also draws random numbers."""
    wq, wk = mx.random.normal((8, 4), key=mx.random.key(1)), mx.random.normal((6, 4), key=mx.random.key(2))

    def f(x):
        return x @ wq.T, x @ wk.T

    g, x, n = fuse(f, MERGE), mx.random.normal((3, 4), key=mx.random.key(3)), builds()
    for _ in range(3):
        a, b = g(x)
        assert mx.array_equal(a, x @ wq.T).item() and mx.array_equal(b, x @ wk.T).item()
    assert builds() == n + 1
    mx.random.seed(5)
    model = GatedDropout()
    mx.eval(model.parameters())
    fused, x = fuse(model, MERGE), mx.random.normal((4, 16))
    for i in range(3):
        mx.random.seed(10 + i)
        want = model(x)
        mx.random.seed(10 + i)
        assert mx.allclose(fused(x), want).item()
    assert builds() == n + 2
