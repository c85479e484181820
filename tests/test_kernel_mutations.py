"""Mutation checks: a deliberately broken kernel must fail the execution checks.

Each mutant is one textual edit of a kernel source (the body, or the shared header as that
kernel sees it): the bias sign flipped, a K tile skipped, a wrong activation code, an
off-by-one in a size bound, an operand sign or a gradient factor dropped, a wrong MMA
fragment order, a reduction left out, an activation-table formula changed. The check runs
the ops through a CPU shim built from the mutated source (tests/_kernel_checks.py) and must
report a failure, while the same check passes on the real sources. Before the GEMM tests,
the linear_activation mutants passed every CPU test (the kernel was only compiled).

Cheap by design: one dtype, two GEMM shapes, one elementwise shape; each mutant costs one
g++ build of the mutated kernel (cached on disk by the text's hash).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from mlx_fusion.patterns import Activation
from tests import _kernel_checks as kc
from tests.cuda_shim.host import CXX, HostLaunchError, have_compiler
from tests.metal_shim import ShimLaunchError
from tests.test_activation_tables import GRID, disagreements, python_table, table_kernels

pytestmark = pytest.mark.skipif(not have_compiler(), reason=f"{CXX} is not on PATH")


@dataclass(frozen=True)
class Mutant:
    kernel: str  # KERNEL_SPECS name, or "table" for the activation table of the header
    language: str  # "cuda" or "metal"
    what: str
    old: str
    new: str
    in_header: bool = False

    @property
    def id(self) -> str:
        return f"{self.language}-{self.kernel}-{self.what}"

    def apply(self, text: str) -> str:
        assert text.count(self.old) == 1, f"{self.id}: {self.old!r} occurs {text.count(self.old)} times"
        return text.replace(self.old, self.new)

    def edit(self, name: str, header: str, body: str):
        """The (header, body) the mutated factory builds kernel `name` from."""
        if name != f"mlx_fusion_{self.kernel}":
            return header, body
        return (self.apply(header), body) if self.in_header else (header, self.apply(body))


# The second `u` loop (the MMAs; the first issues the loads).
MMA_LOOP = "for (int u = 0; u < U; u++) {\n#pragma unroll\n    for (int mt = 0; mt < MT; mt++) {\n#pragma unroll"
EPILOGUE_ROWS = "for (int r = 0; r < 16 && m0 + r < M; r++) {\n      float v"

MUTANTS = [
    # --- the small-M GEMM, CUDA
    Mutant("linear_activation", "cuda", "bias-sign", "v += fusion_float(b[col]);", "v -= fusion_float(b[col]);"),
    Mutant("linear_activation", "cuda", "skip-k-tile", MMA_LOOP, MMA_LOOP.replace("u = 0", "u = 1")),
    Mutant("linear_activation", "cuda", "activation-code", "const int act = int(p[2]);",
           "const int act = int(p[2]) ^ 1;"),
    Mutant("linear_activation", "cuda", "m-bound", "if (row < M && col < N) {", "if (row < M - 1 && col < N) {"),
    Mutant("linear_activation", "cuda", "n-bound", "wok[nt] = col < N;", "wok[nt] = col + 1 < N;"),
    Mutant("linear_activation", "cuda", "mma-fragment-order",
           "xv[u][mt][0].x, xv[u][mt][1].x, xv[u][mt][0].y, xv[u][mt][1].y",
           "xv[u][mt][0].x, xv[u][mt][0].y, xv[u][mt][1].x, xv[u][mt][1].y"),
    # --- the small-M GEMM, Metal
    Mutant("linear_activation", "metal", "bias-sign", "v += float(b[col]);", "v -= float(b[col]);"),
    Mutant("linear_activation", "metal", "skip-k-tile", "for (int k = lane * 8; k < K;",
           "for (int k = lane * 8 + LANES * 8; k < K;"),
    Mutant("linear_activation", "metal", "activation-code", "const int act = int(p[2]);",
           "const int act = int(p[2]) ^ 1;"),
    Mutant("linear_activation", "metal", "m-bound", EPILOGUE_ROWS, EPILOGUE_ROWS.replace("< M;", "< M - 1;")),
    Mutant("linear_activation", "metal", "n-bound", "if (col >= N) {", "if (col >= N - 1) {"),
    Mutant("linear_activation", "metal", "no-simd-sum", "float v = metal::simd_sum(acc[r]);", "float v = acc[r];"),
    # --- elementwise, CUDA (the loops live in the header, the dispatch in the body)
    Mutant("binary_activation", "cuda", "activation-code", "FUSION_DISPATCH(m[0], m[1],",
           "FUSION_DISPATCH(m[0], m[1] ^ 1,"),
    Mutant("binary_activation", "cuda", "n-bound", "fusion_size(b_shape, b_ndim));",
           "fusion_size(b_shape, b_ndim)) - 1;"),
    Mutant("binary_activation", "cuda", "operand-sign", "x[k] = fusion_activation(ACT, fusion_binary(OP, x[k], y[k]));",
           "x[k] = fusion_activation(ACT, fusion_binary(OP, x[k], -y[k]));", in_header=True),
    Mutant("binary_activation_backward", "cuda", "activation-code", "FUSION_DISPATCH(m[0], m[1],",
           "FUSION_DISPATCH(m[0], m[1] ^ 1,"),
    Mutant("binary_activation_backward", "cuda", "operand-swap", "d[k] = dz * y[k];", "d[k] = dz * x[k];",
           in_header=True),
    Mutant("scalar_activation", "cuda", "shift-sign", "p[0], p[1], x_shape", "p[0], -p[1], x_shape"),
    Mutant("scalar_activation", "cuda", "activation-code", "FUSION_DISPATCH_ACT(int(p[2]),",
           "FUSION_DISPATCH_ACT(int(p[2]) ^ 1,"),
    Mutant("scalar_activation", "cuda", "n-bound", "fusion_size(x_shape, x_ndim);",
           "fusion_size(x_shape, x_ndim) - 1;"),
    Mutant("scalar_activation_backward", "cuda", "scale-dropped", "v[k] * scale + shift) * scale;",
           "v[k] * scale + shift);", in_header=True),
    # --- elementwise, Metal
    Mutant("binary_activation", "metal", "activation-code", "const int act = m[1];", "const int act = m[1] ^ 1;"),
    Mutant("binary_activation", "metal", "n-bound", "if (i >= n) {", "if (i >= n - 1) {"),
    Mutant("binary_activation", "metal", "operand-sign", "fusion_binary(op, x, y)", "fusion_binary(op, x, -y)"),
    Mutant("binary_activation_backward", "metal", "activation-code", "const int act = m[1];",
           "const int act = m[1] ^ 1;"),
    Mutant("binary_activation_backward", "metal", "operand-swap", "da[i] = T(dz * y);", "da[i] = T(dz * x);"),
    Mutant("scalar_activation", "metal", "shift-sign", "float(x[i]) * scale + shift)", "float(x[i]) * scale - shift)"),
    Mutant("scalar_activation", "metal", "activation-code", "const int act = int(p[2]);",
           "const int act = int(p[2]) ^ 1;"),
    Mutant("scalar_activation", "metal", "n-bound", "if (i >= n) {", "if (i >= n - 1) {"),
    Mutant("scalar_activation_backward", "metal", "scale-dropped", "dx[i] = T(dz * scale);", "dx[i] = T(dz);"),
    # --- the activation tables (headers)
    Mutant("table", "cuda", "relu-drops-nan", "(z > 0.0f || isnan(z)) ? z : 0.0f", "(z > 0.0f) ? z : 0.0f"),
    Mutant("table", "metal", "relu-drops-nan", "(z > 0.0f || metal::isnan(z)) ? z : 0.0f", "(z > 0.0f) ? z : 0.0f"),
    Mutant("table", "cuda", "gelu-approx-constant", "(z + 0.044715f * z * z * z)", "(z + 0.045f * z * z * z)"),
    Mutant("table", "metal", "gelu-approx-constant", "(z + 0.044715f * z * z * z)", "(z + 0.045f * z * z * z)"),
    Mutant("table", "cuda", "silu-derivative", "s * (1.0f + z * (1.0f - s))", "s * (1.0f + z * (1.0f + s))"),
    Mutant("table", "metal", "silu-derivative", "s * (1.0f + z * (1.0f - s))", "s * (1.0f + z * (1.0f + s))"),
]


def table_check(language: str, header=None):
    """Failures of the activation table of `header` (default: the real one) vs Python."""
    run = table_kernels(**{f"{language}_header": header})[language]
    failures = []
    for act in Activation:
        got, want = run(act.code, GRID), python_table(act, GRID)
        for g, w in zip(got, want):
            if len(disagreements(g, w, GRID, rtol=2e-6, atol=2e-7)):
                failures.append(f"{language} {act}")
    return failures


def execution_check(mutant: Mutant, edit=None):
    """The check that covers the mutated kernel, on the mutant (edit) or the real sources."""
    if mutant.kernel == "table":
        from mlx_fusion.kernels import kernel_source

        header = kernel_source("binary_activation", mutant.language)[0]
        return table_check(mutant.language, mutant.apply(header) if edit else None)
    fac = kc.factory(mutant.language, edit)
    if mutant.kernel == "linear_activation":
        return kc.check_linear_quick(mutant.language, fac)
    return kc.check_elementwise(mutant.language, fac)


@pytest.mark.parametrize("language", ["cuda", "metal"])
@pytest.mark.parametrize("kernel", ["linear_activation", "binary_activation", "table"])
def test_real_sources_pass_the_checks(language, kernel):
    """Without this, a mutant 'caught' by a check that always fails would prove nothing."""
    assert not execution_check(Mutant(kernel, language, "none", "", "")), (language, kernel)


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.id)
def test_mutant_is_caught(mutant):
    try:
        failures = execution_check(mutant, edit=mutant.edit)
    except (HostLaunchError, ShimLaunchError) as err:  # a write outside an output, a deadlock
        failures = [str(err)]
    assert failures, f"{mutant.id}: the broken kernel passed its execution check"


def test_every_listed_mutation_is_covered():
    """Each kernel source has the mutations the suite promises (docs/testing.md)."""
    kinds = {(m.kernel, m.language, m.what) for m in MUTANTS}
    for language in ("cuda", "metal"):
        for what in ("bias-sign", "skip-k-tile", "activation-code", "m-bound", "n-bound"):
            assert ("linear_activation", language, what) in kinds
        for kernel in ("binary_activation", "binary_activation_backward", "scalar_activation",
                       "scalar_activation_backward"):
            assert any(k == kernel and lang == language for k, lang, _ in kinds), (kernel, language)
        assert ("binary_activation", language, "activation-code") in kinds
        assert ("scalar_activation", language, "n-bound") in kinds
    assert np.isnan(GRID).any()
