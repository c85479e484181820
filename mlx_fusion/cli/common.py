"""What every subcommand shares: exit codes, consoles, one-line errors, output paths
checked before the work, JSON reports (written atomically; `-` is standard output),
tables that fit the terminal and progress lines that also show off a terminal."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import mlx.core as mx

from ..models.spec import describe_demos

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_COREMLTOOLS, EXIT_TRACE, EXIT_INTERRUPTED = 0, 1, 2, 5, 6, 130
BENCH_SCHEMA = "mlx-fusion-bench/1"

SPEC_HELP = ("model SPEC: a demo model NAME[:key=value,...] or path/to/file.py:factory where "
             "factory() returns (model, example_inputs). Demo models: " + "; ".join(describe_demos()))


class UsageError(Exception):
    """A bad option value found after argparse (exit 2)."""


def consoles():
    """(stdout console, stderr console)."""
    from rich.console import Console

    out = Console(highlight=False)
    if not out.is_terminal and not os.environ.get("COLUMNS"):  # piped: don't squeeze tables into 80 columns
        out = Console(highlight=False, width=200)
    err = Console(stderr=True, highlight=False)
    if not err.is_terminal and not os.environ.get("COLUMNS"):
        err = Console(stderr=True, highlight=False, width=200)
    return out, err


def error(err, message: str) -> None:
    """The one `error: ...` line on stderr."""
    from rich.text import Text

    err.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)  # one line, however long


def set_device(name: Optional[str]) -> None:
    if name == "gpu" and not mx.is_available(mx.gpu):
        raise UsageError("--device gpu: this MLX build has no GPU backend (Metal or CUDA) available")
    if name:
        mx.set_default_device(mx.gpu if name == "gpu" else mx.cpu)


def check_writable(path: Optional[str], option: str) -> None:
    """UsageError now, before minutes of work, if `path` cannot be written as a file."""
    if path is None or path == "-":  # "-": standard output
        return
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        problem = "is a directory"
    elif not parent.is_dir():
        problem = f"directory {parent} does not exist"
    elif not os.access(p if p.exists() else parent, os.W_OK):
        problem = "permission denied"
    else:
        return
    raise UsageError(f"{option} {path}: cannot write ({problem})")


def write_text(path: str, text: str, option: str, err) -> None:
    try:
        Path(path).write_text(text)
    except OSError as e:  # changed since check_writable: still one line, not a traceback
        raise UsageError(f"{option} {path}: cannot write ({e.strerror or e})") from None
    err.print(f"wrote {path}")


def env(argv: List[str]) -> dict:
    """The keys every JSON report starts with (docs/cli.md)."""
    from .. import __version__
    from ..device import device_description, device_id, device_kind

    return {"schema": BENCH_SCHEMA, "command": "mlx-fusion " + " ".join(argv), "argv": list(argv),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_description(), "device_kind": device_kind(), "device_id": device_id(),
            "mlx_version": mx.__version__, "mlx_fusion_version": __version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _clean(x):
    """JSON has no NaN/inf: write null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path: str, data: dict, err, quiet: bool = False) -> None:
    """Write the report to `path` ("-": standard output) as one valid JSON document: to a
    temp file next to it, then an atomic rename, so a reader (or a crash) never sees half a
    file. `quiet`: no "wrote PATH" line (incremental rewrites)."""
    text = json.dumps(_clean(data), indent=1) + "\n"
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, p)
    except OSError as e:  # changed since check_writable: still one line, not a traceback
        try:
            tmp.unlink()
        except OSError:
            pass
        raise UsageError(f"--json {path}: cannot write ({e.strerror or e})") from None
    if not quiet:
        err.print(f"wrote {path}", markup=False)


def print_table(out, table, drop: Sequence[str] = ()) -> None:
    """Print `table` within the console's width: while it is too wide, drop the columns
    named in `drop`, in that order (the dropped ones are named under the table). Without
    `drop` (or once all are gone) a terminal narrower than the table wraps its lines rather
    than rich eliding numbers."""
    from rich.measure import Measurement

    def need() -> int:
        return Measurement.get(out, out.options.update(max_width=10_000), table).maximum

    dropped = []
    for name in drop:
        if need() <= out.width:
            break
        col = next((c for c in table.columns if c.header == name), None)
        if col is not None:
            table.columns.remove(col)
            dropped.append(name)
    if not drop and need() > out.width:
        out.width = need()
    out.print(table)
    if dropped:
        out.print(f"(narrow terminal: columns {', '.join(dropped)} left out; --json has them)", markup=False)


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM and SIGINT raise KeyboardInterrupt inside the block, so `kill PID` (or a CI
    timeout) keeps what was measured like Ctrl-C does — also in a process that inherited
    SIGINT as ignored (a job a non-interactive shell started in the background), where
    Python would otherwise never raise it. A no-op off the main thread."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


class ProgressLines:
    """One line per finished step on stderr, on a terminal or not ("[3/12] ... 4.1 s"), so
    a long run piped to a file or a CI log is never silent."""

    def __init__(self, err, total: int):
        self.err, self.total, self.done, self.start = err, total, 0, time.monotonic()

    def finished(self, text: str) -> None:
        self.done += 1
        self.err.print(f"[{self.done}/{self.total}] {text}  ({time.monotonic() - self.start:.1f} s)",
                       markup=False, highlight=False, soft_wrap=True)
        self.err.file.flush()


def spread_text(low: Optional[float], high: Optional[float], digits: int = 2) -> str:
    """"0.97-1.12": lower and upper quartile over the repeats; "-" when unknown."""
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "-"
    return f"{low:.{digits}f}-{high:.{digits}f}"


def speedup_text(x: Optional[float]) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    color = "green" if x >= 1.05 else ("red" if x <= 0.95 else "")
    return f"[{color}]{x:.2f}x[/]" if color else f"{x:.2f}x"


class _NoBar:
    """`progress()` off a terminal: the progress lines say it all."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass

    def advance(self, *args, **kwargs):
        pass


def progress(err):
    """A transient rich progress bar on a terminal; a do-nothing stand-in elsewhere."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not err.is_terminal:
        return _NoBar()
    return Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=True)


def bytes_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
