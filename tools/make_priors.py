"""Turn benchmark JSON files (benchmarks/ops.py --backward --json) into the
shipped priors the tracker falls back on for a device kind with no local
measurements: mlx_fusion/data/priors-<kind>.json.

    python3 tools/make_priors.py cuda docs/data/h100-elementwise.json docs/data/h100-linear.json \
        docs/data/h200-llama-model-priors.json

Each entry's speedup is the smaller of the forward and forward+backward ratios
of fused vs the better of eager and mx.compile: a fusion must pay in training
as well as inference to be taken by default, and win by at least 5%: a ratio in
[1.00, 1.05) is run-to-run noise on these machines and is written as 0.99 (a custom
op in the graph for nothing). Per-kind entries ("*binary",
"*scalar", "*linear") give the median for patterns that were not measured.
A file of kind "prior-overlay" (entries written from a model-level measurement, with
its note) is copied in as it is, after the op tables; its "*kind" entries replace the op
tables' entries of that kind at the same dtype and size bucket.
"""
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_fusion.benchmark import case_for_pattern  # noqa: E402
from mlx_fusion.perfcache import cache_key, output_size, size_bucket  # noqa: E402

MARGIN = 1.05  # the least speedup taken as a win (module docstring)


def _kind_of(name: str) -> str:
    return name[1:] if name.startswith("*") else case_for_pattern(name).kind


def _win(speedup: float) -> float:
    return 0.99 if 1.0 <= speedup < MARGIN else round(speedup, 3)


def main(kind, *paths):
    best = {}
    source = set()
    per_kind = defaultdict(list)
    overlays = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        source.add(f"{data['device']}, MLX {data['mlx']}")
        if data.get("kind") == "prior-overlay":
            overlays.update(data["entries"])
            continue
        for r in data["results"]:
            case = case_for_pattern(r["op"])
            bucket = size_bucket(output_size(case.kind, tuple(r["shape"])))
            key = cache_key(kind, case.pattern, r["dtype"], bucket)
            best[key] = min(best.get(key, float("inf")), r["speedup"])
    for key, s in best.items():
        _, name, dtype, bucket = key.split("|")
        per_kind[(case_for_pattern(name).kind, dtype, bucket)].append(s)
    entries = {k: {"speedup": _win(v)} for k, v in best.items()}
    for (k, dtype, bucket), vals in per_kind.items():
        entries[f"{kind}|*{k}|{dtype}|{bucket}"] = {"speedup": _win(statistics.median(vals))}
    for key in overlays:  # an overlay's "*kind" entry speaks for every pattern of that kind there
        _, name, dtype, bucket = key.split("|")
        if name.startswith("*"):
            for k in [k for k in entries if _kind_of(k.split("|")[1]) == name[1:]
                      and k.split("|")[2:] == [dtype, bucket]]:
                del entries[k]
    entries.update(overlays)
    out = Path(__file__).resolve().parent.parent / "mlx_fusion" / "data" / f"priors-{kind}.json"
    out.write_text(json.dumps({"measured_on": sorted(source), "rule": __doc__.split("\n\n")[2],
                               "entries": dict(sorted(entries.items()))}, indent=1) + "\n")
    print(f"{out}: {len(entries)} entries")


if __name__ == "__main__":
    main(*sys.argv[1:])
