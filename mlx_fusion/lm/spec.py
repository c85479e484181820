"""mlx-lm models as a model SPEC: random weights from `ModelArgs`, or a local model directory.

    model, (tokens,) = build("mlx-lm:llama:hidden_size=256,num_hidden_layers=4,batch=2,seq=128")
    model, (tokens,) = build("mlx-lm:/path/to/model_dir:batch=1,seq=32")

``mlx-lm:<arch>[:key=value,...]`` builds ``mlx_lm.models.<arch>.Model(ModelArgs(...))`` with
random weights. The keys are `ModelArgs` fields (any field of that architecture) plus four of
our own: ``batch`` and ``seq`` (the example token ids, default 2 x 32), ``dtype`` (float32,
float16, bfloat16; default float32) and ``seed`` (default 0). Unset required fields come from
small defaults that run on a CPU in milliseconds (`model_config`).

``mlx-lm:<dir>[:batch=..,seq=..,dtype=..]`` (a path with a ``/``: ``./name``, not ``name``) loads a converted model with mlx-lm's own
``load_model`` (no network, no tokenizer needed).

The result is what `mlx_fusion.models.load_spec` returns: ``(model, (tokens,))`` with int32
token ids of shape (batch, seq). Errors raise `mlx_fusion.models.SpecError` (exit code 3 for
a bad SPEC, 4 for a directory or architecture that does not load).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any, Dict, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..models import EXIT_LOAD_FAILED, SpecError

__all__ = ["PREFIX", "is_lm_spec", "build", "parse", "model_config", "tiny_model", "OWN_OPTIONS"]

PREFIX = "mlx-lm:"
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
OWN_OPTIONS = {"batch": 2, "seq": 32, "dtype": "float32", "seed": 0}

# ModelArgs fields that most architectures share, small enough for a CPU test; every one an
# architecture has is set (their own defaults are often full-size).
_COMMON = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, layer_norm_eps=1e-5,
               norm_eps=1e-5, layer_norm_epsilon=1e-5, vocab_size=96, max_position_embeddings=512,
               rope_theta=10000.0, tie_word_embeddings=False,
               # mixture of experts (mixtral, qwen2_moe, ...)
               num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
               shared_expert_intermediate_size=64)
# Per architecture: what differs from _COMMON, and names some architectures use instead.
_ARCH_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "qwen2": dict(tie_word_embeddings=True),  # as Qwen2's small checkpoints
    "gpt2": dict(n_ctx=512, n_embd=64, n_head=4, n_layer=2, n_positions=512),
    "gpt_neox": dict(rotary_emb_base=10000, rotary_pct=0.25),
    "phi": dict(partial_rotary_factor=0.5),
}


def is_lm_spec(text: str) -> bool:
    """True for a SPEC that `build` handles (it starts with ``mlx-lm:``)."""
    return text.strip().startswith(PREFIX)


def _module_for(arch: str):
    from mlx_lm.utils import MODEL_REMAPPING

    name = MODEL_REMAPPING.get(arch, arch)
    try:
        return importlib.import_module(f"mlx_lm.models.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"mlx_lm.models.{name}":  # the file exists but needs a package that does not
            raise SpecError(f"mlx-lm:{arch}: cannot import mlx_lm.models.{name}: {e}", EXIT_LOAD_FAILED) from e
        raise SpecError(f"mlx-lm has no architecture {arch!r} (no mlx_lm.models.{name})") from e
    except (ImportError, SystemExit) as e:  # some model files exit when an optional package is missing
        raise SpecError(f"mlx-lm:{arch}: cannot import mlx_lm.models.{name}: {type(e).__name__}: {e}",
                        EXIT_LOAD_FAILED) from e


def _value(text: str):
    """A SPEC value as the Python value a config.json would hold: int, float, bool, None,
    JSON list/dict, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    try:
        return json.loads(text)
    except ValueError:
        return text


