"""mx.compile(shapeless=True) around fused ops and fused modules (issue 11): it works, with the
unfused code's values and gradients, on the CPU and with a (forced) GPU backend, where the ops
step aside to their MLX code instead of building primitives no shapeless graph accepts."""

import re
import sys
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_fusion import fuse, kernels
from mlx_fusion._shapeless import in_shapeless_trace
from mlx_fusion.config import FusionConfig, fusion_config
from mlx_fusion.ops.add_norm import add_rms_norm_reference, fused_add_rms_norm
from mlx_fusion.ops.binary import binary_reference, fused_binary
from mlx_fusion.ops.glu import fused_glu, glu_reference
from mlx_fusion.ops.linear import fused_linear, linear_reference
from mlx_fusion.ops.scalar import fused_scalar, scalar_reference

W = mx.random.normal((8, 16), key=mx.random.key(1))
B = mx.random.normal((8,), key=mx.random.key(2))
NORM_W = 1 + 0.1 * mx.random.normal((16,), key=mx.random.key(3))
mx.eval(W, B, NORM_W)

# (name, fused, reference): functions of two (batch, 16) arrays
CASES = [
    ("add+relu", lambda a, b: fused_binary(a, b, "add", "relu"), lambda a, b: binary_reference(a, b, "add", "relu")),
    ("mul+gelu", lambda a, b: fused_binary(a, b, "mul", "gelu"), lambda a, b: binary_reference(a, b, "mul", "gelu")),
    ("affine+silu", lambda a, b: fused_scalar(a, 1.5, -0.25, "silu") + b,
     lambda a, b: scalar_reference(a, 1.5, -0.25, "silu") + b),
    ("linear+bias+relu", lambda a, b: fused_linear(a + b, W, B, "relu"),
     lambda a, b: linear_reference(a + b, W, B, "relu")),
    ("linear+bias", lambda a, b: fused_linear(a + b, W, B), lambda a, b: linear_reference(a + b, W, B)),
    ("glu+silu", lambda a, b: fused_glu(a, b, "silu"), lambda a, b: glu_reference(a, b, "silu")),
    ("add+rms_norm", lambda a, b: sum(fused_add_rms_norm(a, b, NORM_W)),
     lambda a, b: sum(add_rms_norm_reference(a, b, NORM_W))),
]
SHAPES = [(4, 16), (7, 16), (2, 3, 16), (1, 16)]  # the first call traces, the others replay


def close(a, b, atol=1e-5):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    np.testing.assert_allclose(np.array(a), np.array(b), atol=atol, rtol=1e-5)


def inputs(shape):
    k1, k2 = mx.random.split(mx.random.key(sum(shape)))
    return mx.random.normal(shape, key=k1), mx.random.normal(shape, key=k2)


def test_probe_sees_only_shapeless_traces():
    seen = {}

    def f(x, tag):
        seen[tag] = in_shapeless_trace()
        return x * 2

    x = mx.ones((3,))
    assert not in_shapeless_trace()
    mx.compile(lambda x: f(x, "compile"))(x)
    mx.compile(lambda x: f(x, "shapeless"), shapeless=True)(x)
    mx.grad(lambda x: f(x, "grad").sum())(x)
    mx.vmap(lambda x: f(x, "vmap"))(mx.ones((2, 3)))
    mx.compile(mx.grad(lambda x: f(x, "shapeless grad").sum()), shapeless=True)(x)
    assert seen == {"compile": False, "shapeless": True, "grad": False, "vmap": False, "shapeless grad": True}
    assert not in_shapeless_trace()


@pytest.mark.parametrize("name, fused, reference", CASES, ids=[c[0] for c in CASES])
def test_shapeless_compile_of_a_fused_op(name, fused, reference):
    """Values, and gradients through a shapeless compile of value_and_grad, at shapes the trace never saw."""
    if name == "linear+bias":
        pytest.skip("an unfused AddMM is what MLX 0.32.4 gets wrong here; fused_linear avoids it (next test)")
    forward = mx.compile(fused, shapeless=True)
    step = mx.compile(mx.value_and_grad(lambda a, b: fused(a, b).sum(), argnums=(0, 1)), shapeless=True)
    ref_step = mx.value_and_grad(lambda a, b: reference(a, b).sum(), argnums=(0, 1))
    try:  # MLX's own code may refuse (on a GPU: "RMSNormVJP cannot infer output shapes")
        mx.eval(mx.compile(ref_step, shapeless=True)(*inputs(SHAPES[0])))
    except ValueError as e:  # then the fused op gives the same error
        with pytest.raises(ValueError, match=re.escape(str(e)[:40])):
            mx.eval(step(*inputs(SHAPES[0])))
        return
    for shape in SHAPES:
        a, b = inputs(shape)
        close(forward(a, b), reference(a, b))
        (loss, grads), (ref_loss, ref_grads) = step(a, b), ref_step(a, b)
        close(loss, ref_loss, 1e-4)
        for g, r in zip(grads, ref_grads):
            close(g, r)


