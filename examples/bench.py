#!/usr/bin/env python3
# python examples/bench.py --model sd15 --size 256 --steps 2 [--dtype float16] [--lowmem] [--quant int8] ... [--vs diffusers]
# tinysd's own figures come from tinysd.bench; `--vs diffusers` times diffusers (torch on CUDA when there is a GPU, else CPU)
# on the same shapes and dtype in the same run.
import argparse, statistics, sys, time
from tinysd import bench

def diffusers_reference(model:str, size:int, steps:int, batch:int, guidance:float, dtype:str="float32") -> dict:
  # on the GPU when tinysd ran on one (torch sees CUDA), else torch's CPU; the same dtype as tinysd
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
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
  unet, vae, te = (m.to(dev, dt) for m in (unet, vae, te))
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  def clock(fn):
    sync(); t0 = time.perf_counter(); fn(); sync()
    return time.perf_counter() - t0
  b = 2 * batch if guidance != 1 else batch
  lat, r = size // 8, {"threads": torch.get_num_threads(), "device": torch.cuda.get_device_name() if dev == "cuda" else "CPU", "dtype": dtype}
  with torch.no_grad():
    ids = torch.randint(0, 49407, (b, 77), device=dev)
    r["text_encoder_s"] = clock(lambda: te(ids))
    ctx = te(ids).last_hidden_state
    x = torch.randn(b, 4, lat, lat, device=dev, dtype=dt)
    times = [clock(lambda: unet(x, 999 - i, ctx)) for i in range(steps + 1)]
    r["first_step_s"], r["step_s"] = times[0], statistics.median(times[1:])
    z = torch.randn(batch, 4, lat, lat, device=dev, dtype=dt)
    if dev == "cuda": vae.decode(z)   # warm-up: cuDNN picks its algorithms on the first call
    r["vae_decode_s"] = clock(lambda: vae.decode(z))
  return r

def main() -> int:
  p = bench.parser()
  p.add_argument("--vs", choices=["diffusers"], default=None, help="also time diffusers on PyTorch CPU in this run and print the ratio")
  a = p.parse_args()
  r = bench.run(**bench.kwargs(a))
  print(bench.report(r))
  if a.vs == "diffusers":
    d = diffusers_reference(a.model, a.size, a.steps, a.batch, a.guidance, a.dtype)
    print(f"diffusers (torch {d['device']}, {d['threads']} CPU threads, {d['dtype']}) on the same shapes, same run:")
    for k, label in (("text_encoder_s", "text encoder"), ("step_s", "steady UNet step"), ("vae_decode_s", "VAE decode")):
      mine = r[k][-1] if isinstance(r[k], list) else r[k]   # the last (warmest) decode
      print(f"  {label:20s}  {d[k]:8.2f} s   tinysd/diffusers = {mine/d[k]:.2f}x")
  return 0

if __name__ == "__main__": sys.exit(main())
