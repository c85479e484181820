"""The `mlx-fusion` command on tiny sizes: output, JSON schema, exit codes, DOT text."""

import json
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_fusion.cli import BENCH_SCHEMA, EXIT_USAGE, graphs_to_dot, main
from mlx_fusion.models import DEMO_MODELS, EXIT_BAD_SPEC, EXIT_LOAD_FAILED, SpecError, load_spec, parse_spec
from mlx_fusion.tracker import PerformanceTracker

ROOT = Path(__file__).resolve().parent.parent
TINY_MLP = "mlp:width=32,depth=2,batch=8"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- help --------------------------------------------------------------------------------------------
def test_help_lists_commands_and_exit_codes(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for word in ("bench", "inspect", "Exit codes", "SPEC"):
        assert word in out


@pytest.mark.parametrize("command,options", [
    ("bench", ["--model", "--device", "--quick", "--ops", "--dtypes", "--sizes", "--backward", "--json",
               "--no-cache", "--min-size", "--merge-projections"]),
    ("inspect", ["--dot", "--json", "--device", "--min-size", "SPEC"]),
])
def test_subcommand_help_explains_every_option(capsys, command, options):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    for opt in options:
        assert opt in out
    for name in DEMO_MODELS:  # the SPEC help names the demo models
        assert name in re.sub(r"\s+", " ", re.sub(r"-\n\s+", "-", out))  # argparse wraps after a hyphen


def test_python_dash_m_help():
    p = subprocess.run([sys.executable, "-m", "mlx_fusion", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "usage: mlx-fusion" in p.stdout


def test_no_command_is_a_usage_error(capsys):
    code, out, _ = run(capsys)
    assert code == EXIT_USAGE and "usage" in out


# -- bench (ops) ---------------------------------------------------------------------------------------
def test_bench_quick_one_op_json_and_cache(capsys, tmp_path, private_cache):
    path = tmp_path / "out.json"
    code, out, err = run(capsys, "bench", "--quick", "--ops", "add+relu", "--sizes", "4096,16K",
                         "--backward", "--json", str(path))
    assert code == 0, err
    assert "add+relu" in out and "copy bandwidth" in out
    data = json.loads(path.read_text())
    for key in ("schema", "kind", "command", "argv", "timestamp", "device", "device_kind", "device_id",
                "mlx_version", "mlx_fusion_version", "settings", "copy_bandwidth", "cache", "results"):
        assert key in data
    assert (data["schema"], data["kind"], data["mlx_version"]) == (BENCH_SCHEMA, "ops", mx.__version__)
    assert data["command"].startswith("mlx-fusion bench --quick")
    assert data["settings"]["dtypes"] == ["float32"]
    assert [(r["op"], r["pass"], r["shape"]) for r in data["results"]] == [
        ("add+relu", "fwd", [1, 4096]), ("add+relu", "fwd+bwd", [1, 4096]),
        ("add+relu", "fwd", [4, 4096]), ("add+relu", "fwd+bwd", [4, 4096])]
    for key in ("eager_us", "compiled_us", "fused_us", "unfused_us", "speedup", "speedup_vs_eager",
                "speedup_vs_compiled", "fused_gbps", "copy_gbps", "pct_of_copy", "bytes_moved", "dtype", "kind"):
        assert key in data["results"][0]
    # forward results land in the cache, one per size bucket
    assert Path(data["cache"]).parent == private_cache
    assert len(PerformanceTracker().entries) == 2


def test_bench_linear_shape_and_no_cache(capsys, tmp_path, private_cache):
    path = tmp_path / "out.json"
    code, out, err = run(capsys, "bench", "--quick", "--ops", "linear+bias+gelu", "--sizes", "2x32x64",
                         "--dtypes", "bfloat16", "--no-cache", "--json", str(path))
    assert code == 0, err
    (r,) = json.loads(path.read_text())["results"]
    assert (r["shape"], r["dtype"], r["flops"]) == ([2, 32, 64], "bfloat16", 2 * 2 * 32 * 64)
    assert list(private_cache.iterdir()) == []


@pytest.mark.parametrize("argv,needle", [
    (["--ops", "pow+relu"], "--ops"),
    (["--dtypes", "float64"], "--dtypes"),
    (["--sizes", "12x3"], "--sizes"),
    (["--sizes", "-5"], "--sizes"),
    (["--device", "tpu"], "invalid choice"),
])
def test_bench_bad_options_exit_2(capsys, argv, needle):
    code, _, err = run(capsys, "bench", "--quick", *argv)
    assert code == EXIT_USAGE and needle in err


@pytest.mark.skipif(mx.is_available(mx.gpu), reason="this machine has a GPU")
def test_bench_gpu_without_gpu_exit_2(capsys):
    code, _, err = run(capsys, "bench", "--device", "gpu", "--quick", "--ops", "add+relu", "--sizes", "4096")
    assert code == EXIT_USAGE and "GPU" in err


# -- bench --model -------------------------------------------------------------------------------------
def test_bench_model_json(capsys, tmp_path):
    path = tmp_path / "model.json"
    code, out, err = run(capsys, "bench", "--model", TINY_MLP, "--quick", "--min-size", "0", "--json", str(path))
    assert code == 0, err
    assert "fused+compile" in out and "peak MiB" in out
    data = json.loads(path.read_text())
    assert data["kind"] == "model" and data["model"]["spec"] == TINY_MLP
    assert data["model"]["parameters"] == 2 * (32 * 32 + 32)
    rows = {(r["pass"], r["variant"]): r for r in data["results"]}
    assert set(rows) == {(p, v) for p in ("fwd", "fwd+bwd") for v in ("eager", "mx.compile", "fused", "fused+compile")}
    for r in rows.values():
        assert r["time_ms"] > 0 and r["peak_memory_bytes"] >= 0
    assert rows[("fwd", "fused")]["fusions"] == 2 and rows[("fwd", "eager")]["fusions"] is None
    assert rows[("fwd", "fused+compile")]["max_abs_diff"] < 1e-4


# -- model SPECs --------------------------------------------------------------------------------------
FACTORIES = '''
import mlx.core as mx
import mlx.nn as nn

def good():
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU()), mx.ones((8, 16))

def wrong_type():
    return 42

def not_arrays():
    return nn.Linear(4, 4), ("x",)

def raises():
    raise RuntimeError("boom")

NOT_CALLABLE = 3
'''


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "models_here.py"
    path.write_text(FACTORIES)
    return path


@pytest.mark.parametrize("spec,code", [
    ("resnet", EXIT_BAD_SPEC), ("mlp:width=0", EXIT_BAD_SPEC), ("mlp:wdith=3", EXIT_BAD_SPEC),
    ("mlp:width", EXIT_BAD_SPEC), ("mlp:dtype=int8", EXIT_BAD_SPEC), ("transformer:dim=30,heads=4", EXIT_BAD_SPEC),
    ("", EXIT_BAD_SPEC), ("{dir}/nope.py:good", EXIT_LOAD_FAILED), ("{file}:missing", EXIT_LOAD_FAILED),
    ("{file}:NOT_CALLABLE", EXIT_LOAD_FAILED), ("{file}:wrong_type", EXIT_LOAD_FAILED),
    ("{file}:not_arrays", EXIT_LOAD_FAILED), ("{file}:raises", EXIT_LOAD_FAILED), ("{file}", EXIT_BAD_SPEC),
])
@pytest.mark.parametrize("command", [["inspect"], ["bench", "--quick", "--model"]])
def test_bad_specs_exit_codes(capsys, factory_file, spec, code, command):
    spec = spec.format(dir=factory_file.parent, file=factory_file)
    got, out, err = run(capsys, *command, spec)
    assert got == code
    assert err.startswith("error:") and out == ""


def test_spec_parsing_and_demo_models():
    s = parse_spec("gated-mlp:width=64,hidden=128")
    assert (s.name, s.options["width"], s.options["hidden"], s.options["depth"]) == ("gated-mlp", 64, 128, 1)
    assert parse_spec("dir/m.py:make").is_file and parse_spec("m.py:make").factory == "make"
    for name in DEMO_MODELS:
        model, (x,) = load_spec(f"{name}:batch=2,dtype=bfloat16")
        assert model(x).shape == x.shape and model(x).dtype == mx.bfloat16
    with pytest.raises(SpecError) as e:
        load_spec("nope")
    assert e.value.exit_code == EXIT_BAD_SPEC and "mlp" in str(e.value)


# -- inspect ---------------------------------------------------------------------------------------------
def test_inspect_factory_file_with_dot_and_json(capsys, tmp_path, factory_file):
    dot, js = tmp_path / "g.dot", tmp_path / "i.json"
    code, out, err = run(capsys, "inspect", f"{factory_file}:good", "--min-size", "0", "--dot", str(dot),
                         "--json", str(js))
    assert code == 0, err
    assert "linear+bias+relu" in out and "model" in out
    data = json.loads(js.read_text())
    (opp,) = data["opportunities"]
    assert (opp["pattern"], opp["source"]) == ("linear+bias+relu", "model") and opp["estimated_speedup"] > 1
    assert data["nodes_after"] < data["nodes_before"]
    text = dot.read_text()
    assert text.startswith("digraph") and text.count("{") == text.count("}")
    assert "subgraph cluster_before" in text and "subgraph cluster_after" in text
    before, after = text.split("subgraph cluster_after")
    assert "FusedLinear" not in before and "FusedLinear" in after
    declared = set(re.findall(r"^\s+(\w+) \[", text, re.M))
    for a, b in re.findall(r"^\s+(\w+) -> (\w+)", text, re.M):  # every edge joins declared nodes
        assert a in declared and b in declared


def test_inspect_demo_reports_measured_source(capsys, private_cache):
    from mlx_fusion.benchmark import BenchResult, device_id

    t = PerformanceTracker()
    t.record(BenchResult(op="linear+bias+relu", kind="linear", pass_="fwd", shape=(8, 32, 32), dtype="float32",
                         eager_us=3.0, compiled_us=3.0, fused_us=1.0, bytes_moved=1), device=device_id())
    assert t.save()
    code, out, _ = run(capsys, "inspect", TINY_MLP, "--min-size", "0")
    assert code == 0 and "measured" in out and "3.00x" in out


def test_graphs_to_dot_escapes_quotes():
    from mlx_fusion.graph.ir import Graph, Node, Value

    v = Value('we"ird', (2,), mx.float32)
    w = Value("w", (2,), mx.float32)
    g = Graph(inputs=[v], outputs=[w], nodes=[Node(0, "Abs", [v], [w])])
    text = graphs_to_dot({"only": g})
    assert 'label="we\\"ird"' in text and "cluster_only" in text


# -- bad values end in the documented exit codes with one line, never a traceback (issue 11) ----------------
def one_error_line(err, noise=False):
    """stderr is one `error: ...` line; with `noise`, after lines other libraries print on
    import (coremltools and transformers talk when loaded), but still no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    if noise:
        return "Traceback" not in err and [x for x in lines if x.startswith("error:")] == lines[-1:]
    return len(lines) == 1 and lines[0].startswith("error:")


@pytest.mark.parametrize("argv", [
    ["bench", "--model", TINY_MLP, "--quick", "--min-size", "-1"],
    ["inspect", TINY_MLP, "--min-size", "-1"],
    ["inspect", TINY_MLP, "--min-size", "many"],
    ["coreml", TINY_MLP, "--out", "{tmp}/pk", "--min-flops", "-1"],
    ["coreml", TINY_MLP, "--out", "{tmp}/pk", "--min-flops", "nan"],
    ["coreml", TINY_MLP, "--out", "{tmp}/pk", "--seed", "-1"],
])
def test_negative_counts_are_usage_errors(capsys, tmp_path, argv):
    code, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == EXIT_USAGE and out == "" and "Traceback" not in err
    assert re.search(r"error: argument --(min-size|min-flops|seed): ", err)  # argparse: its usage line, then this
    assert not (tmp_path / "pk").exists()


@pytest.fixture
def blocked(tmp_path):
    """Output paths that cannot be written: under a file, in a missing directory, a directory."""
    (tmp_path / "file").write_text("")
    (tmp_path / "adir").mkdir()
    return [tmp_path / "file" / "out.json", tmp_path / "missing" / "out.json", tmp_path / "adir"]


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("command", [
    ["bench", "--quick", "--ops", "add+relu", "--sizes", "4096", "--json"],
    ["bench", "--quick", "--model", TINY_MLP, "--json"],
    ["inspect", TINY_MLP, "--json"],
    ["inspect", TINY_MLP, "--dot"],
])
def test_unwritable_output_fails_before_the_work(capsys, blocked, private_cache, command, which):
    code, out, err = run(capsys, *command, str(blocked[which]))
    assert code == EXIT_USAGE
    assert out == ""  # nothing measured or traced: no device line, no table
    assert one_error_line(err) and "cannot write" in err and command[-1] in err
    assert list(private_cache.iterdir()) == []  # no cache update either


def test_sizes_are_measured_at_exactly_the_count_given(capsys, tmp_path):
    path = tmp_path / "out.json"
    code, _, err = run(capsys, "bench", "--quick", "--ops", "add+relu", "--sizes", "10000,8K", "--no-cache",
                       "--json", str(path))
    assert code == 0, err
    shapes = [r["shape"] for r in json.loads(path.read_text())["results"]]
    assert shapes == [[1, 10000], [2, 4096]]


def test_a_malformed_cache_entry_does_not_break_inspect(capsys, private_cache):
    from mlx_fusion.benchmark import device_id
    from mlx_fusion.tracker import CACHE_FORMAT, CACHE_SCHEMA, TrackerCacheWarning

    entries = {f"{device_id()}|linear+bias+relu|float32|{b}": {"speedup": None} for b in range(10)}
    PerformanceTracker().path.write_text(json.dumps({"format": CACHE_FORMAT, "schema": CACHE_SCHEMA,
                                                     "mlx_version": mx.__version__, "entries": entries}))
    with pytest.warns(TrackerCacheWarning, match="malformed"):
        code, out, err = run(capsys, "inspect", TINY_MLP, "--min-size", "0")
    assert code == 0, err
    assert "linear+bias+relu" in out and "model" in out  # priced by the bandwidth model instead


# -- coreml: untraceable models, --out ----------------------------------------------------------------------
UNTRACEABLE = '''
import mlx.core as mx

def make():
    return (lambda x: x * x.sum().item()), mx.ones((4, 4))
'''


def test_coreml_untraceable_spec_exits_6(capsys, tmp_path):
    pytest.importorskip("coremltools")
    path = tmp_path / "untraceable.py"
    path.write_text(UNTRACEABLE)
    code, out, err = run(capsys, "coreml", f"{path}:make", "--out", str(tmp_path / "pk"))
    assert code == 6 and out == ""
    assert one_error_line(err, noise=True) and "cannot trace" in err


def test_coreml_out_is_an_existing_file_exits_2(capsys, tmp_path):
    pytest.importorskip("coremltools")
    target = tmp_path / "already-here"
    target.write_text("keep me")
    code, out, err = run(capsys, "coreml", TINY_MLP, "--out", str(target))
    assert code == EXIT_USAGE and out == "" and one_error_line(err, noise=True) and "not a directory" in err
    assert target.read_text() == "keep me"


def test_coreml_bad_spec_exits_3(capsys, tmp_path):
    pytest.importorskip("coremltools")
    code, out, err = run(capsys, "coreml", "resnet", "--out", str(tmp_path / "pk"))
    assert code == EXIT_BAD_SPEC and one_error_line(err, noise=True) and not (tmp_path / "pk").exists()


# -- extension points: one add_parser per subcommand, SPEC prefixes ------------------------------------------
def test_a_subcommand_plugs_in_with_one_function(capsys, monkeypatch):
    from mlx_fusion import cli

    def add_parser(sub):
        p = sub.add_parser("hello", help="say hello")
        p.add_argument("--name", default="mlx")
        p.set_defaults(func=lambda args: print(f"hello {args.name}") or 7)

    monkeypatch.setattr(cli, "SUBCOMMANDS", cli.SUBCOMMANDS + [add_parser])
    code, out, _ = run(capsys, "hello", "--name", "you")
    assert (code, out) == (7, "hello you\n")
    assert "hello" in run(capsys, "--help")[1]


def toy_build(spec):
    """A SPEC builder for the prefix test: "toy:N" -> an N-wide Linear+ReLU and its input."""
    import mlx.nn as nn

    width = int(spec.split(":")[1])  # a ValueError is the builder's "bad SPEC"
    return nn.Sequential(nn.Linear(width, width), nn.ReLU()), mx.ones((2, width))


def test_spec_prefixes_call_their_builder(capsys, monkeypatch):
    from mlx_fusion.models import spec as spec_mod

    monkeypatch.setitem(spec_mod.SPEC_BUILDERS, "toy", "tests.test_cli:toy_build")
    monkeypatch.setitem(spec_mod.SPEC_BUILDERS, "gone", "mlx_fusion.no_such_module:build")
    model, (x,) = load_spec("toy:8")
    assert model(x).shape == (2, 8)
    with pytest.raises(SpecError) as e:
        load_spec("toy:eight")
    assert e.value.exit_code == EXIT_BAD_SPEC
    code, _, err = run(capsys, "inspect", "gone:x")
    assert code == EXIT_LOAD_FAILED and "no_such_module" in err
    code, out, err = run(capsys, "inspect", "toy:64", "--min-size", "0")
    assert code == 0 and "linear+bias+relu" in out, err
