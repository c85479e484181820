"""The performance tracker: cache file round trips, robustness, concurrency, and the
optimizer deciding from measurements. No timing assertions: speed lives in benchmarks."""

import json
import os
import signal
import stat
import warnings
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_fusion.benchmark import BenchResult, device_id
from mlx_fusion.config import FusionConfig
from mlx_fusion.graph.optimizer import FusionOptimizer
from mlx_fusion.patterns import Activation, BinaryActivation, BinaryOp, LinearLayer, ScalarActivation, ScalarOp
from mlx_fusion.tracker import (CACHE_FORMAT, CACHE_SCHEMA, PerformanceTracker, TrackerCacheWarning,
                                default_cache_path, default_tracker, price, reset_default_tracker, size_bucket)
from tests._graphs import trace_graph

ROOT = Path(__file__).resolve().parent.parent
CPU = device_id("cpu")


def fake_result(op="add+relu", shape=(16, 4096), dtype="float32", eager=10.0, compiled=8.0, fused=4.0,
                pass_="fwd"):
    return BenchResult(op=op, kind="binary", pass_=pass_, shape=shape, dtype=dtype, eager_us=eager,
                       compiled_us=compiled, fused_us=fused, bytes_moved=3 * 4 * 16 * 4096)


ADD_RELU = BinaryActivation(BinaryOp.ADD, Activation.RELU)


# -- the cache file ------------------------------------------------------------------------------
def test_round_trip(private_cache):
    t = PerformanceTracker()
    assert t.path.parent == private_cache and t.path.name == f"performance-mlx-{mx.__version__}.json"
    t.record(fake_result(), device=CPU)
    t.record(fake_result(pass_="fwd+bwd"), device=CPU)  # not a forward measurement: not kept
    assert t.save()
    data = json.loads(t.path.read_text())
    assert (data["format"], data["schema"], data["mlx_version"]) == (CACHE_FORMAT, CACHE_SCHEMA, mx.__version__)
    assert len(data["entries"]) == 1

    again = PerformanceTracker()
    # Fused vs the *better* unfused variant (mx.compile, 8 us), not eager (10 us).
    assert again.lookup(ADD_RELU, mx.float32, 16 * 4096, "cpu") == pytest.approx(2.0)
    (entry,) = again.entries.values()
    assert entry["speedup_vs_eager"] == pytest.approx(2.5) and entry["speedup_vs_compiled"] == pytest.approx(2.0)
    assert again.lookup(ADD_RELU, mx.bfloat16, 16 * 4096, "cpu") is None  # other dtype
    assert again.lookup(BinaryActivation(BinaryOp.ADD, Activation.GELU), mx.float32, 16 * 4096, "cpu") is None
    assert again.lookup(ADD_RELU, mx.float32, 16 * 4096, "metal") is None
    # A neighbouring size bucket (x4) borrows the measurement; two buckets away does not.
    assert again.lookup(ADD_RELU, mx.float32, 16 * 4096 * 4, "cpu") == pytest.approx(2.0)
    assert again.lookup(ADD_RELU, mx.float32, 16 * 4096 * 16, "cpu") is None


def test_size_buckets_are_powers_of_four():
    assert [size_bucket(n) for n in (0, 1, 4, 16, 4096, 5000, 1 << 20)] == [0, 0, 1, 2, 6, 6, 10]
    assert size_bucket(3 * 4096) == size_bucket(4096 * 4)


def test_corrupt_file_warns_and_is_empty(private_cache):
    t = PerformanceTracker()
    t.path.write_text("{ not json")
    with pytest.warns(TrackerCacheWarning, match="corrupt"):
        assert t.lookup(ADD_RELU, mx.float32, 4096, "cpu") is None
    t.record(fake_result(), device=CPU)  # the next save replaces the broken file
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # this tracker already said so: once is enough
        assert t.save()
    assert PerformanceTracker().lookup(ADD_RELU, mx.float32, 16 * 4096, "cpu") == pytest.approx(2.0)


@pytest.mark.parametrize("content", ['[1, 2]', '{"format": "something-else", "entries": {}}',
                                     '{"format": "%s", "schema": 1, "mlx_version": "x", "entries": [1]}'
                                     % CACHE_FORMAT])
def test_wrong_shapes_of_json_warn(private_cache, content):
    t = PerformanceTracker()
    t.path.write_text(content)
    with pytest.warns(TrackerCacheWarning):
        assert len(t) == 0


