"""Which device MLX runs on, named the way fusion decisions and measurements key on it.

    current_device_kind()   # "metal", "cuda" or "cpu": what the optimizer and kernels pick by
    device_id()             # "cuda:NVIDIA H100 80GB HBM3": what measurements are stored under
    device_description()    # "gpu (cuda: NVIDIA H100 80GB HBM3)": for reports

The one place that asks MLX which backend it has; everything else imports these.
"""

from __future__ import annotations

import functools
import platform
from typing import Optional

import mlx.core as mx

__all__ = ["on_gpu", "gpu_backend", "current_device_kind", "device_kind", "device_name", "device_id", "device_description"]


def on_gpu() -> bool:
    """True if MLX's default device is a GPU."""
    return mx.default_device().type == mx.DeviceType.gpu


@functools.lru_cache(maxsize=None)  # a property of the MLX build: asked on every fused call
def gpu_backend() -> Optional[str]:
    """"metal" or "cuda": the GPU backend this MLX build has, else None."""
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)  # older MLX builds have no mx.cuda
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


_GPU = mx.DeviceType.gpu


def current_device_kind() -> str:
    """"metal", "cuda" or "cpu": where MLX's default device runs now."""
    return (gpu_backend() or "cpu") if mx.default_device().type == _GPU else "cpu"


device_kind = current_device_kind  # the name the benchmark reports use


def device_name() -> str:
    """The default device's name ("NVIDIA H100 80GB HBM3", "Apple M2", the CPU's), or ""."""
    return _device_name_of(str(mx.default_device()))


@functools.lru_cache(maxsize=None)  # the tracker asks once per fusion candidate
def _device_name_of(_device: str) -> str:
    dev = mx.default_device()
    try:
        info = mx.device_info(dev)
    except Exception:  # older MLX takes no argument (and reports the GPU); not every backend has it
        try:
            info = mx.device_info() if dev.type == mx.DeviceType.gpu else {}
        except Exception:
            info = {}
    name = info.get("device_name") or info.get("architecture") or ""
    return str(name) or (platform.processor() or platform.machine() if dev.type == mx.DeviceType.cpu else "")


def device_id(kind: Optional[str] = None) -> str:
    """The key measurements are stored under: "<kind>:<device name>", e.g. "cuda:NVIDIA H100".
    For a `kind` other than the current device's, just the kind (its name is unknown here)."""
    current = current_device_kind()
    if kind is not None and kind != current:
        return kind
    name = device_name()
    return f"{current}:{name}" if name else current


def device_description() -> str:
    """e.g. "gpu (cuda: NVIDIA H100 80GB HBM3)", "gpu (metal: Apple M2)", "cpu (x86_64: Intel Xeon)"."""
    name = device_name()
    if on_gpu():
        return f"gpu ({current_device_kind()}{': ' + name if name else ''})"
    return f"cpu ({platform.machine()}{': ' + name if name and name != platform.machine() else ''})"
