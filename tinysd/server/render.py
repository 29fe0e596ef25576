# One generation request on a loaded pipeline: the Spec a request becomes (plain data: it crosses into worker processes), the images
# and infotexts it gives, and the pre/post-processing A1111 does around inpainting (masked-area fill, mask blur, overlay).
from __future__ import annotations
from dataclasses import dataclass, field
import numpy as np
from PIL import Image, ImageFilter
from tinysd.server import a1111

PREVIEW_EVERY = 2   # steps between live previews (each a latent-resolution PNG; A1111's default is every 10)

@dataclass
class Spec:
  mode: str                      # txt2img | img2img | inpaint
  model: str                     # checkpoint path the engine must have loaded
  model_name: str                # for the infotext
  prompt: str
  negative_prompt: str
  steps: int
  cfg: float
  sampler: str                   # tinysd's name
  seed: int                      # image i of the whole request (batch_size * n_iter) uses seed + i, as A1111's all_seeds
  width: int
  height: int
  batch_size: int = 1
  n_iter: int = 1
  strength: float | None = None
  init: np.ndarray | None = None       # (H,W,3) float32 in [0,1] at width x height (inpaint: already filled where masked)
  mask: np.ndarray | None = None       # (H,W) float32, 1 = repaint, binary
  overlay: np.ndarray | None = None    # (H,W) soft mask (blurred): the result is pasted over the init image with it
  clip_skip: int = 1                   # A1111's CLIP_stop_at_last_layers
  extra: dict = field(default_factory=dict)   # infotext fields after Size/Model

@dataclass
class Result:
  images: list[str]              # base64 PNGs carrying their `parameters` chunk
  infotexts: list[str]
  seeds: list[int]
  interrupted: bool = False
  steps_done: int = 0
  inpainting_conditioning: bool = False   # a 9-channel inpainting UNet took the mask (A1111's is_using_inpainting_conditioning)

def generate(pipe, spec:Spec, report) -> Result:
  """report(step, total, preview_b64|None) after every model call; False = stop (A1111's interrupt: the latents so far are decoded)."""
  sdxl = pipe.config.unet.addition_embed_type == "text_time"
  pipe.clip_skip = spec.clip_skip   # the pipeline checks it against the text encoder's depth
  images, seeds, stopped, done = [], [], [False], [0]
  for it in range(spec.n_iter):
    seed = spec.seed + it * spec.batch_size
    def cb(k, calls, x, it=it):
      done[0] = it * calls + k
      preview = a1111.cheap_preview(x, sdxl) if k % PREVIEW_EVERY == 0 or k == calls else None
      if report(done[0], spec.n_iter * calls, preview) is False:
        stopped[0] = True
        return False
    kw = dict(negative_prompt=spec.negative_prompt, steps=spec.steps, guidance_scale=spec.cfg, sampler=spec.sampler, seed=seed,
              batch_size=spec.batch_size, callback=cb)
    if spec.mode == "txt2img": out = pipe.txt2img(spec.prompt, width=spec.width, height=spec.height, **kw)
    elif spec.mode == "img2img": out = pipe.img2img(spec.prompt, spec.init, strength=spec.strength, **kw)
    else: out = pipe.inpaint(spec.prompt, spec.init, spec.mask, strength=spec.strength, **kw)
    if spec.overlay is not None: out = [paste(spec.init, im, spec.overlay) for im in out]
    images += out
    seeds += [seed + i for i in range(len(out))]
    if stopped[0]: break
  texts = [a1111.infotext(spec.prompt, spec.negative_prompt, spec.steps, spec.sampler, spec.cfg, s, spec.width, spec.height, spec.model_name,
                          **spec.extra) for s in seeds]
  return Result([a1111.png_b64(im, t) for im, t in zip(images, texts)], texts, seeds, stopped[0], done[0],
                spec.mode == "inpaint" and pipe.config.unet.in_channels == 9)

def paste(init:np.ndarray, image:Image.Image, soft:np.ndarray) -> Image.Image:
  """A1111's overlay: the init image over the result outside the (blurred) mask, so unmasked pixels come back exactly."""
  gen = np.asarray(image, dtype=np.float32) / 255
  out = init * (1 - soft[..., None]) + gen * soft[..., None]
  return Image.fromarray((np.clip(out, 0, 1) * 255).round().astype(np.uint8))

def blur_mask(mask:np.ndarray, radius:int) -> np.ndarray:
  if radius <= 0: return mask
  im = Image.fromarray((mask * 255).astype(np.uint8), mode="L").filter(ImageFilter.GaussianBlur(radius))
  return np.asarray(im, dtype=np.float32) / 255

def fill_masked(init:np.ndarray, mask:np.ndarray) -> np.ndarray:
  """A1111's inpainting_fill=0 ("fill"): the area to repaint takes the blurred colours around it, so the model does not start from the
  object being removed. Normalised Gaussian blurs of the known pixels, widest first, finer ones over them."""
  known = (mask < 0.5).astype(np.float32)
  if not known.any(): return init
  out = init.copy()
  for r in (64, 16, 4):
    num = _blur(init * known[..., None], r)
    den = _blur(np.repeat(known[..., None], 3, axis=-1), r)
    ok = den > 1e-3
    out = np.where(ok & (known[..., None] == 0), num / np.maximum(den, 1e-3), out)
  return out.astype(np.float32)

def _blur(a:np.ndarray, r:int) -> np.ndarray:
  # ~Gaussian of σ≈r: three box sums of half-width r along each axis (zero outside; fill_masked normalises by the blurred weights)
  for axis in (0, 1):
    for _ in range(3):
      x = np.moveaxis(a, axis, 0)
      c, i = np.concatenate([np.zeros_like(x[:1]), np.cumsum(x, 0)]), np.arange(x.shape[0])
      a = np.moveaxis(c[np.minimum(i + r + 1, len(i))] - c[np.maximum(i - r, 0)], 0, axis)
  return a