@pytest.mark.parametrize("name, fused, reference", CASES, ids=[c[0] for c in CASES])
def test_fused_op_inside_a_fuse_trace_runs_mlx_code(name, fused, reference):
    """With a GPU backend a fused op builds kernels (here: a factory that refuses), but not while
    `fuse()` traces the code that calls it: a custom_function cannot be exported ("Unable to get
    state for primitive CustomTransforms", seen on the H200 for glu and add_norm)."""
    from mlx_fusion.graph.trace import trace

    a, b = inputs(SHAPES[0])
    with kernels.use_backend("metal", _no_kernels):
        graph = trace(lambda a, b: fused(a, b), a, b)
    assert "CustomTransforms" not in graph.op_counts() and "Custom" not in str(graph.op_counts())


def test_linear_bias_avoids_mlx_shapeless_addmm():
    """fused_linear without an activation is mx.addmm, except in a shapeless trace: there MLX
    0.32.4's AddMM with a broadcast bias reads a wrong result at a new batch size (docs/never-wrong.md)."""
    f = mx.compile(lambda x: fused_linear(x, W, B), shapeless=True)
    for shape in SHAPES:
        x = inputs(shape)[0]
        close(f(x), linear_reference(x, W, B))


def _no_kernels(**kwargs):
    raise AssertionError("a kernel was built inside a shapeless trace")


@pytest.mark.parametrize("name, fused, reference", CASES, ids=[c[0] for c in CASES])
def test_gpu_path_steps_aside_in_a_shapeless_trace(name, fused, reference):
    """With a GPU backend the ops build kernels (here: a factory that refuses), but not when a
    shapeless compile traces them: there they run their MLX code."""
    a, b = inputs((4, 16))
    with kernels.use_backend("metal", _no_kernels):
        if not name.startswith("linear"):  # (at large M or without activation: MLX's GEMM and code)
            with pytest.raises(AssertionError, match="kernel was built"):
                mx.eval(fused(a, b))
        f = mx.compile(fused, shapeless=True)
        for shape in SHAPES[:2]:
            a, b = inputs(shape)
            close(f(a, b), reference(a, b))


def _mlp():
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 8, bias=False))
    mx.eval(model.parameters())
    return model


