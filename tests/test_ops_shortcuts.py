# Shortcut-activation compression: compress() bit-exact against a numpy quantise/dequantise, the UNet hook (only the stored skip copies
# change, by a bounded amount), and the memory it saves under TinyJit's planner.
from types import SimpleNamespace
import numpy as np, pytest
from tinygrad import Tensor, TinyJit, dtypes
from tinysd.configs import UNetConfig
from tinysd.models.unet import UNet2DConditionModel
from tinysd_ops.shortcuts import compress, install, compressed_nbytes
from tinysd_ops.tg import random_init, PeakMemory

# attention-free levels (the mid block still has one, at 8x8): the memory peak is where the skips are, and few kernels to compile
TINY = UNetConfig(block_out_channels=(32, 64), down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, layers_per_block=1,
                  attention_head_dim=8, norm_num_groups=16, cross_attention_dim=24)

def np_int8(x:np.ndarray) -> np.ndarray:
  # the reference: per-(b, c) absmax over the spatial dims, scale = absmax/127 (0 for all-zero channels, divided by as 1), round half to
  # even, clip to ±127, back to float as q * scale. tinygrad divides as a * (1/b): so does this.
  x = x.astype(np.float32)
  scale = np.abs(x).max(axis=tuple(range(2, x.ndim)), keepdims=True) * np.float32(1 / 127)
  q = np.clip(np.round(x * (np.float32(1) / np.where(scale == 0, np.float32(1), scale))), -127, 127).astype(np.int8)
  return q.astype(np.float32) * scale

def sample_tensor(*shape) -> np.ndarray:
  x = (np.random.randn(*shape) * np.exp(np.random.randn(shape[0], shape[1], *[1] * (len(shape) - 2)))).astype(np.float32)   # per-channel ranges
  x[0, 1] = 0                   # an all-zero channel: scale 0, no NaN
  x[0, 3].flat[:4] = np.array([0.5, 1.5, -2.5, 3.5], np.float32) * (np.abs(x[0, 3]).max() / 127)   # near-ties of the rounding
  return x

def test_int8_exact():
  x = sample_tensor(2, 6, 5, 7)
  out = compress(Tensor(x), "int8")
  assert out.shape == x.shape and out.dtype == dtypes.float32
  o, r = out.numpy(), np_int8(x)
  assert not np.isnan(o).any() and (o[0, 1] == 0).all()
  np.testing.assert_array_equal(o, r)
  # and it is a real quantisation: 255 levels per channel, error up to half a step
  step = np.abs(x).max(axis=(2, 3), keepdims=True) / 127
  assert (np.abs(o - x) <= step / 2 * (1 + 1e-6)).all() and (o != x)[x != 0].mean() > 0.9

def test_int8_fp16_input():
  x = sample_tensor(2, 4, 3, 3).astype(np.float16)
  out = compress(Tensor(x), "int8")
  assert out.dtype == dtypes.float16
  np.testing.assert_array_equal(out.numpy(), np_int8(x.astype(np.float32)).astype(np.float16))

def test_fp16_exact():
  x = sample_tensor(2, 4, 6, 6)
  x[1, 0, 0, :3] = [1e6, -1e6, 70000.0]   # beyond fp16: saturates to ±65504
  o = compress(Tensor(x), "fp16").numpy()
  r = np.clip(x, -65504, 65504).astype(np.float16).astype(np.float32)
  np.testing.assert_array_equal(o, r)
  assert (o != x)[x != 0].mean() > 0.9 and np.isfinite(o).all()
  for dt in (dtypes.float16, dtypes.bfloat16):
    h = Tensor.ones(2, 3, 4, 4, dtype=dt)
    assert compress(h, "fp16") is h   # already 2 bytes: nothing to do

def test_bad_mode():
  with pytest.raises(ValueError, match="unknown shortcut compression 'int4'"): compress(Tensor.ones(1, 1, 2, 2), "int4")
  with pytest.raises(ValueError, match="unknown shortcut compression 'bf16'"): install(SimpleNamespace(keep_skip=None), "bf16")
  with pytest.raises(ValueError, match=r"needs a \(B, C, spatial...\) tensor"): compress(Tensor.ones(2, 3), "int8")   # no spatial dims to take the absmax over

# *** the UNet hook: one tiny model and one input shape for every test below, so its kernels compile once

_model:dict = {}
def tiny_unet() -> UNet2DConditionModel:
  if not _model:
    _model["m"] = m = UNet2DConditionModel(TINY)
    random_init(m, np.random.default_rng(1))
  return _model["m"]