def test_foreign_mlx_version_is_ignored(private_cache):
    t = PerformanceTracker()
    key = f"{CPU}|add+relu|float32|{size_bucket(16 * 4096)}"
    t.path.write_text(json.dumps({"format": CACHE_FORMAT, "schema": CACHE_SCHEMA, "mlx_version": "0.1.0",
                                  "entries": {key: {"speedup": 0.1}}}))
    with pytest.warns(TrackerCacheWarning, match="0.1.0"):
        assert t.lookup(ADD_RELU, mx.float32, 16 * 4096, "cpu") is None


def test_unwritable_cache_warns_instead_of_failing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    t = PerformanceTracker(blocker / "sub" / "perf.json")  # parent is a file: mkdir fails
    t.record(fake_result(), device=CPU)
    with pytest.warns(TrackerCacheWarning, match="cannot write"):
        assert t.save() is False
    assert t.lookup(ADD_RELU, mx.float32, 16 * 4096, "cpu") == pytest.approx(2.0)  # still in memory


_WRITER = """
import sys
from mlx_fusion.benchmark import BenchResult
from mlx_fusion.tracker import PerformanceTracker
tag, n = sys.argv[1], int(sys.argv[2])
for i in range(n):  # one save per entry: many chances to interleave with the other writer
    t = PerformanceTracker(autosave=False)
    t.record(BenchResult(op="add+relu", kind="binary", pass_="fwd", shape=(1, 4 ** (i + 1)), dtype="float32",
                         eager_us=1.0, compiled_us=1.0, fused_us=0.5, bytes_moved=1), device="dev-" + tag)
    assert t.save()
"""


def test_concurrent_writers_keep_every_entry(private_cache):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    n = 30
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, tag, str(n)], env=env, cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for tag in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    entries = PerformanceTracker().entries
    assert len(entries) == 2 * n
    assert {k.split("|")[0] for k in entries} == {"dev-a", "dev-b"}
    assert not [f for f in private_cache.iterdir() if f.suffix == ".tmp"]  # no temp file left behind


