"""mlx-lm's model zoo through `fuse()`: logits, gradients, quantized, LoRA, compiled training.

Every module of `mlx_lm.models` is either an architecture built here from a tiny
`ModelArgs` (random weights, no downloads) or listed in `EXCLUDED` with the
reason, so a new mlx-lm release with a new architecture fails
`test_every_module_is_classified` until someone looks at it. Architectures whose
fused forward runs unfused are in `EXPECTED_FALLBACK` with the reason, and the
test checks that reason; every other one must replay without a fallback.
Coverage and exclusions are summarised in docs/mlx-lm-zoo.md.
"""

import importlib
import os
import pkgutil
import warnings
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

mlx_lm_models = pytest.importorskip("mlx_lm.models")
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402

import mlx_fusion  # noqa: E402
from mlx_fusion import FusionFallbackWarning  # noqa: E402
from tests._fuse_helpers import GPU_RELATIVE, on_gpu  # noqa: E402

# Settings every tiny model shares; `ModelArgs.from_dict` keeps the fields its class has.
BASE = dict(
    hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, vocab_size=64, max_position_embeddings=128, rope_theta=10000.0, rope_traditional=False,
    rope_scaling=None, rms_norm_eps=1e-5, layer_norm_eps=1e-5, norm_eps=1e-5, layer_norm_epsilon=1e-5,
    tie_word_embeddings=False, attention_bias=False, hidden_act="gelu", partial_rotary_factor=0.5,
    # GPT-2 style names
    n_embd=32, n_layer=2, n_head=4, n_positions=128, n_ctx=128, n_inner=64,
    # MoE: 4 experts, 2 per token
    num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
    num_shared_experts=1,
    # gemma / gemma2
    query_pre_attn_scalar=8, final_logit_softcapping=30.0, attn_logit_softcapping=50.0, sliding_window=16,
)

# name -> (module, overrides of BASE); names are mlx-lm model types. CORE gets every check (logits,
# gradients, 4- and 8-bit quantized, LoRA, compiled training); MORE gets logits, gradients and 4-bit
# quantized logits, which keeps the module within a few minutes on two CPU cores.
CORE = {
    "llama": ("llama", {}),
    "mistral": ("llama", {"model_type": "mistral"}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", {}),
    "phi": ("phi", {}),
    "phi3": ("phi3", {}),
    "starcoder2": ("starcoder2", {}),
    "gpt2": ("gpt2", {}),
    "gpt_neox": ("gpt_neox", {"rotary_emb_base": 10000, "rotary_pct": 0.25, "use_parallel_residual": True}),
    "mixtral": ("mixtral", {}),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "nanochat": ("nanochat", {}),
}
_ROPE4 = {"rope_theta": 10000.0, "rope_type": "default", "llama_4_scaling_beta": 0.1,
          "original_max_position_embeddings": 128}
_LINEAR_ATTN = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                    linear_conv_kernel_dim=2, full_attention_interval=2)
_ROPE_PER_TYPE = {t: {"rope_theta": 10000.0, "rope_type": "default"}
                  for t in ("full_attention", "sliding_attention")}
_GEMMA4 = dict(layer_types=["sliding_attention", "full_attention"], sliding_window_pattern=2,
               vocab_size_per_layer_input=64, hidden_size_per_layer_input=8, num_kv_shared_layers=0)
