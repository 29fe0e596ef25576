# Loading init images and masks for img2img / inpainting. Sizes: both sides rounded DOWN to a multiple of 8 by resizing (Lanczos),
# the rule diffusers' VaeImageProcessor applies, so a 513x771 image becomes 512x768 with no cropping.
from __future__ import annotations
from pathlib import Path
import numpy as np
from PIL import Image, UnidentifiedImageError

class ImageError(ValueError): pass

def open_image(image) -> Image.Image:
  if isinstance(image, Image.Image): return image
  p = Path(image)
  if not p.exists(): raise ImageError(f"image '{image}' does not exist")
  try:
    im = Image.open(p)
    im.load()
  except (UnidentifiedImageError, OSError) as e:
    raise ImageError(f"'{image}' is not a readable image ({type(e).__name__})") from None
  return im

def snap8(width:int, height:int) -> tuple[int, int]:
  w, h = width - width % 8, height - height % 8
  if w < 8 or h < 8: raise ImageError(f"image is {width}x{height}; it must be at least 8x8")
  return w, h

def load_image(image, size:tuple[int, int]|None=None) -> np.ndarray:
  """RGB float32 in [0,1], (H,W,3). RGBA is composited on white, greyscale/palette converted; resized to `size` or snapped to multiples of 8."""
  im = open_image(image)
  if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
    im = im.convert("RGBA")
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
    im = Image.alpha_composite(bg, im)
  im = im.convert("RGB")
  size = size or snap8(*im.size)
  if im.size != size: im = im.resize(size, Image.LANCZOS)
  return np.asarray(im, dtype=np.float32) / 255.0

def green_mask(image) -> np.ndarray|None:
  """The Swift port's convention: pure green (0,255,0) pixels painted on the init image mark the area to repaint."""
  im = open_image(image)
  if im.mode not in ("RGB", "RGBA"): return None
  a = np.asarray(im.convert("RGB"))
  m = (a[..., 0] == 0) & (a[..., 1] == 255) & (a[..., 2] == 0)
  return m.astype(np.float32) if m.any() else None

def alpha_mask(image) -> np.ndarray|None:
  """Transparent pixels of an RGBA init image mark the area to repaint (1 - alpha)."""
  im = open_image(image)
  if im.mode not in ("RGBA", "LA") and not (im.mode == "P" and "transparency" in im.info): return None
  a = np.asarray(im.convert("RGBA"), dtype=np.float32)[..., 3] / 255.0
  return (1.0 - a) if (a < 1).any() else None

def load_mask(mask, size:tuple[int, int], binarize:bool=True) -> np.ndarray:
  """(H,W) float32, 1 = repaint. White areas of a mask image repaint; a mask of another size with the same aspect ratio is resized; greyscale
  is thresholded at 0.5
  unless binarize=False (soft mask)."""
  if isinstance(mask, np.ndarray):
    m = mask.astype(np.float32)
    if m.ndim != 2: raise ImageError(f"mask array must be 2-D (H,W), got shape {m.shape}")
    im = Image.fromarray((np.clip(m, 0, 1) * 255).astype(np.uint8), mode="L")
  else:
    im = open_image(mask)
    im = im.convert("L") if im.mode not in ("RGBA", "LA") else im.convert("RGBA").split()[-1] if _all_white_rgb(im) else im.convert("L")
  (mw, mh), (w, h) = im.size, size
  if abs(mw * h - mh * w) > 0.01 * mw * h:   # a mask of another shape would be stretched over the wrong pixels
    raise ImageError(f"mask is {mw}x{mh} but the image is {w}x{h}; a mask must match the image's size or aspect ratio")
  if im.size != size: im = im.resize(size, Image.BILINEAR)
  m = np.asarray(im, dtype=np.float32) / 255.0
  return (m >= 0.5).astype(np.float32) if binarize else m

def _all_white_rgb(im:Image.Image) -> bool:
  # a mask saved as white strokes on a transparent layer carries its shape in alpha only
  return bool((np.asarray(im.convert("RGB")) == 255).all())

def inpaint_mask(image, mask, size:tuple[int, int], binarize:bool=True) -> np.ndarray:
  if mask is not None: m = load_mask(mask, size, binarize)
  else:
    m = alpha_mask(image)
    if m is None: m = green_mask(image)
    if m is None: raise ImageError("no mask: pass --mask, or give the image transparent or pure green (0,255,0) pixels where to repaint")
    m = load_mask(m, size, binarize)
  if not m.any(): raise ImageError("mask is empty: nothing to repaint (white = repaint)")
  return m
