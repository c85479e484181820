"""Markdown table of a benchmarks/ops.py --json file, as docs/performance.md shows it.

    python3 tools/results_table.py docs/data/h100-elementwise.json
"""
import json
import sys


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def main(path):
    data = json.load(open(path))
    print("| op | pass | shape | dtype | eager µs | mx.compile µs | fused µs | fused call µs | × eager "
          "| × compile | GB/s (% copy) | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in data["results"]:
        linear = r["kind"] == "linear"
        bw = "-" if linear or r["pass"] != "fwd" else f"{r['fused_gbps']:.0f} ({r['pct_of_copy']:.0f}%)"
        tf = f"{r['fused_tflops']:.3g}" if linear else "-"
        print(f"| {r['op']} | {r['pass']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {fmt(r['eager_us'])} "
              f"| {fmt(r['compiled_us'])} | {fmt(r['fused_us'])} | {fmt(r['extra'].get('fused_call_us'))} "
              f"| {r['speedup_vs_eager']:.2f} | {r['speedup_vs_compiled']:.2f} | {bw} | {tf} |")


if __name__ == "__main__":
    main(sys.argv[1])
