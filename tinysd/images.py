# Loading init images and masks for img2img / inpainting. Sizes: both sides rounded DOWN to a multiple of 8 by resizing (Lanczos),
# the rule diffusers' VaeImageProcessor applies, so a 513x771 image becomes 512x768 with no cropping. Images come as users have them:
# EXIF orientation applied (as diffusers' load_image does), the first frame of animations (with a warning), 16/32-bit integer greyscale
# scaled from its own bit depth and float images from their own range (PIL's convert("RGB") clips those to white or black), palette,
# LA, CMYK and the other PIL modes converted to RGB. 8-bit RGB/RGBA go through exactly diffusers' steps (convert, Lanczos resize, /255).
from __future__ import annotations
import contextlib, os, re, warnings
from pathlib import Path
import numpy as np
from PIL import Image, ImageOps

MAX_PIXELS = 4096 * 4096   # the largest image tinysd generates (pipeline.MAX_SIDE squared); bigger files are refused before decoding
_DEEP = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")   # modes whose values are not 0..255
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")

class ImageError(ValueError): pass
class ImageWarning(UserWarning): pass

def _reason(e:Exception) -> str:
  msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
  return f"{type(e).__name__}: {msg}" if msg else type(e).__name__

def _too_large(name, w:int, h:int):
  if w * h > MAX_PIXELS:
    raise ImageError(f"{name} is {w}x{h} ({w*h/1e6:.1f} MP); tinysd reads images up to {MAX_PIXELS/1e6:.1f} MP (4096x4096): downscale it first")

def _bit_depth(im:Image.Image) -> tuple[int, bool]|None:
  # (bits, signed) of an integer image as its file says (TIFF BitsPerSample / SampleFormat); read before a transpose drops the tags
  tags = getattr(im, "tag_v2", None)
  if tags is None or 258 not in tags: return None
  bits, fmt = tags[258], tags.get(339, 1)
  bits, fmt = (bits[0] if isinstance(bits, tuple) else bits), (fmt[0] if isinstance(fmt, tuple) else fmt)
  return (int(bits), fmt == 2) if isinstance(bits, int) and 1 <= bits <= 32 else None

def _unit_float(im:Image.Image, depth:tuple[int, bool]|None, name) -> Image.Image:
  """A deep greyscale image as mode "F" in [0,1]: integers divided by their bit depth's maximum (16 bits unless the file says otherwise
  or a value needs more), floats kept when inside [0,1] and otherwise mapped from their own min..max."""
  a = np.asarray(im)
  if im.mode == "F":
    if not np.isfinite(a).all(): raise ImageError(f"{name} has NaN or infinite pixels")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 1.0)
    a = a if lo >= 0 and hi <= 1 else (a - lo) / (hi - lo) if hi > lo else np.clip(a, 0, 1)
  else:
    bits, signed = depth or ((16, False) if im.mode.startswith("I;16") or a.size == 0 or a.max() <= 65535 else (32, a.min() < 0))
    a = np.clip(a.astype(np.float64) / (2 ** (bits - signed) - 1), 0, 1)
  return Image.fromarray(np.ascontiguousarray(a, dtype=np.float32), mode="F")

def open_image(image, what:str="image") -> Image.Image:
  """A decoded PIL image: EXIF orientation applied, first frame only, deep greyscale as "F" in [0,1], refused above MAX_PIXELS before it
  is decoded. Unreadable files raise ImageError naming the path."""
  if not isinstance(image, (Image.Image, str, os.PathLike)):
    raise ImageError(f"{what} must be a path or a PIL image, got {type(image).__name__}")
  name = what if isinstance(image, Image.Image) else f"{what} '{image}'"
  frames = 1
  try:
    # PIL's own warnings (damaged EXIF or TIFF tags, > 89 MP) are multi-line noise: it decodes what it can, or raises, and we say which
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", module=r"PIL\.")
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      if isinstance(image, Image.Image): src = image
      else:
        p = Path(image)
        if not p.exists(): raise ImageError(f"{name} does not exist")
        src = Image.open(p)
      with src if src is not image else contextlib.nullcontext():   # a caller's PIL image stays open
        _too_large(name, *src.size)
        if (frames := getattr(src, "n_frames", 1)) > 1: src.seek(0)
        src.load()
        depth = _bit_depth(src)
        im = ImageOps.exif_transpose(src)   # a copy: the file can close
        if im.mode in _DEEP: im = _unit_float(im, depth, name)
    if frames > 1: warnings.warn(f"{name} has {frames} frames; using the first", ImageWarning, stacklevel=3)
    return im
  except ImageError: raise
  except Image.DecompressionBombError as e:
    n = re.search(r"\((\d+) pixels\)", str(e))
    raise ImageError(f"{name} is too large ({int(n[1])/1e6:.0f} MP); tinysd reads images up to {MAX_PIXELS/1e6:.1f} MP (4096x4096): "
                     f"downscale it first" if n else f"{name} is too large ({_reason(e)})") from None
  except Exception as e:   # PIL's decoders raise OSError, SyntaxError, ValueError, struct.error, EOFError, ... on damaged files
    raise ImageError(f"{name} is not a readable image ({_reason(e)})") from None