def test_fused_module_under_an_outer_shapeless_compile_runs_the_original():
    """A replay bakes the traced shapes; under an outer shapeless compile the fused module runs
    the original forward, even when a fused trace is cached for the first shape."""
    model = _mlp()
    with fusion_config(min_tensor_size=0):
        fused = fuse(model)
        x = inputs((2, 4, 16))[0]
        close(fused(x), model(x))  # traced and fused eagerly: a cached replay for this shape
        assert fused.fusion_stats.by_pattern == {"linear+relu": 1}
        f = mx.compile(lambda x: fused(x), shapeless=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning: nothing failed
            for shape in [(2, 4, 16), (2, 7, 16), (3, 16)]:
                x = inputs(shape)[0]
                close(f(x), model(x))
        assert fused._fusion.traces == 1


def test_fused_function_under_an_outer_shapeless_compile_runs_the_original():
    def fn(x, r):
        return nn.relu(x + r) * 2

    with fusion_config(min_tensor_size=0):
        fused = fuse(fn)
        x, r = inputs((4, 16))
        close(fused(x, r), fn(x, r))
        f = mx.compile(fused, shapeless=True)
        for shape in [(4, 16), (9, 16)]:
            x, r = inputs(shape)
            close(f(x, r), fn(x, r))


class _CallsAFusedOp(nn.Module):
    """A user's module that calls a fused op itself: the graph walker has nothing more to fuse."""

    def __init__(self):
        super().__init__()
        self.gate, self.up = nn.Linear(16, 32, bias=False), nn.Linear(16, 32, bias=False)

    def __call__(self, x):
        return fused_glu(self.gate(x), self.up(x), "silu")


@pytest.mark.parametrize("make", [_mlp, _CallsAFusedOp], ids=["nothing fused", "calls a fused op"])
def test_unfused_module_skips_the_probe_and_stays_right_under_shapeless(make):
    """A fused module whose trace fused nothing runs its original forward without probing (the
    probe costs an eval per call); that stays right when a shapeless compile traces it later,
    including a fused op called inside the forward, which probes for itself."""
    model = make()
    mx.eval(model.parameters())
    fused = fuse(model, FusionConfig(min_tensor_size=10**9))  # nothing is worth fusing
    x = inputs((2, 4, 16))[0]
    for _ in range(3):
        close(fused(x), model(x))
    assert fused._fusion.direct_last
    xs = [inputs(shape)[0] for shape in [(2, 4, 16), (2, 7, 16), (3, 16)]]
    wants = [model(x) for x in xs]
    with kernels.use_backend("metal", _no_kernels):  # a fused op that built a kernel here would raise
        f = mx.compile(lambda x: fused(x), shapeless=True)
        for x, want in zip(xs, wants):
            close(f(x), want)


def test_a_module_that_fused_nothing_does_not_probe(monkeypatch):
    import mlx_fusion._fused_module as fused_module

    probes = []
    monkeypatch.setattr(fused_module, "in_shapeless_trace", lambda: probes.append(1) or False)
    model = _mlp()
    fused = fuse(model, FusionConfig(min_tensor_size=10**9))
    x = inputs((2, 4, 16))[0]
    fused(x)  # probes, traces: nothing fused
    n = len(probes)
    for _ in range(3):
        close(fused(x), model(x))
    assert len(probes) == n
    fused(inputs((5, 16))[0])  # a new shape traces again: it probes first
    assert len(probes) == n + 1


def test_a_function_that_fused_nothing_does_not_probe_and_stays_right(monkeypatch):
    fuse_module = sys.modules["mlx_fusion.fuse"]  # (the package's `fuse` is the function)

    def fn(x):
        return fused_glu(x, x * 2, "silu")  # a fused op the walker leaves as it is

    fused = fuse(fn, FusionConfig(min_tensor_size=10**9))
    x = inputs((2, 4, 16))[0]
    for _ in range(3):
        close(fused(x), fn(x))
    assert fused._fusion.direct_last
    probes = []
    monkeypatch.setattr(fuse_module, "in_shapeless_trace", lambda: probes.append(1) or False)
    fused(x)
    assert probes == []
    monkeypatch.undo()
    xs = [inputs(shape)[0] for shape in [(2, 4, 16), (3, 16)]]
    wants = [glu_reference(x, x * 2, "silu") for x in xs]
    with kernels.use_backend("metal", _no_kernels):
        f = mx.compile(fused, shapeless=True)
        for x, want in zip(xs, wants):
            close(f(x), want)


def test_decode_steps_that_run_plain_do_not_probe(monkeypatch):
    from mlx_lm.models import llama
    from mlx_lm.models.cache import make_prompt_cache

    import mlx_fusion._fused_module as fused_module

    args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=64, rms_norm_eps=1e-5,
                           rope_theta=10000.0, tie_word_embeddings=False)
    model = llama.Model(args)
    mx.eval(model.parameters())
    fused = fuse(model, FusionConfig(min_tensor_size=10**9))  # nothing fuses: decode runs plain
    caches = make_prompt_cache(model), make_prompt_cache(model)
    prompt = mx.array([[1, 2, 3, 4]])
    close(fused(prompt, cache=caches[0]), model(prompt, cache=caches[1]))
    y = mx.array([[5]])
    for _ in range(3):  # the children become inert: the split's kinds of arguments run plain
        close(fused(y, cache=caches[0]), model(y, cache=caches[1]))
    probes = []
    monkeypatch.setattr(fused_module, "in_shapeless_trace", lambda: probes.append(1) or False)
    for _ in range(3):
        close(fused(y, cache=caches[0]), model(y, cache=caches[1]))
    assert probes == [] and caches[0][0].offset == caches[1][0].offset
