#!/usr/bin/env python3
# python examples/winograd_report.py [--tinygrad]: per 3x3 conv shape of SD1.5 (UNet at 512 px with the CFG batch, VAE decoder at 512 px),
# the time and error of our direct implicit-GEMM conv, our Winograd F(4x4,3x3) and, with --tinygrad, tinygrad's own conv with and without
# its WINO=1 (Tensor.conv2d: tinygrad's generated kernels, on our thread pool; slow, so the big VAE shapes are skipped there). Errors are max|y - ref| / max|ref| against a float64
# direct conv of a slice of the output channels (random N(0, 1/fan_in) weights, unit-normal inputs).
from __future__ import annotations
import os, sys, time
import numpy as np
from tinygrad import Tensor, TinyJit
from tinygrad.helpers import Context
from tinysd_ops import cpu, cpu_winograd
from tinysd.bench import cpu_line

SHAPES = [("unet 64x64", 2, 320, 320, 64), ("unet 32x32", 2, 640, 640, 32), ("unet 16x16", 2, 1280, 1280, 16), ("unet 8x8", 2, 1280, 1280, 8),
          ("vae 64x64", 1, 512, 512, 64), ("vae 128x128", 1, 512, 512, 128), ("vae 256x256", 1, 256, 256, 256), ("vae 512x512", 1, 128, 128, 512)]

def timed(f, x, runs=3) -> tuple[float, np.ndarray]:
  for _ in range(2): y = f(x).numpy()
  ts = []
  for _ in range(runs):
    t = time.perf_counter(); f(x).numpy(); ts.append(time.perf_counter() - t)
  return min(ts), y

def ref_slice(x:np.ndarray, w:np.ndarray, n:int=8) -> np.ndarray:
  B, C, H, W = x.shape
  xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
  return sum(np.einsum("oc,bcyx->boyx", w[:n, :, ky, kx].astype(np.float64), xp[:, :, ky:ky + H, kx:kx + W]) for ky in range(3) for kx in range(3))

if __name__ == "__main__":
  state = cpu.install()
  print(cpu_line(), f"| threads {state['threads']}, isa {state['isa']}, Winograd from {cpu.WINO_MIN_TILES} tiles")
  rng = np.random.default_rng(0)
  print("| conv (batch, C->O, size) | GFLOP (direct) | direct | Winograd | speed-up | err direct | err Winograd |"
        + (" tinygrad | tinygrad WINO=1 | err tinygrad WINO=1 |" if "--tinygrad" in sys.argv else ""))
  print("| --- " * (7 + 3 * ("--tinygrad" in sys.argv)) + "|")
  for name, B, C, O, S in SHAPES:
    x = rng.standard_normal((B, C, S, S), dtype=np.float32)
    w = (rng.standard_normal((O, C, 3, 3)) / np.sqrt(9 * C)).astype(np.float32)
    xt, wt = Tensor(x).realize(), Tensor(w).realize()
    ref = ref_slice(x, w)
    err = lambda y: float(np.abs(y[:, :8] - ref).max() / np.abs(ref).max())
    os.environ["TINYSD_WINOGRAD"] = "0"
    td, yd = timed(TinyJit(lambda x: cpu.conv2d(x, wt, None, padding=1).realize()), xt)
    tw, yw = timed(TinyJit(lambda x: cpu_winograd.conv2d(x, wt, None, 1, "f32", state["threads"], state["isa"]).realize()), xt)
    gf = 2 * B * O * C * 9 * S * S / 1e9
    row = f"| {name} ({B}, {C}->{O}) | {gf:.1f} | {td*1e3:.1f} ms | {tw*1e3:.1f} ms | {td/tw:.2f}x | {err(yd):.1e} | {err(yw):.1e} |"
    if "--tinygrad" in sys.argv and gf < 20:
      tg0, _ = timed(TinyJit(lambda x: x.conv2d(wt, padding=1).realize()), xt, runs=1)
      with Context(WINO=1): tg1, y1 = timed(TinyJit(lambda x: x.conv2d(wt, padding=1).realize()), xt, runs=1)
      row += f" {tg0*1e3:.0f} ms | {tg1*1e3:.0f} ms | {err(y1):.1e} |"
    print(row, flush=True)
  os.environ.pop("TINYSD_WINOGRAD")