# -- where the cache lives ---------------------------------------------------------------------------
def test_cache_path_env_and_xdg(tmp_path, monkeypatch):
    target = tmp_path / "elsewhere" / "perf.json"
    monkeypatch.setenv("MLX_FUSION_CACHE", str(target))
    assert default_cache_path() == target and default_tracker().path == target
    monkeypatch.delenv("MLX_FUSION_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected_base = (tmp_path / "home" / "Library" / "Caches") if sys.platform == "darwin" else tmp_path / "xdg"
    assert default_cache_path().parent == expected_base / "mlx-fusion"
    assert default_tracker().path.parent == expected_base / "mlx-fusion"  # follows the environment


def test_default_tracker_is_shared_and_lazy(private_cache):
    t = default_tracker()
    assert default_tracker() is t and t._entries is None  # nothing read before the first lookup
    assert t.lookup(ADD_RELU, mx.float32, 4096, "cpu") is None


# -- adaptive decisions --------------------------------------------------------------------------
def two_fusions():
    x = mx.ones((4, 256))
    return trace_graph(lambda a, b: (nn.relu(a + b), nn.gelu(a * b)), x, x)


def detect(use_cache=True):
    """The optimizer pricing with the tracker (what fuse() does), or with its cost model only."""
    opt = FusionOptimizer(FusionConfig(min_tensor_size=0), price=price if use_cache else None, device="cpu")
    return {o.name: o for o in opt.detect_opportunities(two_fusions())}


def test_without_measurements_the_model_decides():
    found = detect()
    assert set(found) == {"add+relu", "mul+gelu"}
    assert {o.source for o in found.values()} == {"model"}


def test_measured_slower_is_skipped_and_others_kept():
    t = default_tracker()  # what tracker.price (fuse()'s price function) consults
    t.record(fake_result(shape=(4, 256), eager=10.0, compiled=5.0, fused=6.0), device=CPU)  # fused loses to compile
    assert t.save()
    reset_default_tracker()  # as a new process would: read back from the file
    found = detect()
    assert set(found) == {"mul+gelu"} and found["mul+gelu"].source == "model"
    assert set(detect(use_cache=False)) == {"add+relu", "mul+gelu"}  # the model only


def test_measured_faster_sets_speedup_and_source():
    default_tracker().record(fake_result(op="mul+gelu", shape=(4, 256), eager=9.0, compiled=9.0, fused=3.0),
                             device=CPU)
    found = detect()
    assert (found["mul+gelu"].source, found["mul+gelu"].estimated_speedup) == ("measured", pytest.approx(3.0))
    assert found["add+relu"].source == "model"


def test_scalar_mul_and_add_fall_back_to_the_affine_measurement():
    t = default_tracker()
    res = fake_result(op="affine+silu", shape=(1, 4096), eager=2.0, compiled=2.0, fused=4.0)
    t.record(res, device=CPU)
    for op in (ScalarOp.MUL, ScalarOp.ADD, ScalarOp.AFFINE):
        assert t.lookup(ScalarActivation(op, Activation.SILU), mx.float32, 4096, "cpu") == pytest.approx(0.5)


# -- measuring ------------------------------------------------------------------------------------
TINY = dict(calls_per_eval=1, repeats=3, warmup=1)


@pytest.mark.parametrize("pattern,size", [
    ("add+relu", 4096),
    (ScalarActivation(ScalarOp.MUL, Activation.GELU), 4096),
    (LinearLayer(True, Activation.RELU), (4, 32, 64)),
])
def test_benchmark_pattern_measures_records_and_saves(private_cache, pattern, size):
    t = PerformanceTracker()
    res = t.benchmark_pattern(pattern, size, mx.float32, **TINY)
    assert min(res.eager_us, res.compiled_us, res.fused_us) > 0
    assert res.speedup == pytest.approx(min(res.eager_us, res.compiled_us) / res.fused_us)
    out_size = 4 * 64 if isinstance(size, tuple) else size
    pat = ADD_RELU if pattern == "add+relu" else pattern
    assert PerformanceTracker().lookup(pat, mx.float32, out_size, "cpu") == pytest.approx(res.speedup)


def test_benchmark_pattern_rejects_unknown_patterns():
    with pytest.raises(ValueError, match="no benchmark"):
        PerformanceTracker().benchmark_pattern("pow+relu", 4096)


def test_shipped_priors_decide_when_nothing_is_measured(monkeypatch):
    """The H100 measurements shipped in mlx_fusion/data/priors-cuda.json: bf16 add+relu at
    16M elements was slower than mx.compile forward there, so it is not fused by default;
    likewise the CPU ones (priors-cpu.json) for mul+gelu, whose recomputing backward loses
    on a compute-bound CPU."""
    from mlx_fusion.patterns import Activation, BinaryActivation, BinaryOp
    from mlx_fusion.tracker import prior_speedup

    monkeypatch.delenv("MLX_FUSION_NO_PRIORS")

    slow = prior_speedup(BinaryActivation(BinaryOp.ADD, Activation.RELU), "bfloat16", 2**24, "cuda")
    assert slow is not None and slow < 1.0
    # an unmeasured pattern falls back to the median of its kind at that size
    other = prior_speedup(BinaryActivation(BinaryOp.ADD, Activation.SILU), "bfloat16", 2**24, "cuda")
    assert other is not None
    assert prior_speedup(BinaryActivation(BinaryOp.MUL, Activation.GELU), "float32", 2**20, "cpu") < 1.0
    assert prior_speedup(BinaryActivation(BinaryOp.ADD, Activation.RELU), "float32", 2**24, "metal") is None
    monkeypatch.setenv("MLX_FUSION_NO_PRIORS", "1")
    assert prior_speedup(BinaryActivation(BinaryOp.ADD, Activation.RELU), "bfloat16", 2**24, "cuda") is None


def test_a_size_between_shipped_sizes_takes_the_line_between_them(monkeypatch):
    """The CUDA op table measured linear+silu at buckets 8 and 12 only, slower at both: a
    prefill's 128 x 5632 outputs (bucket 10) once fell to the cost model, which fused it, and
    decode then paid for it (sixth session). Now it reads the line between 8 and 12."""
    from mlx_fusion.patterns import Activation, LinearLayer
    from mlx_fusion.priors import _priors
    from mlx_fusion.tracker import prior_speedup

    monkeypatch.delenv("MLX_FUSION_NO_PRIORS", raising=False)
    pattern = LinearLayer(has_bias=False, activation=Activation.SILU)
    shipped = _priors("cuda")
    lo, hi = (shipped[f"cuda|{pattern.name}|bfloat16|{b}"]["speedup"] for b in (8, 12))
    assert prior_speedup(pattern, "bfloat16", 128 * 5632, "cuda") == pytest.approx((lo + hi) / 2)
    assert prior_speedup(pattern, "bfloat16", 4 ** 16, "cuda") == shipped[f"cuda|{pattern.name}|bfloat16|13"]["speedup"]


# -- robustness (issue 11): a bad entry, a killed writer, the umask ----------------------------------------
GOOD_KEY = f"{CPU}|add+relu|float32|{size_bucket(16 * 4096)}"


@pytest.mark.parametrize("bad", [{"speedup": None}, {"speedup": "fast"}, {"fused_us": 1.0}, {"speedup": -2.0},
                                 {"speedup": 0.0}, {"speedup": float("nan")}, {"speedup": float("inf")},
                                 {"speedup": True}, "not a dict", None])
def test_one_malformed_entry_is_skipped_with_one_warning(private_cache, bad):
    t = PerformanceTracker()
    bad_key = f"{CPU}|mul+gelu|float32|{size_bucket(16 * 4096)}"
    neighbour = f"{CPU}|mul+gelu|float32|{size_bucket(16 * 4096) + 1}"  # would be averaged with bad_key
    t.path.write_text(json.dumps({"format": CACHE_FORMAT, "schema": CACHE_SCHEMA, "mlx_version": mx.__version__,
                                  "entries": {GOOD_KEY: {"speedup": 2.0}, bad_key: bad,
                                              neighbour: {"speedup": 3.0}, "no|bucket": {"speedup": 1.0}}}))
    with pytest.warns(TrackerCacheWarning, match="malformed") as caught:
        assert t.lookup(ADD_RELU, mx.float32, 16 * 4096, "cpu") == pytest.approx(2.0)
        mul_gelu = BinaryActivation(BinaryOp.MUL, Activation.GELU)
        assert t.lookup(mul_gelu, mx.float32, 16 * 4096, "cpu") == pytest.approx(3.0)
        assert t.price(mul_gelu, mx.float32, 16 * 4096, "cpu") == (pytest.approx(3.0), "measured")
    assert len([w for w in caught if issubclass(w.category, TrackerCacheWarning)]) == 1
    assert "2 malformed entries" in str(caught[0].message)
    t.record(fake_result(op="add+gelu"), device=CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already reported by this tracker
        assert t.save()
    kept = json.loads(t.path.read_text())["entries"]
    assert bad_key not in kept and GOOD_KEY in kept and len(kept) == 3  # the save drops the bad ones


def test_a_malformed_entry_does_not_stop_fusion(private_cache):
    """What issue 11 saw: `"speedup": null` made lookup raise and fuse() fall back for the whole model."""
    import mlx_fusion

    default_tracker().path.write_text(json.dumps({
        "format": CACHE_FORMAT, "schema": CACHE_SCHEMA, "mlx_version": mx.__version__,
        "entries": {f"{CPU}|linear+bias+relu|float32|{b}": {"speedup": None} for b in range(12)}}))
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
    x = mx.ones((8, 16))
    with pytest.warns(TrackerCacheWarning, match="malformed"), mlx_fusion.fusion_config(min_tensor_size=0):
        fused = mlx_fusion.fuse(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error", mlx_fusion.FusionFallbackWarning)
            assert mx.allclose(fused(x), model(x)).item()


_KILLED_WRITER = """
import os, signal, sys
from mlx_fusion.benchmark import BenchResult
from mlx_fusion.tracker import PerformanceTracker
t = PerformanceTracker(sys.argv[1])
t.record(BenchResult(op="add+relu", kind="binary", pass_="fwd", shape=(1, 4096), dtype="float32",
                     eager_us=1.0, compiled_us=1.0, fused_us=0.5, bytes_moved=1), device="dev")
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # die with the temp file half written
t.save()
"""


def test_a_writer_killed_mid_save_leaves_no_pile_of_temp_files(private_cache):
    path = private_cache / "perf.json"
    (private_cache / (path.name + "a1b2c3.tmp")).write_text("{")  # an older version's orphan
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for _ in range(2):
        p = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path)], env=env, cwd=ROOT, timeout=60)
        assert p.returncode == -signal.SIGKILL
        assert len(list(private_cache.glob("*.tmp"))) == 1  # the same name each time, not one more per kill
    assert not path.exists()
    t = PerformanceTracker(path)
    t.record(fake_result(), device=CPU)
    assert t.save()
    assert list(private_cache.glob("*.tmp")) == []  # the next save cleans up
    assert PerformanceTracker(path).lookup(ADD_RELU, mx.float32, 16 * 4096, "cpu") == pytest.approx(2.0)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_cache_file_mode_follows_the_umask(private_cache, umask):
    old = os.umask(umask)
    try:
        t = PerformanceTracker()
        t.record(fake_result(), device=CPU)
        assert t.save()
        t.record(fake_result(op="add+gelu"), device=CPU)
        assert t.save()  # replacing an existing file too
    finally:
        os.umask(old)
    assert stat.S_IMODE(t.path.stat().st_mode) == 0o666 & ~umask


