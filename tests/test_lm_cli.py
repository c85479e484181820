"""mlx-lm models as a model SPEC (`mlx_fusion.lm.spec.build`) and their timing rows (`bench_lm`)."""

import json
import math
import warnings

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("mlx_lm")

import mlx_fusion  # noqa: E402

from mlx_fusion.lm import bench_lm, build, is_lm_spec, model_config, tiny_model  # noqa: E402
from mlx_fusion.lm.spec import parse  # noqa: E402
from mlx_fusion.models import EXIT_BAD_SPEC, EXIT_LOAD_FAILED, SpecError  # noqa: E402

BENCH_MODEL_KEYS = {"pass", "variant", "time_ms", "speedup_vs_eager", "speedup_vs_compiled", "peak_memory_bytes",
                    "activation_memory_bytes", "max_abs_diff", "fusions"}  # models.bench_model's rows


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3",
                                  "starcoder2", "gpt2", "gpt_neox", "olmo2", "mixtral", "qwen2_moe"])
def test_default_spec_builds_a_small_model_that_fuses(arch):
    model, (tokens,) = build(f"mlx-lm:{arch}")
    assert type(model).__module__.startswith("mlx_lm.models.")
    assert tokens.shape == (2, 32) and tokens.dtype == mx.int32
    assert 0 <= tokens.min().item() and tokens.max().item() < model_config(arch)["vocab_size"]
    logits = model(tokens)
    assert logits.shape == (2, 32, 96)
    assert not model.training
    with warnings.catch_warnings():  # a fallback (e.g. an unsupported primitive) is allowed: it is never wrong
        warnings.simplefilter("ignore", mlx_fusion.FusionFallbackWarning)
        fused = mlx_fusion.fuse(model, mlx_fusion.FusionConfig(min_tensor_size=1))(tokens)
    np.testing.assert_allclose(np.array(fused), np.array(logits), atol=1e-4)


def test_options_reach_model_args_and_inputs():
    spec = ("mlx-lm:llama:hidden_size=48,num_hidden_layers=3,num_attention_heads=6,num_key_value_heads=3,"
            "vocab_size=50,rope_traditional=true,dtype=bfloat16,batch=3,seq=5,seed=7")
    assert is_lm_spec(spec) and not is_lm_spec("transformer:dim=64")
    model, (tokens,) = build(spec)
    args = model.args
    assert (args.hidden_size, args.num_hidden_layers, args.num_attention_heads, args.num_key_value_heads,
            args.vocab_size, args.rope_traditional, args.head_dim) == (48, 3, 6, 3, 50, True, 8)
    assert len(model.layers) == 3 and model.layers[0].self_attn.q_proj.weight.dtype == mx.bfloat16
    assert tokens.shape == (3, 5)
    assert model(tokens).shape == (3, 5, 50)
    again, (same,) = build(spec)  # a seed makes the weights and tokens reproducible
    assert mx.array_equal(same, tokens) and mx.array_equal(again.lm_head.weight, model.lm_head.weight)


def test_parse_values():
    head, overrides, own = parse("mlx-lm:llama:rope_theta=500000.0,rope_scaling=null,hidden_size=32,seq=4")
    assert head == "llama" and own["seq"] == 4 and own["batch"] == 2
    assert overrides == {"rope_theta": 500000.0, "rope_scaling": None, "hidden_size": 32}


@pytest.mark.parametrize("spec,code,words", [
    ("mlx-lm:llama:bogus=1", EXIT_BAD_SPEC, ["bogus", "hidden_size"]),
    ("mlx-lm:llama:batch=0", EXIT_BAD_SPEC, ["batch"]),
    ("mlx-lm:llama:dtype=int8", EXIT_BAD_SPEC, ["dtype"]),
    ("mlx-lm:llama:hidden_size", EXIT_BAD_SPEC, ["key=value"]),
    ("mlx-lm:", EXIT_BAD_SPEC, ["mlx-lm:<arch>"]),
    ("mlx-lm:no_such_arch", EXIT_BAD_SPEC, ["no_such_arch"]),
    ("mlx-lm:llama:rope_scaling=5", EXIT_BAD_SPEC, ["cannot build"]),
    ("mlx-lm:./no/such/dir", EXIT_LOAD_FAILED, ["no such model directory"]),
])
def test_bad_specs_raise_spec_error_with_exit_code(spec, code, words):
    with pytest.raises(SpecError) as e:
        build(spec)
    assert e.value.exit_code == code
    for w in words:
        assert w in str(e.value)


def test_local_model_directory_loads_with_mlx_lm(tmp_path):
    from mlx_lm.utils import save_config, save_model

    config = model_config("qwen2", vocab_size=40, hidden_size=32, intermediate_size=64)
    model = tiny_model(config, seed=3)
    save_model(tmp_path, model)
    save_config(dict(config), tmp_path / "config.json")
    loaded, (tokens,) = build(f"mlx-lm:{tmp_path}:batch=1,seq=6")
    assert tokens.shape == (1, 6) and tokens.max().item() < 40
    np.testing.assert_array_equal(np.array(loaded(tokens)), np.array(model(tokens)))
    with pytest.raises(SpecError) as e:
        build(f"mlx-lm:{tmp_path / 'model.safetensors'}")
    assert e.value.exit_code == EXIT_LOAD_FAILED
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="no config.json"):
        build(f"mlx-lm:{tmp_path / 'empty'}")


