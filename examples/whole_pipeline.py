#!/usr/bin/env python3
# python examples/whole_pipeline.py [--size 512] [--steps 20] [--compute-dtype bfloat16]: a whole txt2img as a user runs it, tinysd vs
# diffusers, one machine, one run. tinysd: the real `tinysd txt2img` command on a random-weight SD1.5 checkpoint, run twice — the first
# process compiles its kernels (tinygrad's disk cache then holds them: "cold"), the second finds them cached ("warm") — timed as whole
# processes (load, text encoder, every UNet step, VAE decode, PNG). diffusers: StableDiffusionPipeline over the same-sized random-weight
# models (built in memory: the pipeline call is timed, not a load, which favours diffusers), PNDM = tinysd's default sampler (plms), CFG 7.5.
from __future__ import annotations
import argparse, os, subprocess, sys, tempfile, time

def run_tinysd(weights:str, size:int, steps:int, out:str, extra:list[str]) -> float:
  cmd = [sys.executable, "-m", "tinysd.cli", "txt2img", "--model", weights, "--prompt", "a lighthouse at dusk", "--steps", str(steps),
         "--width", str(size), "--height", str(size), "--seed", "0", "--output", out, *extra]
  t0 = time.perf_counter()
  subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
  return time.perf_counter() - t0

def run_diffusers(size:int, steps:int) -> float:
  import torch
  from diffusers import StableDiffusionPipeline, PNDMScheduler
  sys.path.insert(0, os.path.dirname(__file__))
  import peers
  from tests.fixtures import _hf_tokenizer
  unet, vae, te = peers.torch_models("sd15")
  sched = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                        skip_prk_steps=True, set_alpha_to_one=False)
  pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=_hf_tokenizer(49407), unet=unet, scheduler=sched, safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  with torch.no_grad():
    t0 = time.perf_counter()
    pipe("a lighthouse at dusk", num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
         generator=torch.Generator().manual_seed(0)).images[0].save(os.devnull, format="PNG")
    return time.perf_counter() - t0

if __name__ == "__main__":
  p = argparse.ArgumentParser()
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--compute-dtype", default=None, choices=["float32", "bfloat16"])
  p.add_argument("--no-diffusers", action="store_true")
  a = p.parse_args()
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from tinysd.bench import cpu_line, weights_file
  import torch
  print(cpu_line(), f"| torch threads {torch.get_num_threads()}", flush=True)
  with tempfile.TemporaryDirectory() as d:
    weights, _ = weights_file("sd15", "float32", None, os.path.join(d, "sd15.safetensors"), log=lambda *x: None)
    extra = ["--compute-dtype", a.compute_dtype] if a.compute_dtype else []
    cold = run_tinysd(weights, a.size, a.steps, os.path.join(d, "a.png"), extra)
    warm = run_tinysd(weights, a.size, a.steps, os.path.join(d, "b.png"), extra)
  print(f"tinysd txt2img {a.size}x{a.size}, {a.steps} steps{', ' + a.compute_dtype if a.compute_dtype else ''}: "
        f"cold process {cold:.1f} s, warm process {warm:.1f} s", flush=True)
  if not a.no_diffusers:
    t = run_diffusers(a.size, a.steps)
    print(f"diffusers StableDiffusionPipeline call (models in memory, fp32): {t:.1f} s -> tinysd warm / diffusers = {warm / t:.2f}x")
