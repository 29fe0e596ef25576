#!/usr/bin/env python3
# python examples/memory_table.py [--size 512] [--steps 1] [--rows all|targets|NAME,...] [--out table.md]
# The README's memory table: one `tinysd bench` process per row (peak RSS is per process), SD1.5 with random weights at real size:
# text encoder, UNet steps (compile, JIT capture, then --steps timed steps) and VAE decode. Weight files are written once and reused.
import argparse, json, os, subprocess, sys, tempfile

ROWS = {  # name -> bench flags (each switch alone on top of the first row, then the combinations); the weight file depends on dtype + quant
  "fp32, plain attention":          ["--dtype", "float32", "--no-split-attention"],
  "fp32 + split attention":         ["--dtype", "float32"],
  "fp16 weights":                   ["--dtype", "float16", "--no-split-attention"],
  "fp32 + shortcuts int8":          ["--dtype", "float32", "--no-split-attention", "--compress-shortcuts", "int8"],
  "fp32 + lowmem (tiled VAE)":      ["--dtype", "float32", "--no-split-attention", "--lowmem"],
  "fp32 + int8 weights":            ["--dtype", "float32", "--no-split-attention", "--quant", "int8"],
  "fp16 + split + lowmem":          ["--dtype", "float16", "--lowmem"],
  "fp16 + split + lowmem + shortcuts int8 + int8 weights": ["--dtype", "float16", "--lowmem", "--compress-shortcuts", "int8", "--quant", "int8"],
  "fp16 + split + lowmem + shortcuts int8 + pal6 weights": ["--dtype", "float16", "--lowmem", "--compress-shortcuts", "int8", "--quant", "pal6"],
  "fp16 + split + lowmem + shortcuts int8 + pal4 weights": ["--dtype", "float16", "--lowmem", "--compress-shortcuts", "int8", "--quant", "pal4"],
}
TARGETS = ["fp16 + split + lowmem", "fp16 + split + lowmem + shortcuts int8 + int8 weights"]

def flag(flags, name, default=None): return flags[flags.index(name) + 1] if name in flags else default

def main() -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--steps", type=int, default=1)
  p.add_argument("--rows", default="all", help="all, targets, or names separated by ';'")
  p.add_argument("--weights-dir", default=os.path.join(tempfile.gettempdir(), "tinysd-bench-weights"))
  p.add_argument("--out", default=None, help="append each finished row (markdown) to this file")
  a = p.parse_args()
  names = list(ROWS) if a.rows == "all" else TARGETS if a.rows == "targets" else a.rows.split(";")
  os.makedirs(a.weights_dir, exist_ok=True)
  print("| options | peak RSS (GiB) | peak tinygrad (GiB) | per phase RSS: load / text enc / UNet / VAE | UNet step (s) | VAE decode (s) |")
  print("|---|---|---|---|---|---|")
  for name in names:
    flags = ROWS[name]
    w = os.path.join(a.weights_dir, f"sd15-{flag(flags, '--dtype')}-{flag(flags, '--quant', 'float')}.safetensors")
    js = os.path.join(a.weights_dir, "last.json")
    cmd = [sys.executable, "-m", "tinysd.bench", "--size", str(a.size), "--steps", str(a.steps), "--weights", w, "--json", js, *flags]
    print(f"# {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    if subprocess.run(cmd, stdout=sys.stderr).returncode != 0: print(f"| {name} | failed | | | | |"); continue
    with open(js) as f: r = json.load(f)
    ph = " / ".join(f"{r['phase_rss'][k]:.2f}" for k in ("load", "text encoder", "unet", "vae decode"))
    line = (f"| {name} | {r['peak_rss_gib']:.2f} | {r['peak_tinygrad_gib']:.2f} | {ph} | {r['step_s']:.1f} | "
            f"{r['vae_decode_s'][-1]:.1f} |")
    print(line, flush=True)
    if a.out:
      with open(a.out, "a") as f: f.write(line + "\n")
  return 0

if __name__ == "__main__": sys.exit(main())
