# Benchmark on random weights at real sizes (speed and memory do not depend on weight values). Prints figures; asserts nothing.
from __future__ import annotations
import argparse, resource, statistics, sys, time
import numpy as np
from tinygrad import Tensor, GlobalCounters, Device
from tinysd import configs

MODELS = {"sd15": configs.SD15, "sd2": configs.SD2, "sdxl": configs.SDXL}

class PeakMemory:
  """Peak of tinygrad's allocated bytes: tinygrad keeps only the current figure, so watch every allocation."""
  def __init__(self):
    from tinygrad.device import Buffer
    self.Buffer, self.orig, self.peak = Buffer, Buffer.allocate, GlobalCounters.mem_used
    def allocate(buf, *a, **k):
      r = self.orig(buf, *a, **k)
      self.peak = max(self.peak, GlobalCounters.mem_used)
      return r
    Buffer.allocate = allocate
  def close(self): self.Buffer.allocate = self.orig

def rss_gib() -> float:
  """Peak RSS since the last reset_rss_peak() (Linux VmHWM), else since process start."""
  try:
    with open("/proc/self/status") as f: return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 2**20
  except (OSError, StopIteration): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux, bytes on macOS

def reset_rss_peak():
  # building random weights is a benchmark artefact (numpy copies); a real run reads them from a checkpoint. Linux only: "5" resets VmHWM
  try:
    with open("/proc/self/clear_refs", "w") as f: f.write("5")
  except OSError: pass

def _sync(): Device[Device.DEFAULT].synchronize()

def timed(fn):
  GlobalCounters.reset()
  t0 = time.perf_counter(); out = fn(); _sync()
  return out, time.perf_counter() - t0, GlobalCounters.global_ops, GlobalCounters.kernel_count

def run(model="sd15", size=512, steps=2, dtype="float32", guidance=7.5, batch=1, attention_chunk=1024, log=print) -> dict:
  from tinysd.pipeline import random_pipeline
  cfg = MODELS[model]
  mem = PeakMemory()
  r: dict = {"model": model, "size": size, "dtype": dtype, "batch": batch, "device": Device.DEFAULT}
  t0 = time.perf_counter()
  pipe = random_pipeline(cfg, dtype)
  pipe.attention_chunk = attention_chunk or None
  r["attention_chunk"] = attention_chunk
  r["init_s"] = time.perf_counter() - t0
  r["weights_gib"] = GlobalCounters.mem_used / 2**30
  mem.peak = GlobalCounters.mem_used
  reset_rss_peak()
  log(f"random weights built in {r['init_s']:.1f} s")
  (ctx, pooled), r["text_encoder_s"], _, _ = timed(lambda: pipe._encode([""] * batch + ["a photograph of an astronaut riding a horse"] * batch))
  log(f"text encoder: {r['text_encoder_s']:.2f} s")
  lat = size // 8
  time_ids = None
  if pooled is not None:
    time_ids = Tensor([[size, size, 0, 0, size, size]] * pooled.shape[0]).cast(pipe.dtype).realize()
  model_fn = pipe.denoiser(ctx, guidance, text_embeds=pooled, time_ids=time_ids)
  x = np.random.default_rng(0).standard_normal((batch, cfg.unet.out_channels, lat, lat), dtype=np.float32)
  times, ops, kernels = [], [], []
  for i in range(max(steps, 1) + 2):   # call 1 runs eagerly and compiles, call 2 captures the JIT, later calls replay it
    _, t, o, k = timed(lambda: model_fn(x, 999.0 - i))
    times.append(t); ops.append(o); kernels.append(k)
    log(f"unet step {i+1}: {t:.2f} s ({k} kernels)")
  r["first_step_s"] = times[0]
  steady = times[2:]
  r["step_s"] = statistics.median(steady)
  r["unet_kernels"] = kernels[0]
  r["step_gflops"] = ops[0] / 1e9 / r["step_s"] if ops[0] else float("nan")
  z = x[:batch] if guidance != 1 else x
  _, r["vae_decode_s"], vae_ops, r["vae_kernels"] = timed(lambda: pipe.decode(z))
  r["vae_gflops"] = vae_ops / 1e9 / r["vae_decode_s"] if vae_ops else float("nan")
  r["peak_tinygrad_gib"] = mem.peak / 2**30
  r["peak_rss_gib"] = rss_gib()
  mem.close()
  return r

def report(r:dict) -> str:
  return "\n".join([
    f"tinysd {r['model']} {r['size']}x{r['size']} {r['dtype']} batch {r['batch']} on {r['device']}, "
    f"attention {'split ' + str(r['attention_chunk']) if r['attention_chunk'] else 'plain'}",
    f"  text encoder          {r['text_encoder_s']:8.2f} s",
    f"  first UNet step       {r['first_step_s']:8.2f} s  (incl. scheduling + compile, {r['unet_kernels']} kernels)",
    f"  steady UNet step      {r['step_s']:8.2f} s  (CFG batch {2*r['batch']}, {r['step_gflops']:.1f} GFLOP/s)",
    f"  VAE decode            {r['vae_decode_s']:8.2f} s  ({r['vae_gflops']:.1f} GFLOP/s, {r['vae_kernels']} kernels)",
    f"  weights (resident)    {r['weights_gib']:8.2f} GiB",
    f"  peak tinygrad memory  {r['peak_tinygrad_gib']:8.2f} GiB  (weights included, from the end of weight building on)",
    f"  peak process RSS      {r['peak_rss_gib']:8.2f} GiB  (same window)"])

def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="tinysd bench", description="SD benchmark on random weights at real sizes")
  p.add_argument("--random-weights", action="store_true", help="required for now: build the model with random weights (no checkpoint needed)")
  p.add_argument("--model", default="sd15", choices=list(MODELS))
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--steps", type=int, default=2, help="timed steady-state UNet steps (after the compile and JIT-capture calls)")
  p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--guidance", type=float, default=7.5)
  p.add_argument("--attention-chunk", type=int, default=1024, help="split attention tile (tokens); 0 = plain attention")
  return p

def main(argv=None) -> int:
  a = parser().parse_args(argv)
  if a.size % 8: print("tinysd: error: --size must be a multiple of 8", file=sys.stderr); return 2
  print(report(run(a.model, a.size, a.steps, a.dtype, a.guidance, a.batch, a.attention_chunk)))
  return 0

if __name__ == "__main__": sys.exit(main())
