"""Run the Metal kernel sources on the CPU (docs/metal-verification.md).

render.py: the source MLX generates for a call; compile.py: g++ builds with a CPU entry per
kernel (cached); execute.py: `ShimMetalKernel`, the stand-in for `mx.fast.metal_kernel`.
"""

import pytest

from .compile import CXX, ShimCompileError, compile_sources, have_compiler, is_cooperative
from .execute import ShimLaunchError, ShimMetalKernel
from .render import InputMeta, render, render_metal_kernel

__all__ = [
    "CXX", "InputMeta", "ShimCompileError", "ShimLaunchError", "ShimMetalKernel", "compile_sources",
    "have_compiler", "is_cooperative", "render", "render_metal_kernel", "SweepShimMetalKernel",
    "RecordingShimMetalKernel", "recording_factory", "metal_shim",
]


class SweepShimMetalKernel(ShimMetalKernel):
    """The factory the tests use; counts launches. (Op and activation are run-time codes now,
    so there are no template variants left to build ahead: `speculate` stays empty.)"""

    launches = 0

    def __call__(self, **kwargs):
        SweepShimMetalKernel.launches += 1
        return super().__call__(**kwargs)


class RecordingShimMetalKernel(ShimMetalKernel):
    """A factory that records every launch as (keyword arguments, outputs) in `launches`
    (hidden outputs such as linear's `z` included). `edit` (class attribute): a function
    (name, header, body) -> (header, body) applied to the sources first, for mutants."""

    launches = []
    edit = None

    def __init__(self, name, input_names, output_names, source, header="", **kwargs):
        if type(self).edit is not None:
            header, source = type(self).edit(name, header, source)
        super().__init__(name, input_names, output_names, source, header, **kwargs)

    def __call__(self, **kwargs):
        outs = super().__call__(**kwargs)
        RecordingShimMetalKernel.launches.append((self.name, kwargs, outs))
        return outs


_mutants = []  # kept alive: kernels.get_kernel caches kernel objects by id(factory)


def recording_factory(edit=None):
    """A RecordingShimMetalKernel class whose kernels are built from edit(name, header, body)."""
    if edit is None:
        return RecordingShimMetalKernel
    cls = type("MutatedShimMetalKernel", (RecordingShimMetalKernel,), {"edit": staticmethod(edit)})
    _mutants.append(cls)
    return cls


@pytest.fixture
def metal_shim():
    """Inside the test, mlx_fusion's fused ops take their Metal path, executed on the CPU.

    Yields the factory class; `factory.launches` counts kernel launches. The shim runs eagerly
    (it evaluates its inputs), so it works under mx.grad but not inside mx.compile / mx.vmap.
    """
    if not have_compiler():
        pytest.skip(f"{CXX} is not on PATH: cannot compile the Metal sources as C++")
    from mlx_fusion import kernels

    with kernels.use_backend("metal", SweepShimMetalKernel):
        yield SweepShimMetalKernel
