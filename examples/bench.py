#!/usr/bin/env python3
# python examples/bench.py --model sd15 --size 256 --steps 2 [--dtype float16] [--lowmem] [--quant int8] ... [--vs diffusers,torch-bf16,openvino]
# tinysd's own figures come from tinysd.bench (--profile included); `--vs` times other engines on the same shapes in the same run
# (examples/peers.py) next to the machine's measured matmul peak, so every figure reads as a fraction of what this CPU can do.
# `--vs openvino` needs `pip install openvino`: a bench-only dependency, not tinysd's.
import argparse, os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # peers.py beside this file
from tinysd import bench
import peers

def parser() -> argparse.ArgumentParser:
  p = bench.parser()
  p.prog, p.description = "examples/bench.py", "tinysd bench, and other engines on the same shapes in the same run"
  p.add_argument("--vs", type=peers.parse_peers, default=[], metavar="PEER[,PEER...]",
                 help=f"also time these on the same shapes and print the ratios: {', '.join(peers.PEERS)}. diffusers: torch eager in --dtype "
                      "(CUDA if torch sees one, else CPU); torch-bf16: the models .to(bfloat16) on the CPU; openvino: convert_model + CPU "
                      "default config (needs `pip install openvino`, a bench-only dependency; conversion is timed apart)")
  p.add_argument("--peak", action=argparse.BooleanOptionalAction, default=True, help="measure the numpy f32 and torch bf16 matmul rates")
  p.add_argument("--peak-size", type=int, default=4096, help=argparse.SUPPRESS)   # smaller for smoke tests
  p.set_defaults(text_encoder_runs=3)   # a replayed text encoder to compare with the peers' warm calls (cheap next to the UNet)
  return p

def main(argv=None) -> int:
  a = parser().parse_args(argv)
  if a.size % 8: print("examples/bench.py: error: --size must be a multiple of 8", file=sys.stderr); return 2
  print(bench.cpu_line(), flush=True)
  if a.vs: peers.check(a.model, a.vs)
  r = bench.run(**bench.kwargs(a))
  r["peak"] = peers.gemm_peak(a.peak_size) if a.peak else None
  r["peers"] = {name: peers.run(name, a) for name in a.vs}
  print(bench.report(r))
  if r["peak"]: print(peers.peak_line(r["peak"]))
  if r["peers"]: print(peers.table(r))
  if a.json:
    import json
    with open(a.json, "w") as f: json.dump(r, f, indent=1)
  return 0

if __name__ == "__main__": sys.exit(main())
