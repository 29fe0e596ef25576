#!/usr/bin/env python3
# python examples/compare_backends.py DEV1 DEV2 — the same tiny random UNet forward on two tinygrad devices/renderers, max difference printed.
# e.g. `python examples/compare_backends.py CPU CPU:X86` on any machine, or `CPU CUDA` / `CPU METAL` where there is a GPU.
import sys
import numpy as np
from tinygrad import Tensor, Context
from tinygrad.nn.state import get_state_dict
from tinysd.configs import UNetConfig
from tinysd_ops.tg import placeholder_init
from tinysd.models.unet import UNet2DConditionModel

CFG = UNetConfig(block_out_channels=(32, 64), cross_attention_dim=32, sample_size=16,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))

def unet() -> UNet2DConditionModel:
  with placeholder_init(): return UNet2DConditionModel(CFG)

def run(dev:str, weights:dict, x, t, ctx) -> np.ndarray:
  with Context(DEV=dev):
    m = unet()
    for k, v in get_state_dict(m).items(): v.replace(Tensor(weights[k]))
    return m(Tensor(x), Tensor(t), Tensor(ctx)).numpy()

def main(a:str, b:str) -> int:
  rng = np.random.default_rng(0)
  weights = {k: (rng.standard_normal(v.shape) * (np.prod(v.shape[1:]) ** -0.5 if len(v.shape) > 1 else 0.02)).astype(np.float32)
             for k, v in get_state_dict(unet()).items()}
  x, t, ctx = rng.standard_normal((2, 4, 16, 16)).astype(np.float32), np.array([500.0, 500.0], np.float32), rng.standard_normal((2, 77, 32)).astype(np.float32)
  ya, yb = run(a, weights, x, t, ctx), run(b, weights, x, t, ctx)
  print(f"{a} vs {b}: max abs diff {np.abs(ya - yb).max():.3e} (output max |y| {np.abs(ya).max():.3f})")
  return 0

if __name__ == "__main__": sys.exit(main(*(sys.argv[1:3] if len(sys.argv) >= 3 else ("CPU", "CPU:X86"))))
