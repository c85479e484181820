"""Data-parallel training of a fused model: 2 ranks on this machine's CPU, ring backend.

`mlx.launch -n 2 --backend ring` starts two copies of tests/_dp_worker.py on
localhost; each trains a tiny mlx-lm llama unfused and fused on its half of the
batch, averaging gradients with `nn.average_gradients`. The fused run must give
the unfused run's losses, both ranks the same ones, and both must match one
process training on the whole batch (which shows the all-reduce happened).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("mlx_lm")

WORKER = Path(__file__).with_name("_dp_worker.py")
STEPS = 4


def free_port() -> int:
    """A port the ring backend can start from (rank r listens on port + r)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out_dir: Path) -> subprocess.CompletedProcess:
    launcher = shutil.which("mlx.launch", path=os.path.dirname(sys.executable)) or shutil.which("mlx.launch")
    if launcher is None:
        pytest.skip("mlx.launch is not installed next to this Python")
    cmd = [launcher, "-n", "2", "--backend", "ring", "-p", str(free_port()), "--python", sys.executable,
           str(WORKER), str(out_dir), str(STEPS)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(WORKER.parent.parent), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=WORKER.parent.parent)


def test_fused_data_parallel_training_matches_unfused(tmp_path):
    proc = launch(tmp_path)
    results = [tmp_path / f"rank{r}.json" for r in range(2)]
    assert proc.returncode == 0 and all(p.exists() for p in results), proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads(p.read_text()) for p in results]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["size"] == 2 for r in ranks)
    for r in ranks:
        assert r["fallbacks"] == {} and r["traces"] >= 1
        np.testing.assert_allclose(r["fused"], r["unfused"], rtol=1e-5)
        assert r["unfused"][-1] < r["unfused"][0]
    assert ranks[0]["fused"] == ranks[1]["fused"]  # the all-reduced loss is the same everywhere

    # One process on the whole batch: the mean of the two half-batch gradients.
    sys.path.insert(0, str(WORKER.parent))
    try:
        import _dp_worker
    finally:
        sys.path.remove(str(WORKER.parent))
    single = _dp_worker.train(_dp_worker.build(), mx.distributed.init(), STEPS)
    np.testing.assert_allclose(ranks[0]["unfused"], single, rtol=1e-4)
