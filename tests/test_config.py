import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlx_fusion import config as cfg
from mlx_fusion.config import (DEFAULT_MIN_TENSOR_SIZE, FusionConfig, configure, current_device_kind,
                               fusion_config, get_config, reset_config)
from mlx_fusion.patterns import (Activation, BinaryActivation, BinaryOp, LinearLayer,
                                 ScalarActivation, ScalarOp)

ADD_RELU = BinaryActivation(BinaryOp.ADD, Activation.RELU)
LIN = LinearLayer(True, Activation.GELU)


@pytest.fixture(autouse=True)
def _fresh_global():
    reset_config()
    yield
    reset_config()


def test_defaults():
    c = FusionConfig()
    assert (c.enabled, c.metal, c.cuda, c.cpu, c.neural_engine, c.enabled_patterns) == (
        True, True, True, True, False, None)
    assert c.min_tensor_size == DEFAULT_MIN_TENSOR_SIZE
    assert get_config() == c


def test_validation():
    with pytest.raises(ValueError):
        FusionConfig(min_tensor_size=-1)
    with pytest.raises(ValueError):
        FusionConfig(min_tensor_size=1.5)
    with pytest.raises(TypeError):
        FusionConfig(metal="yes")
    with pytest.raises(TypeError):
        FusionConfig(enabled_patterns={3.5})


def test_allows_by_class_instance_and_name():
    assert FusionConfig().allows(ADD_RELU)
    assert FusionConfig(enabled_patterns={BinaryActivation}).allows(ADD_RELU)
    assert not FusionConfig(enabled_patterns={BinaryActivation}).allows(LIN)
    assert FusionConfig(enabled_patterns={ADD_RELU}).allows(ADD_RELU)
    assert not FusionConfig(enabled_patterns={ADD_RELU}).allows(BinaryActivation(BinaryOp.MUL, Activation.RELU))
    assert FusionConfig(enabled_patterns={"add+relu", "linear+bias+gelu"}).allows(LIN)
    assert FusionConfig(enabled_patterns={"ScalarActivation"}).allows(ScalarActivation(ScalarOp.MUL, Activation.SILU))
    assert not FusionConfig(enabled_patterns=frozenset()).allows(ADD_RELU)
    # a single entry instead of a set is accepted
    assert FusionConfig(enabled_patterns="add+relu").enabled_patterns == frozenset({"add+relu"})
    assert FusionConfig(enabled_patterns=LinearLayer).allows(LIN)


def test_device_allowed():
    c = FusionConfig(metal=False, neural_engine=True)
    assert not c.device_allowed("metal") and c.device_allowed("cuda") and c.device_allowed("cpu")
    assert c.device_allowed("neural_engine") and c.device_allowed("ANE")
    with pytest.raises(ValueError):
        c.device_allowed("tpu")
    assert current_device_kind() in ("metal", "cuda", "cpu")


def test_configure_validates_names():
    with pytest.raises(TypeError, match="min_size"):
        configure(min_size=3)
    with pytest.raises(TypeError):
        fusion_config(nope=True).__enter__()
    assert get_config() == FusionConfig()


def test_configure_changes_global():
    new = configure(min_tensor_size=7, metal=False)
    assert get_config() is new and new.min_tensor_size == 7 and not new.metal
    configure(cpu=False)
    assert get_config().min_tensor_size == 7 and not get_config().cpu  # earlier changes kept


def test_context_manager_restores_and_nests():
    with fusion_config(enabled=False) as c:
        assert get_config() is c and not c.enabled
        with fusion_config(min_tensor_size=0):
            assert get_config().min_tensor_size == 0 and not get_config().enabled
        assert get_config() is c
    assert get_config().enabled
    with pytest.raises(RuntimeError):
        with fusion_config(enabled=False):
            raise RuntimeError
    assert get_config().enabled