def model_config(arch: str, **overrides) -> dict:
    """A config dict (as in config.json) for a small `arch`: every `ModelArgs` field that
    has a default above set to it, then `overrides`. ``model_type`` is `arch`.

    Raises:
        SpecError: an override is not a field, or a required field has no value.
    """
    args_cls = _module_for(arch).ModelArgs
    fields = {f.name: f for f in dataclasses.fields(args_cls)}
    config = {"model_type": arch}
    defaults = {**_COMMON, **_ARCH_DEFAULTS.get(arch, {})}
    for name in fields:  # size fields often have full-size defaults (mixtral: 4096 x 32 layers): set all
        if name in defaults:
            config[name] = defaults[name]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise SpecError(f"mlx-lm:{arch}: unknown option(s) {', '.join(unknown)}; ModelArgs fields are "
                        + ", ".join(fields) + "; ours are " + ", ".join(f"{k}={v}" for k, v in OWN_OPTIONS.items()))
    config.update(overrides)
    if "head_dim" in config and "head_dim" not in overrides:  # follow a changed width or head count
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if "num_key_value_heads" not in overrides and heads and kv and heads % kv:
        config["num_key_value_heads"] = heads  # the default 2 does not divide a head count given: no GQA
    missing = [n for n, f in fields.items() if n not in config and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SpecError(f"mlx-lm:{arch}: ModelArgs needs {', '.join(missing)}; give them as key=value")
    return config


def tiny_model(config: dict, dtype=mx.float32, seed: int = 0) -> nn.Module:
    """`Model(ModelArgs.from_dict(config))` with random weights, evaluated, in `dtype`."""
    module = _module_for(config["model_type"])
    mx.random.seed(seed)
    try:
        model = module.Model(module.ModelArgs.from_dict(config))
    except Exception as e:  # ModelArgs/Model validate their fields: report, don't crash
        raise SpecError(f"mlx-lm:{config['model_type']}: cannot build the model: {type(e).__name__}: {e}") from e
    if dtype != mx.float32:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def parse(text: str) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
    """(architecture or directory, ModelArgs overrides, our options) of an ``mlx-lm:`` SPEC."""
    text = text.strip()
    if text.startswith(PREFIX):
        text = text[len(PREFIX):]
    if _is_dir(text.partition(":")[0]):  # a directory may contain ':' itself: options follow the last one
        head, sep, tail = text.rpartition(":")
        if not sep or "=" not in tail:
            head, tail = text, ""
    else:
        head, _, tail = text.partition(":")
    if not head:
        raise SpecError("mlx-lm SPEC: expected mlx-lm:<arch>[:key=value,...] or mlx-lm:<model dir>")
    overrides, own = {}, dict(OWN_OPTIONS)
    for item in filter(None, (o.strip() for o in tail.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SpecError(f"mlx-lm:{head}: bad option {item!r}; expected key=value")
        if key in own:
            own[key] = _own_value(head, key, value)
        else:
            overrides[key] = _value(value)
    return head, overrides, own


def _own_value(head: str, key: str, value: str):
    if key == "dtype":
        if value not in DTYPES:
            raise SpecError(f"mlx-lm:{head}: dtype must be one of {', '.join(DTYPES)}, not {value!r}")
        return value
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < (0 if key == "seed" else 1):
        raise SpecError(f"mlx-lm:{head}: {key} must be a {'non-negative' if key == 'seed' else 'positive'} "
                        f"integer, not {value!r}")
    return n


def _is_dir(head: str) -> bool:
    """A path, by its spelling (a bare name is an architecture: write ./name for a directory)."""
    return "/" in head or "\\" in head or head.startswith((".", "~"))


def _load_dir(path: Path, overrides: dict, dtype) -> nn.Module:
    from mlx_lm.utils import load_model

    if not (path / "config.json").is_file():
        raise SpecError(f"mlx-lm:{path}: not a model directory (no config.json)", EXIT_LOAD_FAILED)
    try:
        model, _ = load_model(path, model_config=overrides or None)
    except Exception as e:
        raise SpecError(f"mlx-lm:{path}: mlx-lm could not load it: {type(e).__name__}: {e}", EXIT_LOAD_FAILED) from e
    if dtype != mx.float32:
        model.set_dtype(dtype)
        mx.eval(model.parameters())
    return model


def build(spec: str) -> Tuple[nn.Module, Tuple[mx.array]]:
    """``(model, (tokens,))`` for an ``mlx-lm:`` SPEC (the prefix is optional here).

    Args:
        spec (str): ``mlx-lm:<arch>[:key=value,...]`` or ``mlx-lm:<model dir>[:batch=..,seq=..]``.

    Returns:
        tuple: the model (in eval mode, parameters evaluated) and a one-tuple of int32
        token ids of shape (batch, seq), drawn from the model's vocabulary.

    Raises:
        SpecError: the SPEC does not parse (exit code 3) or the model does not load (4).
    """
    head, overrides, own = parse(spec)
    dtype = DTYPES[own["dtype"]]
    if _is_dir(head):
        path = Path(head).expanduser()
        if not path.is_dir():
            raise SpecError(f"mlx-lm:{head}: no such model directory", EXIT_LOAD_FAILED)
        model = _load_dir(path, overrides, dtype)
        vocab = _vocab_size(model, json.loads((path / "config.json").read_text()))
    else:
        config = model_config(head, **overrides)
        model = tiny_model(config, dtype, own["seed"])
        vocab = _vocab_size(model, config)
    model.eval()
    tokens = mx.random.randint(0, vocab, (own["batch"], own["seq"]), key=mx.random.key(own["seed"])).astype(mx.int32)
    return model, (tokens,)


def _vocab_size(model: nn.Module, config: dict) -> int:
    for key in ("vocab_size", "n_vocab", "padded_vocab_size"):
        if isinstance(config.get(key), int):
            return config[key]
    args = getattr(model, "args", None)
    return int(getattr(args, "vocab_size", 2))