_GRANITE = dict(logits_scaling=1.0, attention_multiplier=0.125, embedding_multiplier=1.0, residual_multiplier=1.0)
MORE = {
    **{name: (name, {}) for name in [  # BASE is enough
        "cohere", "deepseek", "deepseek_v3", "deepseek_v32", "falcon_h1", "glm", "glm4",
        "glm4_moe_lite", "gpt_bigcode", "gpt_oss", "hunyuan_v1_dense", "internlm2", "internlm3",
        "iquestloopcoder", "laguna", "mimo",
        "muse_glimmer", "nanbeige", "nemotron", "olmo2", "olmoe", "phimoe", "plamo2", "plamo3", "qwen2_vl",
        "qwen3_vl", "seed_oss", "smollm3", "talkie", "telechat3", "youtu_llm"]},
    "Klear": ("Klear", dict(n_shared_experts=1)),
    "afmoe": ("afmoe", dict(layer_types=["sliding_attention", "full_attention"])),
    "apertus": ("apertus", dict(mlp_bias=False, post_norm=False, qk_norm=True)),
    "baichuan_m1": ("baichuan_m1", dict(sliding_window_layers=[1], conv_window=2)),
    "bailing_moe": ("bailing_moe", dict(first_k_dense_replace=1)),
    "bailing_moe_linear": ("bailing_moe_linear", dict(first_k_dense_replace=1, layer_group_size=2, group_norm_size=1)),
    "cohere2": ("cohere2", dict(sliding_window_pattern=2)),
    "dbrx": ("dbrx", dict(d_model=32, n_layers=2, n_heads=4,
                          ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2},
                          attn_config={"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0})),
    "deepseek_v2": ("deepseek_v2", dict(
        rope_scaling={"factor": 1.0, "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1,
                      "mscale": 1, "mscale_all_dim": 0, "type": "yarn"},
        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        n_routed_experts=4, n_shared_experts=1)),
    "deepseek_v41": ("deepseek_v41", dict(qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, kv_lora_rank=16)),
    "dots1": ("dots1", dict(first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1,
                            routed_scaling_factor=1.0)),
    "ernie4_5": ("ernie4_5", dict(use_bias=False)),
    "ernie4_5_moe": ("ernie4_5_moe", dict(use_bias=False, moe_num_experts=4, moe_k=2, moe_intermediate_size=32)),
    "exaone": ("exaone", dict(num_layers=2)),
    "exaone4": ("exaone4", dict(sliding_window_pattern="LG", rope_scaling=None)),
    "gear": ("gear", dict(layer_types=["sliding_attention", "full_attention"])),
    "gemma3": ("gemma3", dict(text_config={**BASE, "model_type": "gemma3_text", "sliding_window_pattern": 2})),
    "gemma3_text": ("gemma3_text", dict(sliding_window_pattern=2)),
    "glm4_moe": ("glm4_moe", dict(n_group=1, topk_group=1, n_shared_experts=1, n_routed_experts=4,
                                  routed_scaling_factor=1.0, first_k_dense_replace=1, use_qk_norm=False)),
    "gptj": ("gptj", {"rotary_dim": 4}),
    "granite": ("granite", dict(_GRANITE, mlp_bias=False)),
    "granitemoe": ("granitemoe", _GRANITE),
    "helium": ("helium", dict(mlp_bias=False)),
    "lfm2": ("lfm2", dict(conv_bias=False, conv_L_cache=3, block_dim=32, block_multiple_of=16,
                          block_ffn_dim_multiplier=1.0, block_auto_adjust_ff_dim=False, full_attn_idxs=[1],
                          layer_types=["conv", "full_attention"])),
    "lille-130m": ("lille-130m", dict(block_size=128, n_kv_heads=2, n_embd=96)),
    "llama4_text": ("llama4_text", dict(intermediate_size_mlp=64, no_rope_layers=[1, 0], use_qk_norm=False)),
    # the wrapper reads the cache of layer 3 (chunked vs global attention): 4 layers, one expert per token
    "llama4": ("llama4", dict(text_config={
        **BASE, "model_type": "llama4_text", "num_hidden_layers": 4, "attention_chunk_size": 16,
        "intermediate_size_mlp": 64, "no_rope_layers": [1, 1, 1, 0], "use_qk_norm": False,
        "num_experts_per_tok": 1, "interleave_moe_layer_step": 1})),
    "mamba": ("mamba", dict(state_size=4, conv_kernel=2, use_bias=False, use_conv_bias=True, time_step_rank=4)),
    "mamba2": ("mamba2", dict(num_heads=4, state_size=4, conv_kernel=2, n_groups=1, use_bias=False,
                              use_conv_bias=True, time_step_limit=(0.0, 100.0), time_step_rank=4, head_dim=16,
                              expand=2)),
    "minicpm": ("minicpm", dict(dim_model_base=32, scale_depth=1.0, scale_emb=1.0)),
    "minimax": ("minimax", dict(shared_intermediate_size=32, rotary_dim=4)),
    "ministral3": ("ministral3", dict(rope_parameters=_ROPE4)),
    "mistral3": ("mistral3", dict(text_config={**BASE, "model_type": "ministral3", "rope_parameters": _ROPE4})),
    "olmo3": ("olmo3", dict(layer_types=["sliding_attention", "full_attention"])),
    "openelm": ("openelm", dict(num_transformer_layers=2, model_dim=32, ffn_dim_divisor=16, num_query_heads=[4, 4],
                                num_kv_heads=[2, 2], ffn_multipliers=[1.0, 1.0])),
    # its logits mask token ids up to 100351, so the vocabulary must be that large
    "phi3small": ("phi3small", dict(dense_attention_every_n_layers=1, ff_intermediate_size=64, gegelu_limit=20.0,
                                    vocab_size=100352)),
    "plamo": ("plamo", dict(num_key_value_heads=4, n_shared_head=1)),
    "qwen": ("qwen", dict(kv_channels=8, intermediate_size=128)),
    "qwen3_5": ("qwen3_5", dict(text_config={
        **BASE, **_LINEAR_ATTN, "model_type": "qwen3_5",
        "rope_parameters": {"type": "default", "mrope_section": [1, 1, 0], "rope_theta": 10000,
                            "partial_rotary_factor": 0.5}})),
    "qwen3_next": ("qwen3_next", dict(_LINEAR_ATTN, shared_expert_intermediate_size=32)),
    "recurrent_gemma": ("recurrent_gemma", dict(conv1d_width=2, logits_soft_cap=30.0, attention_window_size=16,
                                                block_types=["recurrent", "attention"])),
    "solar_open": ("solar_open", dict(n_shared_experts=1, n_routed_experts=4, routed_scaling_factor=1.0,
                                      first_k_dense_replace=1)),
    "stablelm": ("stablelm", dict(use_qkv_bias=False)),
    "step3p5": ("step3p5", dict(num_attention_groups=2)),
    "hunyuan": ("hunyuan", dict(moe_topk=2, num_shared_expert=1, use_mixed_mlp_moe=True, use_cla=False,
                                cla_share_factor=1, use_qk_norm=False,
                                rope_scaling={"alpha": 1.0, "factor": 1.0, "type": "dynamic"})),
    "lfm2_moe": ("lfm2_moe", dict(use_expert_bias=False, num_dense_layers=1, conv_bias=False, conv_L_cache=3,
                                  full_attn_idxs=[1], layer_types=["conv", "full_attention"])),
    "exaone_moe": ("exaone_moe", dict(layer_types=["sliding_attention", "full_attention"], is_moe_layer=[False, True])),
    "jamba": ("jamba", dict(attn_layer_offset=1, attn_layer_period=2, expert_layer_offset=1, expert_layer_period=2,
                            mamba_d_conv=2, mamba_d_state=4, mamba_expand=2, mamba_dt_rank=4)),
    "nemotron_h": ("nemotron_h", dict(mamba_num_heads=4, mamba_head_dim=8, mamba_proj_bias=False, ssm_state_size=4,
                                      conv_kernel=2, n_groups=1, mlp_bias=False, use_bias=False, use_conv_bias=True,
                                      hybrid_override_pattern="M*")),
    "olmo_hybrid": ("olmo_hybrid", dict(_LINEAR_ATTN, linear_allow_neg_eigval=False)),
    "rwkv7": ("rwkv7", dict(a_low_rank_dim=8, v_low_rank_dim=8, gate_low_rank_dim=8, decay_low_rank_dim=8)),
    "minicpm3": ("minicpm3", dict(dim_model_base=32, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                  kv_lora_rank=16, scale_depth=1.0, scale_emb=1.0,
                                  rope_scaling={"original_max_position_embeddings": 128})),
    "mistral4": ("mistral4", dict(n_shared_experts=1, n_routed_experts=4, routed_scaling_factor=1.0, kv_lora_rank=16,
                                  q_lora_rank=16, topk_group=1, first_k_dense_replace=1, n_group=1,
                                  qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, rope_parameters=_ROPE4)),
    "mellum": ("mellum", dict(layer_types=["sliding_attention", "full_attention"],
                              rope_parameters=_ROPE_PER_TYPE)),
    "spark2_5": ("spark2_5", dict(layer_types=["sliding_attention", "full_attention"],
                                  rope_parameters=_ROPE_PER_TYPE)),
    "gemma4_text": ("gemma4_text", _GEMMA4),
    "gemma4": ("gemma4", dict(text_config={**BASE, **_GEMMA4})),
    "phixtral": ("phixtral", dict(num_vocab=64, model_dim=32, num_heads=4, num_layers=2, rotary_dim=4)),
    "granitemoehybrid": ("granitemoehybrid", dict(
        _GRANITE, layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=8, mamba_proj_bias=False,
        mamba_d_state=4, mamba_d_conv=2, mamba_n_groups=1, mamba_conv_bias=True, shared_intermediate_size=32)),
    # multimodal wrappers, text only
    "pixtral": ("pixtral", dict(text_config={**BASE, "model_type": "llama"})),
    "kimi_vl": ("kimi_vl", dict(text_config={**BASE, "model_type": "deepseek_v3"})),
    "qwen3_vl_moe": ("qwen3_vl_moe", dict(text_config={**BASE, "model_type": "qwen3_vl_moe"})),
    "qwen3_5_moe": ("qwen3_5_moe", dict(text_config={
        **BASE, **_LINEAR_ATTN, "model_type": "qwen3_5_moe",
        "rope_parameters": {"type": "default", "mrope_section": [1, 1, 0], "rope_theta": 10000,
                            "partial_rotary_factor": 0.5}})),
    "lfm2-vl": ("lfm2-vl", dict(text_config={
        **BASE, "model_type": "lfm2", "conv_bias": False, "conv_L_cache": 3, "block_dim": 32,
        "block_multiple_of": 16, "block_ffn_dim_multiplier": 1.0, "block_auto_adjust_ff_dim": False,
        "full_attn_idxs": [1], "layer_types": ["conv", "full_attention"]})),
}
ALL_ARCHS = {**CORE, **MORE}
# MLX_FUSION_ZOO=core: CORE only (a GPU run within a device call's time limit)
ARCHS = CORE if os.environ.get("MLX_FUSION_ZOO") == "core" else ALL_ARCHS

# mlx_lm.models modules that are not architectures.
HELPERS = {"activations", "base", "bitlinear_layers", "cache", "gated_delta", "mla", "pipeline", "rope_utils",
           "ssm", "switch_layers"}
# Architectures not built here, and why.
_TODO = "no tiny config written yet: "
EXCLUDED = {
    "olmo": "needs the ai2-olmo package (`hf_olmo`), not a test dependency",
    "bitnet": "its BitLinear layers run an mx.fast.metal_kernel: no CPU path to compare against",
    "prism_hadamard_qwen35": "needs a Hadamard pack (schema 2) that comes with its checkpoint",
    "afm7": _TODO + "hidden_dim, num_layers, num_kv_reuse_layers, num_heads, num_kv_heads",
    "bailing_hybrid": _TODO + "10 MLA / grouped-MoE fields (n_group, kv_lora_rank, qk_rope_head_dim, ...)",
    "bailing_moe_v3": _TODO + "its default MLA shapes do not fit hidden 32 ([Unflatten] size 4 into (8, 0))",
    "gemma3n": _TODO + "text_config with the AltUp / Laurel / per-layer-input fields",
    "glm_moe_dsa": _TODO + "18 indexer / MLA / MoE fields",
    "kimi_k25": _TODO + "a multimodal wrapper's text_config",
    "kimi_k3": _TODO + "its own activation and linear-attention settings (rejects hidden_act='gelu')",
    "kimi_linear": _TODO + "linear_attn_config, model_max_length, kv_lora_rank",
    "longcat_flash": _TODO + "16 MLA / zero-expert fields",
    "longcat_flash_ngram": _TODO + "14 MLA / n-gram fields",
    "mimo_v2_flash": _TODO + "19 hybrid-attention / MoE fields",
    "minimax_m3_vl": _TODO + "a multimodal wrapper's text_config",
    "muse_spark": _TODO + "a multimodal wrapper's text_config",
    "nemotron-nas": _TODO + "one block_configs entry per layer",
}
# Architectures whose fused forward runs the original code, with the reason the test expects.
EXPECTED_FALLBACK = {
    "dbrx": "could not trace: ValueError: [eval] Attempting to eval an array during function transformations",
    "spark2_5": "could not trace: ValueError: [export_function] Unable to get state for primitive Contiguous",
}
# Quantization modes whose models cannot be traced: mx.export_function has no state for the fp8
# conversion (FromFP8) that an mxfp8 QuantizedEmbedding's dequantize traces to (QuantizedLinear is fine).
QUANTIZED_FALLBACK = {"mxfp8": "Unable to get state for primitive FromFP8"}
# Known fuse()/trace() bugs, per (test, architecture): strict xfails, so a fix shows up as XPASS.
NO_INIT = ("its Model.__init__ never calls nn.Module.__init__, so it has no `_training`, which "
           "fuse.py's _ModuleReader reads: the fused call raises AttributeError instead of running")
KNOWN_BROKEN = {
    ("logits", "recurrent_gemma"): NO_INIT,
    ("quantized", "recurrent_gemma"): NO_INIT,
}
# Architectures whose trace has a fusible chain on the CPU (linear + bias + GELU), so a real rewrite
# is replayed and differentiated, not only the plain primitives.
FUSES = {"gpt2", "gpt_neox", "phi", "starcoder2"}
# Architectures that mlx-lm itself cannot differentiate (the gradient test checks that it raises).
NO_GRADIENTS = {
    "deepseek_v41": "take_along_axis over argpartition indices without stop_gradient: MLX refuses the VJP",
}

pytestmark = pytest.mark.filterwarnings("error::mlx_fusion.FusionFallbackWarning")


def build(name, seed=0):
    module, overrides = ALL_ARCHS[name]
    arch = importlib.import_module(f"mlx_lm.models.{module}")
    args = arch.ModelArgs.from_dict({**BASE, "model_type": name, **overrides})
    mx.random.seed(seed)
    model = arch.Model(args)
    mx.eval(model.parameters())
    return model


def tokens(seed=1, shape=(2, 16)):  # 2 x 16 x top-2 = 64 routed rows: MoE layers sort them
    return mx.random.randint(0, BASE["vocab_size"], shape, key=mx.random.key(seed))


def loss_fn(model, x, y):
    return nn.losses.cross_entropy(model(x), y).mean()


@pytest.fixture(autouse=True)
def fuse_everything():
    with mlx_fusion.fusion_config(min_tensor_size=0):
        yield


def fused_call(name, fused, *args, expected=None):
    """Call `fused`, checking the fallback table (or `expected`, a reason to find)."""
    expected = expected or EXPECTED_FALLBACK.get(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FusionFallbackWarning)
        out = fused(*args)
    reasons = list(fused.fusion_fallbacks)
    if expected:
        assert any(expected in r for r in reasons), reasons
    else:
        assert not reasons and not [w for w in caught if w.category is FusionFallbackWarning], reasons
    return out


def assert_trees_close(a, b, atol=1e-5, rtol=1e-4):
    fa, fb = dict(tree_flatten(a)), dict(tree_flatten(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = np.array(fa[k]), np.array(fb[k])
        if on_gpu():  # a kernel's float32 vs cuBLAS's (TF32) matmul: compare the error as a whole
            assert x.shape == y.shape, k
            assert np.linalg.norm(x - y) <= GPU_RELATIVE * np.linalg.norm(y) + atol, k
            np.testing.assert_allclose(x, y, atol=GPU_RELATIVE * max(1.0, float(np.abs(y).max(initial=0))),
                                       rtol=0, err_msg=k)
        else:
            np.testing.assert_allclose(x, y, atol=atol, rtol=rtol, err_msg=k)


def test_every_module_is_classified():
    modules = {m.name for m in pkgutil.iter_modules(mlx_lm_models.__path__)}
    covered = {module for module, _ in ALL_ARCHS.values()}
    assert modules - covered - HELPERS - set(EXCLUDED) == set()


def archs(test, names):
    """`names` (tuples of parameters) with the KNOWN_BROKEN ones of `test` as strict xfails."""
    def param(n):
        broken = KNOWN_BROKEN.get((test, n[0]))
        marks = [pytest.mark.xfail(strict=True, reason=broken)] if broken else []
        return pytest.param(*n, marks=marks, id="-".join(map(str, n)))

    return [param(n) for n in names]


@pytest.mark.parametrize("name", archs("logits", [(n,) for n in sorted(ARCHS)]))
def test_logits_and_gradients(name):
    model = build(name)
    fused = mlx_fusion.fuse(model)
    x, y = tokens(1), tokens(2)
    expect = model(x)
    assert_trees_close(fused_call(name, fused, x), expect)
    if name in FUSES:
        assert fused.fusion_stats.applied_count > 0
    if name in NO_GRADIENTS:
        with pytest.raises(ValueError):
            nn.value_and_grad(model, loss_fn)(model, x, y)
        return
    loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
    floss, fgrads = nn.value_and_grad(fused, loss_fn)(fused, x, y)
    np.testing.assert_allclose(floss.item(), loss.item(), rtol=1e-5)
    assert_trees_close(fgrads, grads)


QUANTIZED = [(n, 4, "affine") for n in sorted(ARCHS)] + [(n, 8, "affine") for n in sorted(CORE)] + [
    (n, b, mode) for n in ("llama", "mixtral") for b, mode in ((4, "mxfp4"), (8, "mxfp8"))]


@pytest.mark.parametrize("name,bits,mode", archs("quantized", QUANTIZED))
def test_quantized_logits(name, bits, mode):
    model = build(name)
    # Layers whose input width is not a multiple of the group size stay in float.
    nn.quantize(model, group_size=32, bits=bits, mode=mode,
                class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0)
    # MORE replays eagerly here: the same entries, without one C++ build per graph (CPU mx.compile).
    fused = mlx_fusion.fuse(model, compile=name in CORE)
    x = tokens(3)
    # (on a GPU, MLX's mxfp8 dequantize does not go through FromFP8: it traces, nothing falls back)
    expected = None if on_gpu() else QUANTIZED_FALLBACK.get(mode)
    assert_trees_close(fused_call(name, fused, x, expected=expected), model(x))


def add_lora(model):
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    # lora_b starts at zero, which makes lora_a's gradient zero: give it values.
    for path, p in tree_flatten(model.trainable_parameters()):
        if path.endswith("lora_b"):
            model.update(tree_unflatten([(path, mx.random.normal(p.shape) * 0.1)]))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("name", sorted(CORE))
def test_lora_logits_and_gradients(name):
    model = add_lora(build(name))
    fused = mlx_fusion.fuse(model)
    x, y = tokens(4), tokens(5)
    assert_trees_close(fused_call(name, fused, x), model(x))
    _, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
    _, fgrads = nn.value_and_grad(fused, loss_fn)(fused, x, y)
    assert any("lora_a" in k for k, _ in tree_flatten(grads))
    assert_trees_close(fgrads, grads)


def train(model, steps=3):
    optimizer = optim.AdamW(learning_rate=1e-2)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    x, y = tokens(10), tokens(11)  # one batch, so the loss must fall
    return [step(x, y).item() for _ in range(steps)]


@pytest.mark.parametrize("name", archs("compiled_training", [(n,) for n in sorted(CORE)]))
def test_compiled_training_step(name):
    expect = train(build(name))
    fused = mlx_fusion.fuse(build(name))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always", FusionFallbackWarning)
        losses = train(fused)
    if name not in EXPECTED_FALLBACK:
        assert not fused.fusion_fallbacks
    # On a GPU, AdamW (lr 1e-2) turns ulp-level gradient differences of the kernels into visible
    # loss differences within three steps (gemma's GeGLU on the H200: first loss equal to 4e-6,
    # third 1.4e-3 apart; sixth session); a fault shows up as O(1) or as a loss that does not fall.
    np.testing.assert_allclose(losses, expect, rtol=GPU_RELATIVE if on_gpu() else 1e-4)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("compile", [True, False])
def test_stop_gradient_is_never_differentiated_through(compile):
    """mx.export_function drops StopGradient: a trace that meets a floating-point one is refused
    (one warning), so the gradient is MLX's even when the rest would fuse (add + relu here)."""
    f = lambda x, y: (mx.stop_gradient(x * 2) + nn.relu(x + y)).sum()  # noqa: E731
    x, y = mx.array([1.0, -2.0, 3.0]), mx.ones((3,))
    fused = mlx_fusion.fuse(f, compile=compile)
    with pytest.warns(FusionFallbackWarning, match="stop_gradient"):
        got = mx.grad(fused)(x, y)
    assert mx.array_equal(got, mx.grad(f)(x, y))
    ints = lambda x: (x * mx.stop_gradient(mx.argmax(x)).astype(x.dtype)).sum()  # noqa: E731
    assert mx.array_equal(mx.grad(mlx_fusion.fuse(ints, compile=compile))(x), mx.grad(ints)(x))
    # mlx.nn's own max shift (log_softmax, cross_entropy) cancels out of the gradient: traced as usual
    shifted = lambda x, y: (nn.log_softmax(x * y) + nn.relu(x + y)).sum()  # noqa: E731
    fused_shifted = mlx_fusion.fuse(shifted, compile=compile)
    assert mx.allclose(mx.grad(fused_shifted)(x, y), mx.grad(shifted)(x, y)).item()
    assert fused_shifted.graphs and not fused_shifted.fallbacks