def inputs() -> tuple[Tensor, Tensor, Tensor]:
  return (Tensor(np.random.randn(2, 4, 32, 32).astype(np.float32)).realize(), Tensor([321.]).realize(),
          Tensor(np.random.randn(2, 77, 24).astype(np.float32)).realize())

def forward(unet, mode, x, t, c, hook=None) -> np.ndarray:
  install(unet, mode)
  if hook is not None: unet.keep_skip = hook
  try: return unet(x, t, c).numpy()
  finally: install(unet, None)

def rel_rms(a, b) -> float: return float(np.sqrt(((a.astype(np.float64) - b) ** 2).mean() / (b.astype(np.float64) ** 2).mean()))

def test_unet_hook_error():
  # Error each stored element carries, rms relative to its channel: fp16 rounding ~2^-11/sqrt(3) ~ 3e-4; int8 (uniform over a step of
  # absmax/127) (absmax/rms)/(127*sqrt(12)) ~ 3.3/440 ~ 8e-3 for Gaussian-like channels. The up path's gain on this random net is ~1
  # (measured output errors: fp16 2.2e-4, int8 7.4e-3); bounds are 4x the per-element figures. Both must be > 0: the hook acts.
  unet, (x, t, c) = tiny_unet(), inputs()
  ref = forward(unet, None, x, t, c)
  assert unet.keep_skip is None and np.abs(ref).max() > 0.1
  np.testing.assert_array_equal(forward(unet, None, x, t, c), ref)
  e16, e8 = rel_rms(forward(unet, "fp16", x, t, c), ref), rel_rms(forward(unet, "int8", x, t, c), ref)
  print(f"rel rms error: fp16 {e16:.2e}, int8 {e8:.2e}")
  assert 0 < e16 < 4 * 2**-11 / 3**0.5
  assert e16 < e8 < 4 * 3.3 / (127 * 12**0.5)

def test_down_path_untouched():
  # zeroing every stored skip changes the output, but the mid block (end of the down path) sees exactly the same input
  unet, (x, t, c), seen = tiny_unet(), inputs(), []
  mid = unet.mid_block
  unet.mid_block = lambda h, *a: (seen.append(h), mid(h, *a))[1]
  try:
    outs = []
    for mode, hook in ((None, None), (None, lambda s: s.zeros_like()), ("int8", None)):
      install(unet, mode)
      if hook is not None: unet.keep_skip = hook
      out = unet(x, t, c)
      Tensor.realize(out, seen[-1])
      outs.append(out.numpy())
  finally: unet.mid_block = mid; install(unet, None)
  ref, zero, q = outs
  assert np.abs(zero - ref).max() > 0.1 and np.abs(q - ref).max() > 0
  np.testing.assert_array_equal(seen[1].numpy(), seen[0].numpy())
  np.testing.assert_array_equal(seen[2].numpy(), seen[0].numpy())

# *** memory: the planner must hold the small buffer, not the full-precision skip

def test_memory_saved(monkeypatch):
  # The step under TinyJit as in the pipeline; the capture (2nd call) plans its arena and allocates it. Here the peak is where all the
  # skips are alive (the mid block, the start of the up path), so the saving is about the whole skip difference: demand 60% of it. If the
  # fp32 skips stayed alive next to their copies, the compressed runs would need more memory, not less.
  # On tinygrad's own kernels: the CPU fast path's GroupNorm/SiLU kernels materialise the normalised activations, which moves this tiny
  # UNet's peak off the point where all skips are alive (measured there: 55% of the ideal saving instead of >= 60%).
  from tinysd_ops import cpu
  monkeypatch.setenv("TINYSD_KERNELS", "generic")
  cpu.uninstall()
  try: _memory_saved()
  finally:
    monkeypatch.undo()
    cpu.install()

def _memory_saved():
  unet, (x, t, c), shapes = tiny_unet(), inputs(), []
  unet.keep_skip = lambda s: (shapes.append(s.shape), s)[1]
  unet(x, t, c)
  peak = {}
  for mode in (None, "fp16", "int8"):
    install(unet, mode)
    jit = TinyJit(lambda x, t, c: unet(x, t, c).realize())
    jit(x, t, c)
    with PeakMemory() as m: jit(x, t, c)
    peak[mode] = m.peak
  install(unet, None)
  full = sum(compressed_nbytes(s, dtypes.float32, None) for s in shapes)
  saved = {m: full - sum(compressed_nbytes(s, dtypes.float32, m) for s in shapes) for m in ("fp16", "int8")}
  print(f"peak {peak}, skips {full}, ideal saving {saved}")
  for m in ("fp16", "int8"): assert peak[None] - peak[m] >= 0.6 * saved[m], (m, peak, saved)
