#!/usr/bin/env python3
from __future__ import annotations
from tinygrad import Tensor
from tinysd_ops.shortcuts import MODES, install, compressed_nbytes
from tinysd_ops.tg import placeholder_init, random_init, PeakMemory

# python examples/shortcuts_report.py: memory saved and error added by shortcut compression (random weights throughout: memory does not depend on them, errors do a little)

def _skip_shapes(unet, sample:Tensor, *args) -> list[tuple[tuple[int, ...], object]]:
  seen, hook = [], unet.keep_skip
  unet.keep_skip = lambda t: (seen.append((t.shape, t.dtype)), t)[1]
  try: unet(sample, *args)   # lazy: nothing runs
  finally: unet.keep_skip = hook
  return seen

def _memory(cfg, latent:int, batch:int, modes:tuple, attention:bool, log=print) -> dict:
  # NULL device: allocates and plans, runs no kernels. The step runs under TinyJit as in the pipeline: call 1 runs eagerly (and allocates
  # the weights: subtracted), call 2 captures and memory-plans the whole step into one arena (the steady state), later calls reuse it.
  from tinygrad import TinyJit, Context
  from tinygrad.nn.state import get_parameters
  from tinysd.models.unet import UNet2DConditionModel
  from tinysd_ops.attention import install as split_attention
  res = {}
  with Context(DEV="NULL"):
    with placeholder_init(): unet = UNet2DConditionModel(cfg)
    weights = sum(p.nbytes() for p in get_parameters(unet))
    x, t = Tensor.empty(batch, cfg.in_channels, latent, latent).realize(), Tensor([500.]).realize()
    c = Tensor.empty(batch, 77, cfg.cross_attention_dim).realize()
    res["skips"] = _skip_shapes(unet, x, t, c)
    for mode in modes:
      install(unet, mode)
      def step(x, t, c):
        out = unet(x, t, c)
        return (split_attention(out, q_chunk=1024, k_chunk=1024) if attention else out).realize()
      jit, peaks = TinyJit(step), []
      for i in range(3):
        with PeakMemory() as mem: jit(x, t, c)
        peaks.append(mem.peak - (weights if i == 0 and mode == modes[0] else 0))
      res[mode] = peaks
      log(f"  {mode or 'none':5s} split attention {'on ' if attention else 'off'}: first call {peaks[0]/2**20:7.1f} MiB, "
          f"JIT capture (arena) {peaks[1]/2**20:7.1f} MiB, replay {peaks[2]/2**20:.1f} MiB")
    install(unet, None)
  return res

def _rel(a, b) -> tuple[float, float]:
  import numpy as np
  d = a.astype(np.float64) - b
  return float(np.sqrt((d * d).mean() / (b.astype(np.float64) ** 2).mean())), float(np.abs(d).max() / np.abs(b).max())

def _unet_error(cfg, latent:int, batch:int, modes:tuple, seed:int=0, log=print) -> dict:
  import numpy as np
  from tinysd.models.unet import UNet2DConditionModel
  rng = np.random.default_rng(seed)
  with placeholder_init(): unet = UNet2DConditionModel(cfg)
  random_init(unet, rng)
  x = Tensor(rng.standard_normal((batch, cfg.in_channels, latent, latent), dtype=np.float32)).realize()
  c = Tensor(rng.standard_normal((batch, 77, cfg.cross_attention_dim), dtype=np.float32)).realize()
  t = Tensor([500.]).realize()
  outs = {}
  for mode in (None, *modes):   # one realize: the down path is the same graph in every mode (only stored copies differ), computed once
    install(unet, mode)
    outs[mode] = unet(x, t, c)
  install(unet, None)
  Tensor.realize(*outs.values())
  return {m: _rel(outs[m].numpy(), outs[None].numpy()) for m in modes}

def _trajectory_error(cfg, latent:int, steps:int, sampler:str, modes:tuple, seed:int=0) -> dict:
  import numpy as np
  from tinygrad import TinyJit
  from tinysd.configs import SchedulerConfig
  from tinysd.models.unet import UNet2DConditionModel
  from tinysd.samplers import sample
  rng = np.random.default_rng(seed)
  with placeholder_init(): unet = UNet2DConditionModel(cfg)
  random_init(unet, rng)
  ctx = Tensor(rng.standard_normal((1, 77, cfg.cross_attention_dim), dtype=np.float32)).realize()
  x0 = rng.standard_normal((1, cfg.in_channels, latent, latent), dtype=np.float32)
  finals, firsts = {}, {}
  for mode in (None, *modes):
    install(unet, mode)
    jit = TinyJit(lambda x, t: unet(x, t, ctx).realize())
    model = lambda x, t: jit(Tensor(x).realize(), Tensor([float(t)]).realize()).numpy()
    lat = list(sample(sampler, model, x0, steps, SchedulerConfig()))
    firsts[mode], finals[mode] = lat[0], lat[-1]
  install(unet, None)
  return {m: (_rel(firsts[m], firsts[None]), _rel(finals[m], finals[None])) for m in modes}

if __name__ == "__main__":
  import argparse, time
  from tinysd.configs import SD15, UNetConfig
  ap = argparse.ArgumentParser(description="memory saved and error added by shortcut compression (random weights)")
  ap.add_argument("--size", type=int, default=512, help="image size for the memory figures (latents size/8)")
  ap.add_argument("--attention-off", action="store_true", help="memory also without split attention (tinygrad's full SDPA)")
  a = ap.parse_args()
  modes, MiB = (None, *MODES), 2**20
  st = time.perf_counter()
  print(f"SD1.5 UNet, {a.size}px ({a.size//8}x{a.size//8} latents), batch 2, fp32, NULL device (planned bytes, no kernels run), "
        "activations only (weights excluded):")
  mem = {att: _memory(SD15.unet, a.size // 8, 2, modes, att) for att in ((True, False) if a.attention_off else (True,))}
  skips = mem[True]["skips"]
  stored = {m: sum(compressed_nbytes(s, d, m) for s, d in skips) for m in modes}
  print(f"  {len(skips)} skip tensors, stored: " + ", ".join(f"{m or 'none'} {stored[m]/MiB:.1f} MiB" for m in modes))
  for att, r in mem.items():
    print(f"  split attention {'on ' if att else 'off'}: step peak " +
          ", ".join(f"{m or 'none'} {r[m][1]/MiB:.1f} MiB" + (f" ({(r[None][1]-r[m][1])/MiB:.1f} saved)" if m else "") for m in modes))
  print(f"  [{time.perf_counter()-st:.0f} s]")

  print("UNet output error vs uncompressed skips: SD1.5 config, RANDOM weights, 16x16 latents, batch 2, fp32, CPU (rms rel / max rel):")
  for m, (rms, mx) in _unet_error(SD15.unet, 16, 2, MODES).items(): print(f"  {m}: {rms:.2e} / {mx:.2e}")
  print(f"  [{time.perf_counter()-st:.0f} s]")

  small = UNetConfig(block_out_channels=(64, 128, 128), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=8,
                     cross_attention_dim=64)
  print("Trajectory: euler, 10 steps, small UNet (SD1.5 layout, 64/128/128 channels, 1 layer per block), RANDOM weights, 16x16 latents,"
        " fixed random context, fp32, CPU; latents vs uncompressed after step 1 and at the end (rms rel / max rel):")
  for m, ((r1, m1), (r, mx)) in _trajectory_error(small, 16, 10, "euler", MODES).items():
    print(f"  {m}: step 1 {r1:.2e} / {m1:.2e}, final {r:.2e} / {mx:.2e}")
  print(f"  [{time.perf_counter()-st:.0f} s]")
