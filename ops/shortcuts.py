# Shortcut-activation compression: the skip tensors a UNet keeps from its down path until its up path are stored compressed in between
# (fp16, or int8 with one scale per (batch, channel)) and expanded again where the up path reads them (activation compression as in
# ActNN, Chen et al. 2021, here at inference and for the few long-lived tensors only). The model exposes one hook,
# UNet2DConditionModel.keep_skip, through which only the stored copies pass: the down path goes on with the full-precision tensors.
# Why it saves memory: the compressed form is a .contiguous() inside a FUNCTION (tg.region), so the scheduler materialises that small
# buffer and plans it into the arena by lifetime; the full-precision skip's last readers are then its down-path consumers and the
# compressing kernel, and the expansion (q * scale, or the fp16 -> fp32 cast) fuses into the up-path kernel that concatenates the skip.
# (A top-level .contiguous() gives the same TinyJit arena, but the eager first step holds those buffers for the whole schedule: SD1.5 512px
# batch 2, fp16 copies then cost 4.8 MiB more than no compression at all instead of saving 10.)
# How much it saves is the compressed share of the skips alive at the step's memory peak (SD1.5 at 512px with split attention: two of
# them, see `python examples/shortcuts_report.py`).
from __future__ import annotations
import functools
from tinygrad import Tensor, dtypes
from . import tg

MODES = ("fp16", "int8")
F16_MAX = 65504.0

def _fp16(x:Tensor) -> Tensor:
  # saturating: an fp32 activation beyond the fp16 range becomes ±65504, not inf (that would poison every later sum)
  return x.clip(-F16_MAX, F16_MAX).cast(dtypes.float16).contiguous().cast(x.dtype)

def _int8(x:Tensor) -> Tensor:
  # symmetric, q in [-127, 127], scale = absmax / 127 over the spatial dims per (batch, channel); all-zero channels get scale 0 and divide
  # by 1 instead. Written as tinygrad computes a / b (a * (1/b)), so a numpy reimplementation matches it bit for bit.
  xf = x.float()
  scale = (xf.abs().max(axis=tuple(range(2, x.ndim)), keepdim=True) * (1 / 127)).contiguous()
  q = (xf * (scale == 0).where(1.0, scale).reciprocal()).round().clip(-127, 127).cast(dtypes.int8).contiguous()
  return (q.float() * scale).cast(x.dtype)

def _check(mode:str|None):
  if mode is not None and mode not in MODES: raise ValueError(f"unknown shortcut compression {mode!r}; choose from: {', '.join(MODES)}")

def compress(x:Tensor, mode:str) -> Tensor:
  """x as it reads back after being stored compressed: a lazy tensor of x's shape and dtype whose materialised buffer is the compressed
  form (fp16; or int8 plus fp32 (B, C, 1, 1) scales over the spatial dims of a (B, C, ...) tensor). "fp16" returns an fp16 or bf16 x
  as it is (nothing to save)."""
  _check(mode)
  if mode == "fp16" and x.dtype.itemsize <= 2: return x
  if mode == "int8" and x.ndim < 3: raise ValueError(f"int8 shortcut compression needs a (B, C, spatial...) tensor, got shape {x.shape}")
  return tg.region(_fp16 if mode == "fp16" else _int8, x)

def install(unet, mode:str|None) -> None:
  """Stores unet's skip tensors compressed ("fp16" | "int8") from now on; None stores them as they are. A captured TinyJit keeps the
  graph it captured: key the JIT cache by the mode."""
  _check(mode)
  unet.keep_skip = None if mode is None else functools.partial(compress, mode=mode)

def compressed_nbytes(shape:tuple[int, ...], dtype, mode:str|None) -> int:
  """Bytes a skip of this shape/dtype occupies while stored."""
  n = 1
  for s in shape: n *= s
  if mode is None or (mode == "fp16" and dtype.itemsize <= 2): return n * dtype.itemsize
  return n * 2 if mode == "fp16" else n + shape[0] * shape[1] * 4
