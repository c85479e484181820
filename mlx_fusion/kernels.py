"""Kernel sources and kernel objects for the GPU backends.

Each fused op declares its kernels (`KernelSpec`s) in its definition
(mlx_fusion/ops/); `KERNEL_SPECS` collects them. Every fused kernel exists
twice, as a Metal body (`metal_src/<name>.metal`) and its CUDA twin
(`metal_src/<name>.cu`), plus one shared header per language
(`common.metal`, `common.cu`) with the activation and binary-op functions.
MLX writes each kernel's signature itself (`mx.fast.metal_kernel` /
`mx.fast.cuda_kernel`); the files hold only the header and the body.

Kernel objects are built once per (backend, name) and cached: building is
cheap, but MLX then compiles each template instantiation once and caches it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Tuple

import mlx.core as mx

from .device import current_device_kind

__all__ = [
    "KernelSpec",
    "KERNEL_SPECS",
    "kernel_source",
    "kernel_backend",
    "get_kernel",
    "use_backend",
    "backend_key",
    "make_launch",
    "LaunchCache",
    "clear_launches",
]


@dataclass(frozen=True)
class KernelSpec:
    """What MLX needs to build a kernel besides its source.

    elementwise: the kernel is a pure function of the elements of its inputs
    (one thread per element group); False for kernels that use threadgroup memory,
    barriers or warp/simdgroup collectives. Both kinds are executed on the CPU by
    the tests: elementwise ones per thread, the others a block at a time through the
    shims' cooperative threads (docs/testing.md).
    ensure_row_contiguous: False where the kernel reads strides itself.
    dtypes: the values of the template type T the ops instantiate.
    templates: the other template arguments the ops pass, each with every value
    it takes, so the source tests compile every instantiation.
    shared_header: False for a kernel that uses nothing of common.metal / common.cu: it is
    built with the header's #include lines only (MLX hashes the whole source on every
    launch, so an unused header costs time per call).
    header_parts: the optional blocks of the shared header (``// @only NAME`` ... ``// @end``)
    the kernel uses; the others are left out of its source, for the same reason.
    """

    name: str
    input_names: Tuple[str, ...]
    output_names: Tuple[str, ...]
    elementwise: bool = True
    ensure_row_contiguous: bool = False
    dtypes: Tuple[str, ...] = ("float32", "float16", "bfloat16")
    templates: Tuple[Tuple[str, Tuple], ...] = ()
    shared_header: bool = True
    header_parts: Tuple[str, ...] = ()

    def instantiations(self):
        """Every template argument list the ops can pass: [("T", dtype), (name, value), ...]."""
        names = [n for n, _ in self.templates]
        for dt in self.dtypes:
            for values in itertools.product(*(v for _, v in self.templates)):
                yield [("T", getattr(mx, dt))] + list(zip(names, values))


class _KernelSpecs(Mapping):
    """name -> KernelSpec of every fused op's kernels (`ops.registry.DEFINITIONS`), read on
    first use: the definitions import this module for `KernelSpec` and `get_kernel`."""

    def _specs(self) -> Dict[str, KernelSpec]:
        specs = self.__dict__.get("_loaded")
        if specs is None:
            from .ops.registry import DEFINITIONS

            specs = {}
            for d in DEFINITIONS:
                for spec in d.kernels:
                    if spec.name in specs:
                        raise ValueError(f"kernel {spec.name!r} declared twice ({d.name})")
                    specs[spec.name] = spec
            self.__dict__["_loaded"] = specs
        return specs

    def __getitem__(self, name: str) -> KernelSpec:
        return self._specs()[name]

    def __iter__(self):
        return iter(self._specs())

    def __len__(self) -> int:
        return len(self._specs())


KERNEL_SPECS: Mapping = _KernelSpecs()


def _source_dir() -> Path:
    # Installed: package data at mlx_fusion/metal_src. From a checkout: ../metal_src.
    here = Path(__file__).resolve().parent
    for cand in (here / "metal_src", here.parent / "metal_src"):
        if (cand / "common.metal").is_file():
            return cand
    raise FileNotFoundError("mlx-fusion kernel sources (metal_src/) not found next to the package")


@lru_cache(maxsize=None)
def _read(filename: str, parts: Optional[Tuple[str, ...]] = None) -> str:
    """A source file, compacted; `parts`: keep of its ``// @only NAME`` ... ``// @end`` blocks
    only those named (None: the file has none to select)."""
    text = (_source_dir() / filename).read_text()
    return compact(_select(text, parts) if parts is not None else text)


def _select(text: str, parts: Tuple[str, ...]) -> str:
    out, keep = [], True
    for line in text.splitlines(keepends=True):
        words = line.split()
        if words[:2] == ["//", "@only"] and len(words) == 3:
            keep = words[2] in parts
        elif words == ["//", "@end"]:
            keep = True
        elif keep:
            out.append(line)
    return "".join(out)


def compact(source: str) -> str:
    """`source` without its blank and comment-only lines; every other line is kept as written.

    MLX hashes a kernel's whole source (header included) on every launch, and the CUDA
    backend also copies it into every call's primitive: the comments would cost time per
    call. Lines inside a macro (after a line ending in a backslash) and comment lines that
    end in one are kept: the preprocessor splices them before it drops comments.
    """
    out, spliced = [], False
    for line in source.splitlines():
        text = line.strip()
        continues = line.endswith("\\")
        if spliced or continues or (text and not text.startswith("//")):
            out.append(line)
        spliced = continues
    return "\n".join(out) + "\n"


def _include_lines(header: str) -> str:
    return "".join(line + "\n" for line in header.splitlines() if line.startswith("#include"))


def kernel_source(name: str, backend: str) -> Tuple[str, str]:
    """(header, body) of kernel `name` for backend "metal" or "cuda", compacted (`compact`).
    A kernel whose spec says it uses no shared function gets only the header's #include lines."""
    ext = {"metal": "metal", "cuda": "cu"}[backend]
    if name not in KERNEL_SPECS:
        raise KeyError(f"unknown kernel {name!r}")
    spec = KERNEL_SPECS[name]
    header = _read(f"common.{ext}", tuple(sorted(spec.header_parts)))
    if not spec.shared_header:
        header = _include_lines(header)
    return header, _read(f"{name}.{ext}")


# --- backend selection ---------------------------------------------------------

_override = threading.local()


def _factories():
    return {"metal": mx.fast.metal_kernel, "cuda": mx.fast.cuda_kernel}


def kernel_backend() -> Optional[str]:
    """"metal" or "cuda" when the default device is a GPU with that backend, else None (CPU path)."""
    forced = getattr(_override, "backend", None)
    if forced is not None:
        return forced[0]
    kind = current_device_kind()
    return None if kind == "cpu" else kind


def backend_key():
    """What a cached launch is keyed by: None on the CPU path, else the backend ("metal",
    "cuda") or, inside `use_backend`, the forced (backend, factory) pair."""
    forced = getattr(_override, "backend", None)
    if forced is not None:
        return forced
    kind = current_device_kind()
    return None if kind == "cpu" else kind


_cache: Dict[tuple, Callable] = {}
_cache_lock = threading.Lock()


def get_kernel(name: str) -> Callable:
    """The cached kernel object for `name` on the active backend."""
    forced = getattr(_override, "backend", None)
    backend, factory = forced if forced is not None else (kernel_backend(), None)
    if backend is None:
        raise RuntimeError("no GPU kernel backend is active")
    factory = factory or _factories()[backend]
    key = (backend, id(factory), name)
    kernel = _cache.get(key)
    if kernel is None:
        spec = KERNEL_SPECS[name]
        header, body = kernel_source(name, backend)
        kernel = factory(
            name=f"mlx_fusion_{name}",
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            source=body,
            header=header,
            ensure_row_contiguous=spec.ensure_row_contiguous,
        )
        with _cache_lock:
            _cache[key] = kernel
    return kernel


# --- per-call launch arguments ---------------------------------------------------

def make_launch(kernel, output_shapes, output_dtypes, grid, threadgroup, template) -> Callable:
    """A kernel call with everything but its inputs bound: ``launch(inputs=[...]) -> outputs``.
    Built once per (kernel, dtype, shape) by the ops, so a fused call recomputes nothing."""
    return functools.partial(kernel, output_shapes=list(output_shapes), output_dtypes=list(output_dtypes),
                             grid=grid, threadgroup=threadgroup, template=list(template))


# Launches a cache keeps before it starts over: one per (backend, dtype, shape) a model runs;
# shapes that change every call (prefill lengths) would otherwise grow it without bound.
LAUNCH_CACHE_SIZE = 1024


class LaunchCache(dict):
    """The launches (`make_launch`) of one kernel, by ``(backend_key(), *args)``: a hit is one
    dict lookup; a miss makes ``make(get_kernel(name), *args)``."""

    __slots__ = ("name", "make")

    def __init__(self, name: str, make: Callable[..., Callable]):
        super().__init__()
        self.name, self.make = name, make
        _LAUNCH_CACHES.append(self)

    def __missing__(self, key):
        launch = self.make(get_kernel(self.name), *key[1:])
        with _cache_lock:
            if len(self) >= LAUNCH_CACHE_SIZE:
                self.clear()
            self[key] = launch
        return launch


_LAUNCH_CACHES: list = []


def clear_launches() -> None:
    """Forget every cached launch: the next call of each kernel asks `get_kernel` again (for
    code that wraps `get_kernel` to see which kernels run, e.g. the tests)."""
    with _cache_lock:
        for cache in _LAUNCH_CACHES:
            cache.clear()


def backend_forced() -> bool:
    """True inside `use_backend` (the tests' shims), False on the device MLX runs on."""
    return getattr(_override, "backend", None) is not None


@contextlib.contextmanager
def use_backend(backend: str, factory: Optional[Callable] = None):
    """Force a kernel backend in this thread (tests): e.g. run the Metal sources
    on the CPU through a shim with `use_backend("metal", ShimMetalKernel)`."""
    if backend not in ("metal", "cuda"):
        raise ValueError("backend must be 'metal' or 'cuda'")
    prev = getattr(_override, "backend", None)
    _override.backend = (backend, factory)
    try:
        yield
    finally:
        _override.backend = prev
