# Tiled VAE decode/encode: the image is processed in overlapping tiles, each realised on its own (its activations are freed before the
# next tile starts), and the seams are blended with linear ramps over the overlap. Without it the VAE decoder sets the memory peak of a
# whole txt2img run. Tiles go to the host as numpy and are blended there: a tile's output is small next to its activations.
# Same algorithm as diffusers' AutoencoderKL.tiled_decode/_tiled_encode (tile starts every `stride`, raster order, each tile blended in place
# with its already-blended upper and left neighbours, then cropped to its top-left `limit` rows/cols), so vae.enable_tiling() is the oracle.
# Inherited from diffusers: tiles start at every multiple of the stride below the size, so the last tile of a row/column is always partial
# and, when it starts within `overlap` of the end, lies wholly inside its neighbour (redundant work, and the image edge then comes mostly
# from a tile with little context); the ramp weight k/e never reaches 1, leaving a 1/e step at the inner end of each blend band; and each
# tile has its own GroupNorm statistics and attention context, so tiled != untiled everywhere, not only at the seams.
# Measured (python examples/tiling_report.py [--1024]; NULL device, SD1.5 VAE fp32, batch 1, weights and input excluded, peak of GlobalCounters.mem_used):
#   512x512 decode:   untiled 741.4 MB | tile 32 overlap 8: 185.4 MB | defaults (64, 16) = untiled path at 512: 741.4 MB
#   1024x1024 decode: untiled 2965.4 MB | defaults (64, 16): 741.4 MB
#   CPU, random weights, 256x256, tile 16 overlap 4: untiled 185.4 MB vs tiled 46.4 MB; error vs untiled (in [0,1] image units) max abs
#   0.56, mean abs 0.049 (output std 0.28; the same tiles without blending: 1.09, 0.074), 90% of 8-bit pixels differ. Random weights
#   say little about a trained VAE's seams; 16-latent tiles are also far smaller than the 64 used by default.
from __future__ import annotations
from typing import Callable
import numpy as np
from tinygrad import Tensor
# ops/ sits below the models and never imports tinysd: `vae` is a tinysd.models.vae.AutoencoderKL taken duck-typed (cfg, encoder, decoder,
# posterior), and its posterior type comes as vae.posterior

def vae_scale(vae) -> int: return 2 ** (len(vae.cfg.block_out_channels) - 1)   # 8 for every real SD VAE

def _blend(a:np.ndarray, b:np.ndarray, extent:int, axis:int):
  # diffusers' blend_v (axis 2) / blend_h (axis 3), in place on b: b[k] = a[-e+k] * (1 - k/e) + b[k] * k/e for k < e
  if (e := min(a.shape[axis], b.shape[axis], extent)) <= 0: return
  w = (np.arange(e) / e).astype(np.float32).reshape([e if d == axis else 1 for d in range(b.ndim)])
  lo, hi = [slice(None)] * b.ndim, [slice(None)] * b.ndim
  lo[axis], hi[axis] = slice(0, e), slice(-e, None)
  b[tuple(lo)] = a[tuple(hi)] * (1 - w) + b[tuple(lo)] * w

def _tiled(run:Callable[[Tensor], np.ndarray], x:Tensor, tile:int, stride:int, extent:int, limit:int) -> np.ndarray:
  # run(tile) -> its output as numpy (realised alone). Only the previous row of outputs is kept, for the vertical blend.
  out_rows, above = [], None
  for i in range(0, x.shape[2], stride):
    row: list[np.ndarray] = []
    for j in range(0, x.shape[3], stride):
      t = run(x[:, :, i:i+tile, j:j+tile])
      if above is not None: _blend(above[len(row)], t, extent, 2)
      if row: _blend(row[-1], t, extent, 3)
      row.append(t)
    out_rows.append(np.concatenate([t[:, :, :limit, :limit] for t in row], axis=3))
    above = row
  return np.concatenate(out_rows, axis=2)

def _check(tile:int, overlap:int, s:int=1):
  if tile < 1 or not 0 <= overlap < tile: raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got {tile=} {overlap=}")
  if tile % s or overlap % s: raise ValueError(f"tile and overlap must be multiples of the VAE scale {s}, got {tile=} {overlap=}")

# Mapping onto diffusers: tile_latent_min_size = tile, tile_sample_min_size = s*tile, tile_overlap_factor = overlap/tile (decode, latent px;
# encode: tile_sample_min_size = tile, tile_latent_min_size = tile//s, same factor, image px), s = 2**(levels-1). Then diffusers' stride
# int(tile*(1-f)) = tile-overlap, blend_extent int(s*tile*f) = s*overlap, row_limit = s*(tile-overlap); here these are computed in integers,
# diffusers' in floats (equal whenever overlap/tile is exact in binary, e.g. 1/4).

def decode_tiled(vae, z:Tensor, tile:int=64, overlap:int=16, rewrite:Callable[[Tensor], Tensor]|None=None,
                 decode:Callable[[Tensor], np.ndarray]|None=None) -> Tensor:
  """vae.decode(z) in overlapping (tile x tile)-latent tiles, blended over `overlap` latents (s*overlap image px). z: unscaled latents
  (B,C,h,w). Returns float32 (B,3,s*h,s*w). If h, w <= tile it returns vae.decode(z) itself (lazy, VAE dtype). rewrite: applied to each
  tile's lazy output before it is realised (e.g. the pipeline's split-attention install)."""
  _check(tile, overlap)
  rewrite = rewrite or (lambda t: t)
  if z.shape[2] <= tile and z.shape[3] <= tile: return rewrite(vae.decode(z))
  s = vae_scale(vae)
  run = decode or (lambda zt: rewrite(vae.decode(zt).float()).numpy())   # decode: the caller's own per-tile decode (e.g. under a JIT)
  return Tensor(_tiled(run, z.realize(), tile, tile - overlap, s * overlap, s * (tile - overlap)), device=z.device)

def _moments(vae, x:Tensor) -> Tensor:
  # vae.encode's posterior parameters before DiagonalGaussian clamps logvar: diffusers blends these raw moments
  h = vae.encoder(x.cast(vae.encoder.conv_in.weight.dtype))
  return h if vae.quant_conv is None else vae.quant_conv(h)

def encode_tiled(vae, x:Tensor, tile:int=512, overlap:int=128, rewrite:Callable[[Tensor], Tensor]|None=None):
  """vae.encode(x) in overlapping (tile x tile)-pixel tiles, the posterior moments blended over overlap/s latents. x: images in [-1, 1],
  (B,3,H,W); tile and overlap must be multiples of the VAE scale s. If H, W <= tile it returns vae.encode(x) itself. The moments keep the
  VAE's dtype, so .mean / .sample(noise) behave as after vae.encode."""
  s = vae_scale(vae)
  _check(tile, overlap, s)
  if x.shape[2] <= tile and x.shape[3] <= tile:
    return vae.encode(x) if rewrite is None else vae.posterior(rewrite(_moments(vae, x)))
  rewrite, dtype = rewrite or (lambda t: t), vae.encoder.conv_in.weight.dtype
  run = lambda xt: rewrite(_moments(vae, xt).float()).numpy()
  m = _tiled(run, x.realize(), tile, tile - overlap, overlap // s, (tile - overlap) // s)
  return vae.posterior(Tensor(m, device=x.device).cast(dtype))