# -- the price function the optimizer takes ------------------------------------------------------------
def test_price_is_measured_else_shipped_else_none(monkeypatch):
    gelu = BinaryActivation(BinaryOp.MUL, Activation.GELU)
    assert price(gelu, mx.float32, 2**20, "cpu") is None  # priors off (conftest), nothing measured
    monkeypatch.delenv("MLX_FUSION_NO_PRIORS")
    speedup, source = price(gelu, mx.float32, 2**20, "cpu")
    assert source == "shipped" and speedup < 1.0  # priors-cpu.json: mul+gelu loses on this CPU
    default_tracker().record(fake_result(op="mul+gelu", shape=(256, 4096)), device=CPU)
    speedup, source = price(gelu, mx.float32, 2**20, "cpu")
    assert (speedup, source) == (pytest.approx(2.0), "measured")
    assert speedup == default_tracker().lookup(gelu, mx.float32, 2**20, "cpu")


def _top_level_imports(path: Path) -> set:
    import ast

    found = set()
    for node in ast.parse(path.read_text()).body:  # module level only: lazy imports inside functions are fine
        if isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_the_measurement_layer_imports_nothing_above_it_at_import_time():
    """vocabulary -> ops -> graph -> fuse -> measure -> cli: the cache, priors, settings and device
    modules sit below graph/; the tracker needs neither graph/ nor the benchmark code to load."""
    above = {".graph", ".fuse", ".benchmark", ".tracker", ".models", ".cli", ".coreml"}
    allowed = {  # module -> the package modules it may import at module level
        "device.py": set(), "settings.py": set(), "timing.py": {".device"}, "perfcache.py": set(),
        "config.py": {".device", ".settings"}, "priors.py": {".device", ".perfcache"},
        "tracker.py": {".device", ".patterns", ".perfcache", ".priors"},
    }
    for name, ok in allowed.items():
        local = {i for i in _top_level_imports(ROOT / "mlx_fusion" / name) if i.startswith(".")}
        assert local <= ok, f"mlx_fusion/{name} imports {sorted(local - ok)} at module level"
        assert not local & above


