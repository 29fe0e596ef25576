#!/usr/bin/env python3
# python examples/tiling_report.py [--1024]: peak activation memory of tiled vs untiled VAE decode (SD1.5 VAE on the NULL device), and the
# tiled-vs-untiled error on a random-weight VAE on the CPU
from __future__ import annotations
import numpy as np
from tinygrad import Tensor, GlobalCounters
from tinysd.models.vae import AutoencoderKL
from ops.tiling import decode_tiled, peak_memory

if __name__ == "__main__":
  import sys, time
  from tinygrad.helpers import Context
  from tinygrad.nn.state import get_parameters, get_state_dict
  from tinysd.configs import SD15
  # 1) peak activation memory, real SD1.5 VAE on the NULL device (allocates, runs nothing): weights and input allocated before measuring
  vae = AutoencoderKL(SD15.vae)
  for p in get_parameters(vae): p.replace(Tensor.empty(*p.shape, dtype=p.dtype, device="NULL"))
  for p in get_parameters(vae): p.realize().uop.buffer.ensure_allocated()
  print(f"SD1.5 VAE fp32 on NULL, weights {GlobalCounters.mem_used/1e6:.0f} MB (excluded); peak activation memory of one decode, batch 1:")
  for px, runs in ((512, (None, (32, 8), (64, 16))),) + (((1024, (None, (64, 16))),) if "--1024" in sys.argv else ()):
    for tt in runs:
      z = Tensor.empty(1, 4, px // 8, px // 8, device="NULL").realize()
      z.uop.buffer.ensure_allocated()
      t0 = time.perf_counter()
      with Context(NULL_ALLOW_COPYOUT=1, NOOPT=1), peak_memory() as peak:   # NOOPT: kernel opts change no buffer, and halve the build time
        (vae.decode(z) if tt is None else decode_tiled(vae, z, *tt)).realize()
      what = "untiled" if tt is None else f"tiled tile={tt[0]} overlap={tt[1]}" + (" (= untiled path)" if px // 8 <= tt[0] else "")
      print(f"  {px}x{px}  {what:40s} {peak[0]/1e6:7.1f} MB   ({time.perf_counter()-t0:.0f} s to schedule)")
  # 2) error of tiled vs untiled decode on CPU, random weights (conv/linear N(0, 1/fan_in), norms 1+N(0, 0.1^2), biases N(0, 0.1^2))
  vae, rng = AutoencoderKL(SD15.vae), np.random.default_rng(0)
  for k, p in get_state_dict(vae).items():
    fan_in = int(np.prod(p.shape[1:]))
    a = rng.standard_normal(p.shape, dtype=np.float32) * np.float32(fan_in ** -0.5 if p.ndim > 1 else 0.1)
    p.replace(Tensor(a + (1 if p.ndim == 1 and "norm" in k and k.endswith("weight") else 0)))
  Tensor.realize(*get_parameters(vae))
  z = Tensor(rng.standard_normal((1, 4, 32, 32), dtype=np.float32)).realize()
  t0 = time.perf_counter()
  with peak_memory() as pu: ref = vae.decode(z).numpy()
  t1 = time.perf_counter()
  with peak_memory() as pt: til = decode_tiled(vae, z, 16, 4).numpy()
  t2 = time.perf_counter()
  err = np.abs(til - ref) / 2   # images are in [-1, 1]: /2 gives [0, 1] units
  eight = np.abs(np.round(np.clip((til + 1) / 2, 0, 1) * 255) - np.round(np.clip((ref + 1) / 2, 0, 1) * 255))
  print("SD1.5 VAE fp32 on CPU, RANDOM weights (not a trained VAE), 256x256, tiled tile=16 overlap=4 latent vs untiled:")
  print(f"  output std {ref.std()/2:.3f}; error ([0,1] image units) max abs {err.max():.4f}, mean abs {err.mean():.4f}; "
        f"8-bit pixels differing {(eight > 0).mean()*100:.1f}% (max {eight.max():.0f}/255)")
  print(f"  CPU peak activation memory {pu[0]/1e6:.1f} MB untiled vs {pt[0]/1e6:.1f} MB tiled; time {t1-t0:.0f} s vs {t2-t1:.0f} s (incl. compile)")
