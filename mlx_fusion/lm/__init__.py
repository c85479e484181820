"""mlx-lm models in mlx-fusion: SPECs, timing, and a drop-in for mlx-lm's commands.

    import mlx_fusion.lm
    mlx_fusion.lm.patch_mlx_lm()                       # mlx_lm.load() now returns fused models
    model, (tokens,) = mlx_fusion.lm.build("mlx-lm:llama:hidden_size=128,batch=2,seq=64")
    rows = mlx_fusion.lm.bench_lm(model, tokens)       # prefill / decode / train rows

Nothing here imports mlx_lm until it is used. See docs/mlx-lm.md.
"""

from .run import add_run_parser, cmd_run, is_patched, patch_mlx_lm, run_module, unpatch_mlx_lm
from .spec import PREFIX, build, is_lm_spec, model_config, tiny_model
from .timing import bench_lm, print_rows

__all__ = ["build", "is_lm_spec", "PREFIX", "model_config", "tiny_model", "bench_lm", "print_rows",
           "patch_mlx_lm", "unpatch_mlx_lm", "is_patched", "run_module", "add_run_parser", "cmd_run"]