def test_graph_imports_neither_tracker_nor_benchmark():
    for path in (ROOT / "mlx_fusion" / "graph").glob("*.py"):
        text = path.read_text()
        for mod in ("tracker", "benchmark"):
            assert f"from ..{mod} import" not in text and f"mlx_fusion.{mod}" not in text, f"{path} imports {mod}"


# -- noise (issue 13): a decision needs the win to beat the spread of the repeats ---------------------
def noisy_result(speedups, op="mul+gelu", median=None):
    fused = 4.0
    r = fake_result(op=op, shape=(4, 256), eager=fused * (median or sorted(speedups)[len(speedups) // 2]),
                    compiled=100.0, fused=fused)
    r.speedups = list(speedups)
    return r


def test_a_win_within_the_noise_is_not_taken():
    res = noisy_result([0.8, 0.95, 1.3, 1.4, 1.5])  # median 1.3, lower quartile 0.95
    assert res.verdict == "noise" and res.speedup == pytest.approx(1.3)
    default_tracker().record(res, device=CPU)
    p = price(BinaryActivation(BinaryOp.MUL, Activation.GELU), mx.float32, 4 * 256, "cpu")
    assert p.source == "measured" and p.noisy and p.speedup < 1.0 and p.median == pytest.approx(1.3)
    assert "mul+gelu" not in detect()  # the optimizer rejects the noisy win
    assert default_tracker().lookup(BinaryActivation(BinaryOp.MUL, Activation.GELU), mx.float32, 4 * 256,
                                    "cpu") == pytest.approx(1.3)  # lookup still reports the median


def test_a_win_beyond_the_noise_is_taken_at_its_median():
    res = noisy_result([1.2, 1.25, 1.3, 1.35, 1.4])
    assert res.verdict == "faster"
    default_tracker().record(res, device=CPU)
    assert saved_entry()["speedups"] == [1.2, 1.25, 1.3, 1.35, 1.4]
    found = detect()
    assert found["mul+gelu"].source == "measured"
    assert found["mul+gelu"].estimated_speedup == pytest.approx(1.3)


def saved_entry():
    """The mul+gelu entry as a new process reads it back from the file."""
    t = default_tracker()
    assert t.save()
    reset_default_tracker()
    (entry,) = [v for k, v in default_tracker().entries.items() if "|mul+gelu|" in k]
    return entry


def test_entries_without_spread_and_malformed_spreads_read_as_noiseless(private_cache):
    from mlx_fusion.perfcache import entry_low

    assert entry_low({"speedup": 1.2}) == 1.2  # older caches, the shipped priors
    assert entry_low({"speedup": 1.2, "speedup_low": "x"}) == 1.2
    assert entry_low({"speedup": 1.2, "speedup_low": 0.9}) == 0.9
    assert entry_low({"speedup": None}) is None
