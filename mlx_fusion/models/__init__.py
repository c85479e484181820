"""Models for the CLI and benchmarks: demo models, the SPEC strings naming them, and timing a whole model.

    model, inputs = load_spec("mlp:width=1024,depth=4,batch=64")   # spec.py (demo models: demos.py)
    rows = bench_model(model, inputs)                               # bench.py

See docs/cli.md ("Model SPEC").
"""

from .bench import bench_model, model_variants
from .demos import DEMO_MODELS, MLP, GatedMLP, Transformer, TransformerBlock
from .spec import (DTYPES, EXIT_BAD_SPEC, EXIT_LOAD_FAILED, SPEC_BUILDERS, ModelSpec, SpecError, describe_demos,
                   load_spec, parameter_count, parse_spec)

__all__ = ["MLP", "GatedMLP", "TransformerBlock", "Transformer", "DEMO_MODELS", "SpecError", "ModelSpec",
           "parse_spec", "load_spec", "describe_demos", "parameter_count", "SPEC_BUILDERS", "DTYPES",
           "bench_model", "model_variants", "EXIT_BAD_SPEC", "EXIT_LOAD_FAILED"]
