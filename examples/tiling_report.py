#!/usr/bin/env python3
# python examples/tiling_report.py [--1024]: peak activation memory of tiled vs untiled VAE decode (SD1.5 VAE on the NULL device), and the
# tiled-vs-untiled error on a random-weight VAE on the CPU
from __future__ import annotations
import numpy as np
from tinygrad import Tensor, GlobalCounters
from tinysd.models.vae import AutoencoderKL
from tinysd_ops.tiling import decode_tiled
from tinysd_ops.tg import PeakMemory, allocate, placeholder_init, random_init

if __name__ == "__main__":
  import sys, time
  from tinygrad.helpers import Context
  from tinygrad.nn.state import get_parameters
  from tinysd.configs import SD15
  # 1) peak activation memory, real SD1.5 VAE on the NULL device (allocates, runs nothing): weights and input allocated before measuring
  vae = AutoencoderKL(SD15.vae)
  for p in get_parameters(vae): p.replace(Tensor.empty(*p.shape, dtype=p.dtype, device="NULL"))
  for p in get_parameters(vae): allocate(p)
  print(f"SD1.5 VAE fp32 on NULL, weights {GlobalCounters.mem_used/1e6:.0f} MB (excluded); peak activation memory of one decode, batch 1:")
  for px, runs in ((512, (None, (32, 8), (64, 16))),) + (((1024, (None, (64, 16))),) if "--1024" in sys.argv else ()):
    for tt in runs:
      z = allocate(Tensor.empty(1, 4, px // 8, px // 8, device="NULL"))
      t0 = time.perf_counter()
      with Context(NULL_ALLOW_COPYOUT=1, NOOPT=1), PeakMemory() as peak:   # NOOPT: kernel opts change no buffer, and halve the build time
        (vae.decode(z) if tt is None else decode_tiled(vae, z, *tt)).realize()
      what = "untiled" if tt is None else f"tiled tile={tt[0]} overlap={tt[1]}" + (" (= untiled path)" if px // 8 <= tt[0] else "")
      print(f"  {px}x{px}  {what:40s} {peak.peak/1e6:7.1f} MB   ({time.perf_counter()-t0:.0f} s to schedule)")
  # 2) error of tiled vs untiled decode on CPU, random weights (ops/tg.py random_init)
  rng = np.random.default_rng(0)
  with placeholder_init(): vae = AutoencoderKL(SD15.vae)
  random_init(vae, rng)
  z = Tensor(rng.standard_normal((1, 4, 32, 32), dtype=np.float32)).realize()
  t0 = time.perf_counter()
  with PeakMemory() as pu: ref = vae.decode(z).numpy()
  t1 = time.perf_counter()
  with PeakMemory() as pt: til = decode_tiled(vae, z, 16, 4).numpy()
  t2 = time.perf_counter()
  err = np.abs(til - ref) / 2   # images are in [-1, 1]: /2 gives [0, 1] units
  eight = np.abs(np.round(np.clip((til + 1) / 2, 0, 1) * 255) - np.round(np.clip((ref + 1) / 2, 0, 1) * 255))
  print("SD1.5 VAE fp32 on CPU, RANDOM weights (not a trained VAE), 256x256, tiled tile=16 overlap=4 latent vs untiled:")
  print(f"  output std {ref.std()/2:.3f}; error ([0,1] image units) max abs {err.max():.4f}, mean abs {err.mean():.4f}; "
        f"8-bit pixels differing {(eight > 0).mean()*100:.1f}% (max {eight.max():.0f}/255)")
  print(f"  CPU peak activation memory {pu.peak/1e6:.1f} MB untiled vs {pt.peak/1e6:.1f} MB tiled; time {t1-t0:.0f} s vs {t2-t1:.0f} s (incl. compile)")
