"""Run mlx-lm's own commands with every model they load fused (a drop-in, as Liger patches
Hugging Face models).

    mlx-fusion run mlx_lm.generate --model DIR --prompt "hi" --max-tokens 5
    mlx-fusion run mlx_lm.lora --model DIR --train --data DATA --iters 10
    mlx-fusion run --no-compile mlx_lm generate --model DIR     # the `mlx_lm generate` command
    mlx-fusion run my_script.py --my-flag                       # a script that calls mlx_lm.load

or, in your own code, one line before loading:

    import mlx_fusion.lm; mlx_fusion.lm.patch_mlx_lm()
    from mlx_lm import load, generate
    model, tokenizer = load("path/or/repo")                 # model is mlx_fusion.fuse(model)

`patch_mlx_lm` wraps ``mlx_lm.utils.load_model`` and ``mlx_lm.utils.load`` so the model
they return is ``mlx_fusion.fuse(model)``, and rebinds those names in every mlx_lm module
already imported (``mlx_lm.generate``, ``mlx_lm.lora``, ... import them with ``from .utils
import load``); modules imported later pick up the patched functions from mlx_lm.utils.
``load`` calls ``load_model``; `fuse` of a fused model returns it, so a model is fused once.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import runpy
import sys
import warnings
from typing import List, Optional

__all__ = ["patch_mlx_lm", "unpatch_mlx_lm", "is_patched", "run_module", "add_run_parser", "cmd_run", "summary_line"]

_NAMES = ("load_model", "load")
_originals: dict = {}  # name -> mlx_lm.utils's own function, while patched


def _fused_loader(original, fuse_model):
    @functools.wraps(original)
    def load_fused(*args, **kwargs):
        result = original(*args, **kwargs)  # (model, config) or (model, tokenizer[, config])
        return (fuse_model(result[0]), *result[1:])

    load_fused.__mlx_fusion_original__ = original
    return load_fused


def _rebind(old, new) -> None:
    """Point every loaded mlx_lm module's global bound to `old` at `new`."""
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "mlx_lm" or name.startswith("mlx_lm.")):
            continue
        for attr, value in list(vars(module).items()):
            if value is old:
                setattr(module, attr, new)


def patch_mlx_lm(config=None, *, compile: bool = True) -> None:
    """Make mlx-lm's loaders return fused models: ``fuse(model, config, compile=compile)``.

    Args:
        config (FusionConfig, optional): passed to `mlx_fusion.fuse`.
        compile (bool): passed to `mlx_fusion.fuse`. Default: ``True``.

    Calling it again replaces the options; `unpatch_mlx_lm` restores mlx-lm.
    """
    from ..fuse import fuse

    _patch(functools.partial(fuse, config=config, compile=compile))


def _patch(fuse_model) -> None:
    import mlx_lm.utils as utils

    unpatch_mlx_lm()
    for name in _NAMES:
        original = getattr(utils, name)
        _originals[name] = original
        _rebind(original, _fused_loader(original, fuse_model))


def unpatch_mlx_lm() -> None:
    """Undo `patch_mlx_lm` (models already loaded stay fused)."""
    import mlx_lm.utils as utils

    for name, original in list(_originals.items()):
        _rebind(getattr(utils, name), original)
        del _originals[name]


def is_patched() -> bool:
    return bool(_originals)


def _console_script(name: str):
    """The installed console script called `name` (``mlx_lm.generate``, ``mlx_lm``), if any."""
    from importlib.metadata import entry_points

    found = entry_points(group="console_scripts", name=name)
    return next(iter(found), None)


def run_module(target: str, argv: List[str], config=None, compile: bool = True, summary: bool = False) -> int:
    """Run `target` with ``sys.argv = [target, *argv]`` and mlx-lm patched; returns its exit code.

    `target` is a ``.py`` file (run as ``__main__``), an installed console script
    (``mlx_lm.generate``, ``mlx_lm.lora``, ``mlx_lm``: its function is called, as typing the
    command does), or else a module run as ``python -m target`` would.

    With `summary`, print `summary_line` to stderr at the end (also when the command raises)."""
    from ..fuse import fuse

    saved_argv, loaded = sys.argv, []

    def fuse_and_keep(model):  # kept until the summary is printed: the command has dropped them by then
        loaded.append(fuse(model, config, compile=compile))
        return loaded[-1]

    _patch(fuse_and_keep)
    try:
        sys.argv = [target, *argv]
        script = _console_script(target)
        if target.endswith(".py") or os.path.isfile(target):
            runpy.run_path(target, run_name="__main__")
        elif script is not None:  # what typing `mlx_lm.generate ...` runs
            code = script.load()()
            return code if isinstance(code, int) else 0
        else:
            with warnings.catch_warnings():
                # _patch imported mlx_lm (whose __init__ imports mlx_lm.generate): harmless here
                warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package",
                                        category=RuntimeWarning)
                runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as e:  # argparse, sys.exit(): the command's own exit code
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)  # sys.exit("message"): what Python itself would do
        return 1
    finally:
        sys.argv = saved_argv
        unpatch_mlx_lm()
        if summary:
            print(summary_line(loaded), file=sys.stderr)
    return 0


def summary_line(models) -> str:
    """One line: how many `models` were loaded fused, and what fusion did in this process
    (`mlx_fusion.stats`: every live fused object, the submodules a model fused itself too)."""
    from ..fuse import stats

    s = stats()
    reasons = sorted({f["reason"] for f in s["fallbacks"]})
    return (f"mlx-fusion: {len({id(m) for m in models})} model(s) loaded fused; {s['fused_objects']} fused "
            f"object(s), {s['traces']} trace(s), {s['applied_count']} fusion(s) applied"
            + (f"; ran unfused: {'; '.join(reasons)}" if reasons else ""))


def add_run_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``mlx-fusion run`` to an argparse subparsers object (called by mlx_fusion/cli.py)."""
    p = subparsers.add_parser(
        "run", help="run an mlx-lm command (or a script) with every model it loads fused",
        description="Run COMMAND (e.g. mlx_lm.generate, mlx_lm.lora, or any module or .py file) with ARGS, "
                    "with mlx_lm's load/load_model patched to return mlx_fusion.fuse(model). "
                    "Exits with the command's exit code; prints one summary line to stderr.")
    p.add_argument("--no-compile", action="store_true",
                   help="fuse(model, compile=False): replay the fused graph eagerly")
    p.add_argument("--min-size", type=_size, metavar="N",
                   help="fuse outputs of at least N elements (default: the config's, 4096)")
    p.add_argument("--quiet", action="store_true", help="do not print the fusion summary line (stderr) at the end")
    p.add_argument("target", metavar="COMMAND",
                   help="an installed command (mlx_lm.generate, mlx_lm.lora, mlx_lm), a module run as with "
                        "python -m, or a .py file")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="passed to COMMAND unchanged")
    p.set_defaults(func=cmd_run)
    return p


def _size(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, not {text!r}")
    return n


def cmd_run(args) -> int:
    config = None
    if args.min_size is not None:
        from ..config import get_config

        config = dataclasses.replace(get_config(), min_tensor_size=args.min_size)
    return run_module(args.target, list(args.args), config, compile=not args.no_compile, summary=not args.quiet)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m mlx_fusion.lm MODULE ARGS...`` (what ``mlx-fusion run`` does)."""
    ap = argparse.ArgumentParser(prog="mlx-fusion")
    sub = ap.add_subparsers(dest="command")
    add_run_parser(sub)
    args = ap.parse_args(["run", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
