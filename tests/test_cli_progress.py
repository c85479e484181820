"""`mlx-fusion bench` never loses work: progress lines off a terminal, JSON valid at every
point and kept on Ctrl-C, `--json -`, options of the other mode refused, tables that fit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlx_fusion.cli import EXIT_INTERRUPTED, EXIT_USAGE, main

ROOT = Path(__file__).resolve().parent.parent
TINY = ["bench", "--quick", "--ops", "add+relu", "--sizes", "4096,8192", "--no-cache"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_progress_lines_off_a_terminal(capsys):
    code, out, err = run(capsys, *TINY)
    assert code == 0
    lines = [ln for ln in err.splitlines() if ln.startswith("[")]
    assert [ln.split()[0] for ln in lines] == ["[1/2]", "[2/2]"]
    assert all("add+relu fwd" in ln and "vs best unfused" in ln for ln in lines)
    assert "quartiles" in out and "verdict" in out  # the spread per row


def test_json_dash_is_standard_output(capsys):
    code, out, err = run(capsys, *TINY, "--json", "-")
    assert code == 0
    data = json.loads(out)  # standard output is the JSON document alone
    assert data["complete"] is True and data["measured"] == data["planned"] == 2
    row = data["results"][0]
    assert row["speedup_low"] <= row["speedup"] <= row["speedup_high"] and row["verdict"] in (
        "faster", "slower", "noise")
    assert len(row["speedups"]) >= 1
    assert "add+relu" in err and "verdict" in err  # the table went to stderr
    assert not Path("-").exists()


@pytest.mark.parametrize("argv,flag", [
    (["--model", "mlp:width=8", "--ops", "add+relu"], "--ops"),
    (["--model", "mlp:width=8", "--dtypes", "float32"], "--dtypes"),
    (["--model", "mlp:width=8", "--sizes", "4096"], "--sizes"),
    (["--model", "mlp:width=8", "--backward"], "--backward"),
    (["--model", "mlp:width=8", "--no-cache"], "--no-cache"),
    (["--min-size", "0"], "--min-size"),
])
def test_options_of_the_other_mode_are_usage_errors(capsys, argv, flag):
    code, out, err = run(capsys, "bench", "--quick", *argv)
    assert code == EXIT_USAGE and flag in err and "not used with" in err


@pytest.mark.parametrize("columns", [100, 60])
def test_the_table_fits_the_terminal(capsys, monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    code, out, err = run(capsys, "bench", "--quick", "--ops", "add+relu,linear+bias+gelu_approx",
                         "--sizes", "4096,4x64x64", "--no-cache")
    assert code == 0
    assert max(len(ln) for ln in out.splitlines()) <= columns
    assert "narrow terminal" in out and "add+relu" in out and "speedup" in out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_keeps_valid_json_with_the_finished_rows(tmp_path, sig):
    path = tmp_path / "partial.json"
    sizes = ",".join(str(4096 * k) for k in range(1, 41))  # 40 configurations: far more than we wait for
    env = {**os.environ, "MLX_FUSION_CACHE": str(tmp_path / "cache.json"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mlx_fusion", "bench", "--quick", "--ops", "add+relu",
                             "--sizes", sizes, "--json", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        deadline = time.monotonic() + 300
        while len(seen) < 2 and time.monotonic() < deadline:  # two rows finished
            line = proc.stderr.readline()
            if not line:
                break
            if line.startswith("["):
                seen.append(line)
        assert len(seen) == 2, "no progress lines on stderr"
        during = json.loads(path.read_text())  # valid while the run goes on
        assert during["complete"] is False and during["measured"] >= 1
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, err
    data = json.loads(path.read_text())
    assert data["complete"] is False and data["interrupted"] is True
    assert 2 <= data["measured"] < 40 and len(data["results"]) == data["measured"]
    assert data["results"][0]["op"] == "add+relu"
    assert "interrupted" in err
    cache = json.loads((tmp_path / "cache.json").read_text())  # the cache kept the rows too
    assert len(cache["entries"]) >= 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_crash_leaves_the_rows_measured_before_it(capsys, monkeypatch, tmp_path):
    import mlx_fusion.benchmark as benchmark

    real, calls = benchmark.bench_case, []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(benchmark, "bench_case", crash_on_second)
    path = tmp_path / "crash.json"
    with pytest.raises(RuntimeError, match="boom"):
        main([*TINY, "--json", str(path)])
    data = json.loads(path.read_text())
    assert data["complete"] is False and data["measured"] == 1 and len(data["results"]) == 1


@pytest.mark.skipif(sys.platform == "darwin", reason="the noise is Linux's (no libcoremlpython)")
def test_importing_coremltools_is_quiet_off_macos():
    pytest.importorskip("coremltools")
    code = ("import logging; from mlx_fusion.coreml import require_coremltools; require_coremltools(); "
            "assert logging.getLogger('coremltools').level == logging.NOTSET")  # restored afterwards
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Failed to load" not in proc.stderr and "PyTorch was not found" not in proc.stderr
