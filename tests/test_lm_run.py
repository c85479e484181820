"""`mlx-fusion run mlx_lm.<command>`: mlx-lm's own commands with every model they load fused,
end to end on a model directory the test writes itself (random weights, offline tokenizer)."""

import json
import os
import runpy
import subprocess
import sys
import warnings

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("mlx_lm")

import mlx_fusion  # noqa: E402
from mlx_fusion.fuse import _FusedModule  # noqa: E402
from mlx_fusion.lm import is_patched, patch_mlx_lm, run_module, unpatch_mlx_lm  # noqa: E402
from mlx_fusion.lm.tiny import WORDS, write_model_dir  # noqa: E402

PROMPT = "the cat sat on"
EVERY_SIZE = mlx_fusion.FusionConfig(min_tensor_size=1)  # the tiny model's ops are all below the default
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_model_dir(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    yield
    unpatch_mlx_lm()


def _plain(target, argv, monkeypatch):
    """The same command without mlx-fusion (as `python -m target argv` would run it)."""
    monkeypatch.setattr(sys, "argv", [target, *argv])
    try:
        with warnings.catch_warnings():  # mlx_lm is imported already: runpy says so
            warnings.simplefilter("ignore", RuntimeWarning)
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code or 0
    return 0


def _generated_text(out: str) -> str:
    """mlx_lm.generate prints the text between two '==========' lines."""
    parts = out.split("==========")
    assert len(parts) >= 3, out
    return parts[1].strip()


def test_patch_rebinds_every_loader_and_unpatch_restores():
    import mlx_lm
    import mlx_lm.lora
    import mlx_lm.utils

    generate = sys.modules["mlx_lm.generate"]  # mlx_lm.generate is the function of that name
    originals = mlx_lm.utils.load, mlx_lm.utils.load_model
    patch_mlx_lm()
    assert is_patched()
    for module in (mlx_lm, generate, mlx_lm.lora, mlx_lm.utils):
        assert module.load is not originals[0] and module.load.__mlx_fusion_original__ is originals[0]
    assert mlx_lm.utils.load_model.__mlx_fusion_original__ is originals[1]
    patch_mlx_lm(compile=False)  # again: replaces, never wraps twice
    assert generate.load.__mlx_fusion_original__ is originals[0]
    unpatch_mlx_lm()
    assert not is_patched()
    assert (mlx_lm.utils.load, mlx_lm.utils.load_model) == originals
    assert generate.load is originals[0] and mlx_lm.load is originals[0]


def test_patched_load_returns_a_fused_model_with_the_same_logits(model_dir):
    from mlx_lm import load

    plain, tokenizer = load(model_dir)
    patch_mlx_lm()
    import mlx_lm

    fused, _ = mlx_lm.load(model_dir)
    fused_too, _ = mlx_lm.utils.load_model(__import__("pathlib").Path(model_dir))
    assert isinstance(fused, _FusedModule) and isinstance(fused, type(plain)) and isinstance(fused_too, _FusedModule)
    tokens = mx.array([tokenizer.encode(PROMPT)])
    np.testing.assert_allclose(np.array(fused(tokens)), np.array(plain(tokens)), atol=1e-5)


def test_tokenizer_is_offline_and_word_level(model_dir):
    from mlx_lm import load

    _, tokenizer = load(model_dir)
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    assert ids == [3 + WORDS.index(w) for w in PROMPT.split()]
    assert json.load(open(os.path.join(model_dir, "config.json")))["eos_token_id"] == tokenizer.eos_token_id


def test_generate_step_greedy_tokens_fused_equal_plain(model_dir):
    """Decoding with mlx-lm's KV cache through a fused model (issue 11): fails until fuse() handles caches."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    plain, tokenizer = load(model_dir)
    prompt = mx.array(tokenizer.encode(PROMPT))
    want = [int(t) for t, _ in generate_step(prompt, plain, max_tokens=6)]
    assert len(set(want)) > 1  # the seed gives varied tokens, so the comparison means something
    for compile in (False, True):
        fused = mlx_fusion.fuse(plain, EVERY_SIZE, compile=compile)
        got = [int(t) for t, _ in generate_step(prompt, fused, max_tokens=6)]
        assert got == want, f"compile={compile}"


def test_run_mlx_lm_generate_prints_the_plain_text(model_dir, capsys, monkeypatch):
    """`mlx-fusion run mlx_lm.generate ...` in process; needs the KV cache fix (issue 11)."""
    argv = ["--model", model_dir, "--prompt", PROMPT, "--max-tokens", "6"]
    assert _plain("mlx_lm.generate", argv, monkeypatch) == 0
    want = _generated_text(capsys.readouterr().out)
    assert want
    assert run_module("mlx_lm.generate", argv, EVERY_SIZE) == 0
    assert _generated_text(capsys.readouterr().out) == want
    assert not is_patched()


def test_run_generate_plumbing_with_fusion_disabled(model_dir, capsys, monkeypatch):
    """The drop-in itself, independent of the KV cache fix: a fused model with fusion turned
    off runs its original code, so the text must be the plain text."""
    argv = ["--model", model_dir, "--prompt", PROMPT, "--max-tokens", "6"]
    assert _plain("mlx_lm.generate", argv, monkeypatch) == 0
    want = _generated_text(capsys.readouterr().out)
    mlx_fusion.reset_stats()
    assert run_module("mlx_lm.generate", argv, config=mlx_fusion.FusionConfig(enabled=False), summary=True) == 0
    out, err = capsys.readouterr()
    assert _generated_text(out) == want
    assert "deprecated" not in out  # run as the mlx_lm.generate command, not python -m mlx_lm.generate
    assert "mlx-fusion: 1 model(s) loaded fused" in err


def test_run_mlx_lm_lora_trains_the_same_adapters(model_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 8), ("valid", 4)):
        with open(data / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": " ".join(rng.choice(WORDS, 10))}) + "\n")
    common = ["lora", "--model", model_dir, "--train", "--data", str(data), "--iters", "3", "--batch-size", "2",
              "--steps-per-eval", "3", "--val-batches", "1", "--num-layers", "2"]
    assert _plain("mlx_lm", common + ["--adapter-path", str(tmp_path / "plain")], monkeypatch) == 0
    capsys.readouterr()
    mlx_fusion.reset_stats()
    assert run_module("mlx_lm", common + ["--adapter-path", str(tmp_path / "fused")], summary=True) == 0
    err = capsys.readouterr().err
    assert "mlx-fusion: 1 model(s) loaded fused" in err, err
    want = mx.load(str(tmp_path / "plain" / "adapters.safetensors"))
    got = mx.load(str(tmp_path / "fused" / "adapters.safetensors"))
    assert set(got) == set(want) and want
    for k in want:
        np.testing.assert_allclose(np.array(got[k]), np.array(want[k]), atol=1e-5, err_msg=k)


def test_run_returns_the_commands_exit_code(capsys, tmp_path):
    assert run_module("mlx_lm.generate", ["--no-such-flag"]) == 2
    assert run_module("mlx_lm.generate", ["--help"]) == 0
    script = tmp_path / "exits.py"
    script.write_text("import sys\nsys.exit(sys.argv[1] if sys.argv[1] != '3' else 3)\n")
    assert run_module(str(script), ["3"]) == 3
    capsys.readouterr()
    assert run_module(str(script), ["bad input"]) == 1
    assert capsys.readouterr().err.strip() == "bad input"  # as Python prints sys.exit("...")
    assert not is_patched()


def test_run_parser_passes_arguments_through():
    import argparse

    from mlx_fusion.lm import add_run_parser

    ap = argparse.ArgumentParser()
    add_run_parser(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["run", "--no-compile", "--min-size", "0", "mlx_lm.lora", "--model", "m", "--train", "-h"])
    assert (args.target, args.args, args.no_compile, args.min_size, args.quiet) == (
        "mlx_lm.lora", ["--model", "m", "--train", "-h"], True, 0, False)
    with pytest.raises(SystemExit) as e:
        ap.parse_args(["run", "--min-size", "-1", "mlx_lm.generate"])
    assert e.value.code == 2


def test_run_a_script_or_module_that_loads_with_mlx_lm(model_dir, tmp_path, capsys, monkeypatch):
    script = tmp_path / "user_script.py"
    script.write_text("import sys\nfrom mlx_lm import load\nmodel, _ = load(sys.argv[1])\n"
                      "print('fused' if type(model).__name__.startswith('Fused') else 'plain')\n")
    assert run_module(str(script), [model_dir]) == 0
    assert capsys.readouterr().out.strip() == "fused"
    monkeypatch.syspath_prepend(str(tmp_path))
    assert run_module("user_script", [model_dir]) == 0  # python -m user_script
    assert capsys.readouterr().out.strip() == "fused"


def test_command_line_subprocess(model_dir):
    """`python -m mlx_fusion.lm` is `mlx-fusion run`: the same parser and handler."""
    env = {**os.environ, **OFFLINE}
    cmd = [sys.executable, "-m", "mlx_fusion.lm", "--min-size", "1", "mlx_lm", "generate", "--model", model_dir,
           "--prompt", PROMPT, "--max-tokens", "4"]
    plain = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", *cmd[7:]], capture_output=True, text=True,
                           env=env, timeout=300)
    assert plain.returncode == 0, plain.stderr
    fused = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert "mlx-fusion: 1 model(s) loaded fused" in fused.stderr  # the summary line, even when the command fails
    assert fused.returncode == 0, fused.stderr[-2000:]
    assert _generated_text(fused.stdout) == _generated_text(plain.stdout)
