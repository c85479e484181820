"""Issue 11 item 4 on a GPU: prefill, decode and a training step of an mlx-lm llama for eager /
mx.compile / fuse(model, compile=False) / fuse(model), with many interleaved rounds (median), so
that a 0-fusion fused model can be compared with its baseline within one run.

    PYTHONPATH=$PWD:$PWD/.device/py python3 tools/gpu_zero_overhead.py [SPEC] [--json PATH] [--repeats N]

Default SPEC: the llama-2 shape of docs/performance.md (8 layers, hidden 2048, bf16, batch 4 x 512);
decode is batch 1, a 128-token prompt and 128 new tokens, as issue 12 measures it.
"""
import argparse
import json
import math

from mlx_fusion.lm import bench_lm, build, print_rows

LLAMA2 = ("mlx-lm:llama:hidden_size=2048,num_hidden_layers=8,intermediate_size=5632,num_attention_heads=16,"
          "num_key_value_heads=8,vocab_size=32000,dtype=bfloat16,batch=4,seq=512")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("spec", nargs="?", default=LLAMA2)
    p.add_argument("--json")
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt", type=int, default=128)
    args = p.parse_args()
    model, (tokens,) = build(args.spec)
    rows = bench_lm(model, tokens, repeats=args.repeats, min_time_s=0, new_tokens=args.new_tokens,
                    prompt_len=args.prompt, progress=lambda s: print("...", s, flush=True))
    print_rows(rows, title=args.spec)
    for pass_ in ("prefill", "decode", "train"):  # the two ratios item 4 asks for
        got = {r["variant"]: r for r in rows if r["pass"] == pass_}
        eager, comp = got["eager"]["time_ms"], got["mx.compile"]["time_ms"]
        fused, fc = got["fused"]["time_ms"], got["fused+compile"]["time_ms"]
        line = f"{pass_}: fused vs eager {eager / fused:.3f}x"
        if not math.isnan(comp):
            line += f", fused+compile vs mx.compile {comp / fc:.3f}x"
        else:
            line += f", fused+compile vs eager {eager / fc:.3f}x"
        print(line, "fusions", got["fused"]["fusions"], got["fused+compile"]["fusions"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=lambda o: None)


if __name__ == "__main__":
    main()
