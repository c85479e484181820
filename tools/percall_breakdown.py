"""Where a fused add+relu call's time goes on a GPU: the kernel launch, the source MLX hashes on
every launch (header as written, as shipped by `kernels.compact`, minified, none), the
stop_gradient nodes and the custom_function around it, one layer at a time.

    PYTHONPATH=$PWD python tools/percall_breakdown.py [--size 65536] [--dtype bfloat16]

Each line: device microseconds per call (50 calls per mx.eval, median) and host microseconds
to build the call's graph (no eval). GPU only (the kernel rows need mx.fast.cuda_kernel or
metal_kernel).
"""

from __future__ import annotations

import argparse
import re
import sys

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from percall_profile import StubKernel, device_us, host_us  # noqa: E402

from mlx_fusion import kernels  # noqa: E402
from mlx_fusion.kernels import KERNEL_SPECS  # noqa: E402
from mlx_fusion.ops import fused_binary  # noqa: E402
from mlx_fusion.ops.common import launch_geometry  # noqa: E402
from mlx_fusion.patterns import Activation, BinaryOp  # noqa: E402


def minify(src: str) -> str:
    """Comments, indentation and blank lines out (what MLX hashes per eval shrinks)."""
    out = []
    for line in src.splitlines():
        i = line.find("//")
        if i >= 0 and line[:i].count('"') % 2 == 0:
            line = line[:i]
        line = re.sub(r"\s+\\$", " \\\\", line.rstrip()).strip()
        if line:
            out.append(line)
    return "\n".join(out) + "\n"


TINY = ("const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;\n"
        "if (i < N) { float z = float(a[i]) + float(b[i]); out[i] = T(z > 0 ? z : 0); }\n")


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=2**16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--stub", action="store_true", help="a CPU check of this script: stub kernels, host times only")
    a = p.parse_args(argv)
    if a.stub:
        with kernels.use_backend("cuda", StubKernel):
            return run(a, StubKernel)
    if kernels.kernel_backend() != "cuda":
        print("needs the CUDA backend (or --stub)")
        return 1
    return run(a, mx.fast.cuda_kernel)


def run(a, factory):
    dt = getattr(mx, a.dtype)
    n = a.size
    x = mx.random.normal((n // 4096, 4096)).astype(dt)
    y = mx.random.normal((n // 4096, 4096)).astype(dt)
    m = mx.array([BinaryOp.ADD.code, Activation.RELU.code], dtype=mx.int32)
    mx.eval(x, y, m)
    spec = KERNEL_SPECS["binary_activation"]
    header, body = kernels.kernel_source("binary_activation", "cuda")
    grid, group = launch_geometry(n, dt)

    def make(name, hdr, src, inputs=("a", "b", "m")):
        return factory(name=name, input_names=list(inputs), output_names=["out"], source=src,
                                   header=hdr, ensure_row_contiguous=spec.ensure_row_contiguous)

    original = (kernels._source_dir() / "common.cu").read_text()  # as written, comments and all
    full = make("pc_full", header, body)
    uncompacted = make("pc_orig", original, body)
    small = make("pc_small", minify(header), minify(body))
    tiny = make("pc_tiny", "", TINY, ("a", "b"))
    shape, dts, tmpl = [x.shape], [dt], [("T", dt)]

    def call(k):
        return lambda a, b: k(inputs=[a, b, m], output_shapes=shape, output_dtypes=dts, grid=grid,
                              threadgroup=group, template=tmpl)[0]

    raw_full, raw_small, raw_orig = call(full), call(small), call(uncompacted)

    def raw_tiny(a, b):
        return tiny(inputs=[a, b], output_shapes=shape, output_dtypes=dts, grid=(n, 1, 1),
                    threadgroup=(256, 1, 1), template=[("T", dt), ("N", n)])[0]

    def stopped(f):
        return lambda a, b: f(mx.stop_gradient(a), mx.stop_gradient(b))

    def custom(f):  # with rules of its own, as the fused ops have: the jvp check isolates the tape walk
        cf = mx.custom_function(f)
        cf.vjp(lambda primals, cot, out: (cot, cot))
        cf.jvp(lambda primals, tangents: tangents[0] + tangents[1])
        return cf

    rows = {
        "mlx a + b": lambda a, b: a + b,
        "mlx relu(a + b)": lambda a, b: nn.relu(a + b),
        "mlx compiled relu(a + b)": mx.compile(lambda a, b: nn.relu(a + b)),
        "stop_gradient(a)": lambda a, b: mx.stop_gradient(a),
        f"raw, header as written {len(original)} B": raw_orig,
        f"raw, header as shipped {len(header)} B": raw_full,
        f"raw, minified header {len(minify(header))} B": raw_small,
        "raw tiny kernel, no header": raw_tiny,
        "raw + 2 stop_gradient": stopped(raw_full),
        "custom_function(raw)": custom(raw_full),
        "custom_function(raw minified)": custom(raw_small),
        "custom_function(raw + 2 stop_gradient)": custom(stopped(raw_full)),
        "fused_binary": lambda a, b: fused_binary(a, b),
        "compiled custom_function(raw)": mx.compile(custom(raw_full)),
        "compiled fused_binary": mx.compile(lambda a, b: fused_binary(a, b)),
    }
    for what, f in (("custom_function(raw)", custom(raw_full)), ("custom_function(raw + 2 stop_gradient)",
                                                                  custom(stopped(raw_full)))):
        if a.stub:
            break
        try:  # does MLX's jvp trace into a kernel whose inputs are the primals?
            mx.eval(mx.jvp(f, [x, y], [x, y]))
            print(f"jvp of {what}: ok")
        except Exception as e:
            print(f"jvp of {what}: {type(e).__name__}: {e}")
    print(f"# add+relu {n} {a.dtype}, {a.calls} calls per eval")
    for name, fn in rows.items():
        if a.stub and name.startswith("compiled"):
            continue  # the stub evaluates nothing
        d = device_us(fn, [x, y], a.calls, 15) if not a.stub else float("nan")
        h = host_us(fn, [x, y], 2000, 7)
        print(f"{name:<42} device {d:8.2f} us   host {h:7.2f} us", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
