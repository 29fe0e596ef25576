#!/usr/bin/env python3
# python examples/bench.py --random-weights --model sd15 --size 256 --steps 2 [--vs diffusers]
# tinysd's own figures come from tinysd.bench; `--vs diffusers` times diffusers (torch CPU) on the same shapes in the same run.
import argparse, statistics, sys, time
from tinysd import bench

def diffusers_reference(model:str, size:int, steps:int, batch:int, guidance:float) -> dict:
  import torch
  from diffusers import UNet2DConditionModel, AutoencoderKL
  from transformers import CLIPTextConfig, CLIPTextModel
  from dataclasses import asdict
  cfg = bench.MODELS[model]
  if model != "sd15": raise SystemExit("--vs diffusers is wired for sd15 only")
  torch.manual_seed(0)
  unet = UNet2DConditionModel(**{k: v for k, v in asdict(cfg.unet).items()}).eval()
  vae = AutoencoderKL(**{k: v for k, v in asdict(cfg.vae).items() if k not in ("sample_size",)},
                      down_block_types=["DownEncoderBlock2D"]*4, up_block_types=["UpDecoderBlock2D"]*4).eval()
  te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in asdict(cfg.text_encoders[0]).items() if k != "projection_dim"})).eval()
  b = 2 * batch if guidance != 1 else batch
  lat, r = size // 8, {"threads": torch.get_num_threads()}
  with torch.no_grad():
    ids = torch.randint(0, 49407, (b, 77))
    t0 = time.perf_counter(); ctx = te(ids).last_hidden_state; r["text_encoder_s"] = time.perf_counter() - t0
    x = torch.randn(b, 4, lat, lat)
    times = []
    for i in range(steps + 1):
      t0 = time.perf_counter(); unet(x, 999 - i, ctx); times.append(time.perf_counter() - t0)
    r["first_step_s"], r["step_s"] = times[0], statistics.median(times[1:])
    t0 = time.perf_counter(); vae.decode(torch.randn(batch, 4, lat, lat)); r["vae_decode_s"] = time.perf_counter() - t0
  return r

def main() -> int:
  p = bench.parser()
  p.add_argument("--vs", choices=["diffusers"], default=None, help="also time diffusers on PyTorch CPU in this run and print the ratio")
  a = p.parse_args()
  r = bench.run(a.model, a.size, a.steps, a.dtype, a.guidance, a.batch, a.attention_chunk)
  print(bench.report(r))
  if a.vs == "diffusers":
    d = diffusers_reference(a.model, a.size, a.steps, a.batch, a.guidance)
    print(f"diffusers (torch CPU, {d['threads']} threads, fp32) on the same shapes, same run:")
    for k, label in (("text_encoder_s", "text encoder"), ("step_s", "steady UNet step"), ("vae_decode_s", "VAE decode")):
      print(f"  {label:20s}  {d[k]:8.2f} s   tinysd/diffusers = {r[k]/d[k]:.2f}x")
  return 0

if __name__ == "__main__": sys.exit(main())