def snap8(width:int, height:int) -> tuple[int, int]:
  w, h = width - width % 8, height - height % 8
  if w < 8 or h < 8: raise ImageError(f"image is {width}x{height}; it must be at least 8x8")
  return w, h

def _has_alpha(im:Image.Image) -> bool: return im.mode in _ALPHA or (im.mode != "F" and "transparency" in im.info)

def _convert(im:Image.Image, mode:str, name) -> Image.Image:
  try: return im.convert(mode)
  except (ValueError, OSError) as e: raise ImageError(f"{name}: cannot convert a {im.mode} image to {mode} ({_reason(e)})") from None

def load_image(image, size:tuple[int, int]|None=None) -> np.ndarray:
  """RGB float32 in [0,1], (H,W,3). Transparency is composited on white, every other mode converted to RGB (deep greyscale keeps its
  precision); resized to `size` or snapped to multiples of 8."""
  im = open_image(image)
  name = "image" if isinstance(image, Image.Image) else f"image '{image}'"
  if im.mode == "F":   # resized in float, so 16-bit tones survive; Lanczos overshoot clipped
    size = size or snap8(*im.size)
    if im.size != size: im = im.resize(size, Image.LANCZOS)
    return np.repeat(np.clip(np.asarray(im, dtype=np.float32), 0, 1)[..., None], 3, axis=-1)
  if _has_alpha(im):
    im = _convert(im, "RGBA", name)
    im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
  im = _convert(im, "RGB", name)
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
  """Transparent pixels of an init image with alpha (or a transparent palette/colour key) mark the area to repaint (1 - alpha)."""
  im = open_image(image)
  if not _has_alpha(im): return None
  a = np.asarray(_convert(im, "RGBA", "image"), dtype=np.float32)[..., 3] / 255.0
  return (1.0 - a) if (a < 1).any() else None

def load_mask(mask, size:tuple[int, int], binarize:bool=True) -> np.ndarray:
  """(H,W) float32, 1 = repaint. White areas of a mask image repaint; a mask of another size with the same aspect ratio is resized; greyscale
  is thresholded at 0.5 unless binarize=False (soft mask). 16-bit and float masks are read at their own depth/range, like images."""
  if isinstance(mask, np.ndarray):
    m = mask.astype(np.float32)
    if m.ndim != 2: raise ImageError(f"mask array must be 2-D (H,W), got shape {m.shape}")
    if not np.isfinite(m).all(): raise ImageError("mask array has NaN or infinite values")
    im = Image.fromarray((np.clip(m, 0, 1) * 255).astype(np.uint8), mode="L")
  else:
    im = open_image(mask, "mask")
    name = "mask" if isinstance(mask, Image.Image) else f"mask '{mask}'"
    if im.mode == "F": pass
    elif _has_alpha(im): im = _convert(im, "RGBA", name).split()[-1] if _all_white_rgb(im) else _convert(im, "L", name)
    else: im = _convert(im, "L", name)
  (mw, mh), (w, h) = im.size, size
  if abs(mw * h - mh * w) > 0.01 * mw * h:   # a mask of another shape would be stretched over the wrong pixels
    raise ImageError(f"mask is {mw}x{mh} but the image is {w}x{h}; a mask must match the image's size or aspect ratio")
  if im.size != size: im = im.resize(size, Image.BILINEAR)
  m = np.clip(np.asarray(im, dtype=np.float32), 0, 1) if im.mode == "F" else np.asarray(im, dtype=np.float32) / 255.0
  return (m >= 0.5).astype(np.float32) if binarize else m

def _all_white_rgb(im:Image.Image) -> bool:
  # a mask saved as white strokes on a transparent layer carries its shape in alpha only
  return bool((np.asarray(_convert(im, "RGB", "mask")) == 255).all())

def inpaint_mask(image, mask, size:tuple[int, int], binarize:bool=True) -> np.ndarray:
  if mask is not None: m = load_mask(mask, size, binarize)
  else:
    m = None if isinstance(image, np.ndarray) else alpha_mask(image)   # an array image has neither alpha nor a painted green
    if m is None and not isinstance(image, np.ndarray): m = green_mask(image)
    if m is None: raise ImageError("no mask: pass --mask, or give the image transparent or pure green (0,255,0) pixels where to repaint")
    m = load_mask(m, size, binarize)
  if not m.any(): raise ImageError("mask is empty: nothing to repaint (white = repaint)")
  return m