@pytest.fixture(scope="module")
def rows():
    model, (tokens,) = build("mlx-lm:llama:hidden_size=32,intermediate_size=64,vocab_size=40,batch=2,seq=8")
    return bench_lm(model, tokens, new_tokens=4, prompt_len=6, repeats=1, warmup=0, min_time_s=0, calls_per_eval=2)


def test_bench_rows_have_the_bench_model_shape(rows):
    assert [(r["pass"], r["variant"]) for r in rows] == [
        (p, v) for p in ("prefill", "decode", "train") for v in ("eager", "mx.compile", "fused", "fused+compile")]
    for r in rows:
        assert BENCH_MODEL_KEYS <= set(r) and {"tokens_per_s", "note"} <= set(r)
    from mlx_fusion.cli import _clean

    json.dumps(_clean(rows), allow_nan=False)  # what --json writes


def test_bench_prefill_and_train_agree_with_eager(rows):
    for r in rows:
        if r["pass"] in ("prefill", "train"):
            assert math.isfinite(r["time_ms"]) and r["time_ms"] > 0, r
            assert r["peak_memory_bytes"] > 0 and r["tokens_per_s"] > 0
            assert r["max_abs_diff"] < 1e-4, r
    eager = [r for r in rows if r["variant"] == "eager"]
    assert all(r["speedup_vs_eager"] == 1.0 for r in eager)


def test_bench_decode_eager_and_not_applicable_compile(rows):
    decode = {r["variant"]: r for r in rows if r["pass"] == "decode"}
    assert decode["eager"]["tokens_per_s"] > 0 and decode["eager"]["tokens_match"]
    assert math.isnan(decode["mx.compile"]["time_ms"]) and "not applicable" in decode["mx.compile"]["note"]


@pytest.mark.parametrize("variant", ["fused", "fused+compile"])
def test_bench_decode_fused_greedy_tokens_match_eager(rows, variant):
    """Needs fuse() to handle mlx-lm's KV cache (issue 11): fails until then."""
    r = next(r for r in rows if r["pass"] == "decode" and r["variant"] == variant)
    assert r["note"] == "" or not r["note"].startswith("failed"), r["note"]
    assert r["tokens_match"] and r["max_abs_diff"] < 1e-4


def test_a_failing_variant_is_a_row_not_a_crash(monkeypatch):
    import mlx_fusion.lm.timing as timing

    def broken(*a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(timing, "train_step", broken)
    model, (tokens,) = build("mlx-lm:llama:hidden_size=32,intermediate_size=64,batch=1,seq=4")
    rows = bench_lm(model, tokens, passes=("train",), repeats=1, warmup=0, min_time_s=0)
    assert all(math.isnan(r["time_ms"]) and r["note"] == "failed: RuntimeError: boom" for r in rows)
    with pytest.raises(ValueError, match="unknown pass"):
        bench_lm(model, tokens, passes=("backward",))


def test_bench_takes_the_cli_timing_settings():
    from mlx_fusion.benchmark import default_timing

    model, (tokens,) = build("mlx-lm:qwen2:hidden_size=32,intermediate_size=64,batch=1,seq=4")
    rows = bench_lm(model, tokens, passes=("prefill",), **{**default_timing(quick=True), "min_time_s": 0})
    assert len(rows) == 4 and all(r["time_ms"] > 0 for r in rows)


def test_inspect_accepts_an_mlx_lm_spec(capsys):
    """models.load_spec hands mlx-lm: SPECs to lm.build (SPEC_BUILDERS); inspect explains the model."""
    from mlx_fusion.cli import main

    code = main(["inspect", "mlx-lm:llama:hidden_size=32,intermediate_size=64,batch=1,seq=8", "--min-size", "1"])
    out, _ = capsys.readouterr()
    assert code == 0 and "candidates fused" in out and "model.layers.0.mlp" in out


def test_bench_model_json_keeps_finished_mlx_lm_passes(tmp_path):
    """bench --model mlx-lm:...: the JSON is rewritten after each pass (valid at every point)."""
    from mlx_fusion.cli import main

    out = tmp_path / "lm.json"
    code = main(["bench", "--quick", "--model", "mlx-lm:llama:hidden_size=32,intermediate_size=64,batch=1,seq=8",
                 "--json", str(out)])
    data = json.loads(out.read_text())
    assert code == 0 and data["complete"] and data["measured"] == 12 == len(data["results"])


def test_cuda_memory_note_only_on_cuda_without_the_setting(monkeypatch):
    from mlx_fusion.cli import bench

    monkeypatch.delenv("MLX_MAX_MB_PER_BUFFER", raising=False)
    monkeypatch.setattr("mlx_fusion.device.current_device_kind", lambda: "cpu")
    assert bench.cuda_memory_note() == ""
    monkeypatch.setattr("mlx_fusion.device.current_device_kind", lambda: "cuda")
    assert "MLX_MAX_MB_PER_BUFFER" in bench.cuda_memory_note()
    monkeypatch.setenv("MLX_MAX_MB_PER_BUFFER", "64")
    assert bench.cuda_memory_note() == ""