def test_context_override_is_thread_local():
    inside, release, seen = threading.Event(), threading.Event(), {}

    def worker():
        with fusion_config(enabled=False, min_tensor_size=1):
            inside.set()
            release.wait(5)
            seen["worker"] = get_config()

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(5)
    seen["main"] = get_config()  # while the worker is inside its block
    configure(metal=False)  # the global changes; the worker's override does not
    release.set()
    t.join(5)
    assert seen["main"].enabled and seen["main"].min_tensor_size == DEFAULT_MIN_TENSOR_SIZE
    assert not seen["worker"].enabled and seen["worker"].metal


def test_configure_from_many_threads_loses_nothing():
    fields = ["metal", "cuda", "cpu", "enabled"]
    barrier = threading.Barrier(len(fields))

    def flip(name):
        barrier.wait(5)
        for _ in range(200):
            configure(**{name: False})
            configure(**{name: True})
        configure(**{name: False})

    threads = [threading.Thread(target=flip, args=(f,)) for f in fields]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    c = get_config()
    assert not any(getattr(c, f) for f in fields)


def test_config_is_immutable():
    with pytest.raises(Exception):
        get_config().enabled = False
    assert isinstance(cfg._SETTINGS.default, FusionConfig)


@given(size=st.integers(0, 10**9), enabled=st.booleans(), pats=st.sets(st.sampled_from(
    ["add+relu", "mul+gelu", "linear+bias+relu", BinaryActivation, LinearLayer])))
def test_replace_roundtrip(size, enabled, pats):
    c = FusionConfig().replace(min_tensor_size=size, enabled=enabled, enabled_patterns=pats)
    assert (c.min_tensor_size, c.enabled, c.enabled_patterns) == (size, enabled, frozenset(pats))
    assert c.allows(ADD_RELU) == ("add+relu" in pats or BinaryActivation in pats)


# -- the one override mechanism (mlx_fusion.settings), shared with the Core ML options -------------------
def test_config_and_offload_options_share_the_override_mechanism():
    from mlx_fusion.coreml import options as ml
    from mlx_fusion.settings import Settings

    assert isinstance(cfg._SETTINGS, Settings) and isinstance(ml._SETTINGS, Settings)
    before = ml.get_options()
    with ml.offload_options(min_flops=0) as o, fusion_config(min_tensor_size=1) as c:
        assert ml.get_options() is o and get_config() is c and o.min_flops == 0
        with ml.offload_options(force=True):  # nests on the innermost
            assert ml.get_options().force and ml.get_options().min_flops == 0
    assert ml.get_options() == before and get_config().min_tensor_size == DEFAULT_MIN_TENSOR_SIZE
    with pytest.raises(TypeError, match="min_flop"):
        with ml.offload_options(min_flop=0):
            pass
    with pytest.raises(ValueError):  # __post_init__ validates overrides
        with ml.offload_options(compute_units="GPU"):
            pass


def test_settings_set_reset_and_threads():
    import dataclasses

    from mlx_fusion.settings import Settings

    @dataclasses.dataclass(frozen=True)
    class Knobs:
        a: int = 1

    s = Settings(Knobs)
    assert s.set(a=2).a == 2 and s.get().a == 2
    seen = {}
    with s.override(a=3):
        t = threading.Thread(target=lambda: seen.setdefault("other", s.get().a))
        t.start()
        t.join(5)
        assert s.get().a == 3
    assert seen["other"] == 2  # an override is this thread's only
    assert s.reset() == Knobs() and s.get().a == 1


def test_one_device_detection():
    from mlx_fusion import benchmark, device

    assert cfg.current_device_kind is device.current_device_kind  # graph/ imports it from config
    assert benchmark.device_id is device.device_id and benchmark.device_kind is device.current_device_kind
    kind = device.current_device_kind()
    assert kind in ("metal", "cuda", "cpu") and device.device_id().split(":")[0] == kind
    assert device.device_id("metal" if kind != "metal" else "cuda") in ("metal", "cuda")  # another kind: no name
    assert device.on_gpu() == (kind != "cpu") or device.gpu_backend() is None
    assert device.device_description().startswith("gpu (" if device.on_gpu() else "cpu (")
