# Weight quantisation (ops/quant.py). Oracles are numpy: the dequantised weight rebuilt from the stored tensors, and the float layer.
# Bounds follow from each method (rel = ||y_q - y|| / ||y||; for x with iid entries E||x dW^T||^2 / E||x W^T||^2 = ||dW||^2 / ||W||^2, so the
# output error is the relative Frobenius error of the weight, up to sampling noise of a few %):
# - int8: absmax rounding to a step s_o = max_r |w_or| / 127 is uniform error of variance s_o^2 / 12, so the predicted relative error is
#   sqrt(sum_o R s_o^2 / 12 / ||W||^2): ~1e-2 for Laplace-like weights (row max ~ 6.5 scale over a few hundred inputs). Asserted <= 1.3x
#   the prediction, and the prediction < 1.5e-2. Without the fp16 outlier columns the step of every row grows with the outlier (25x here).
# - palN: k-means on 2^N levels is asymptotically the Panter-Dite bound D = (int p^(1/3))^3 / (12 * 4^N) (estimated from the sample);
#   Lloyd from the p^(1/3) init lands at 0.8-0.97x of it on these Laplace samples (5 seeds), asserted <= 1.1x. Each bit halves the
#   error, so pal8 < pal6 < pal4 with ratios ~4 (asserted > 2.5).
# - fused kernel vs numpy on the same dequantised weight: fp32 summation order only, 1e-5 relative.
import copy
import numpy as np, pytest
from tinygrad import Tensor, dtypes, GlobalCounters, nn
from tinysd_ops.tg import PeakMemory
from tinygrad.nn.state import get_state_dict, safe_save
from tinysd_ops import quant
from tinysd_ops.quant import (MODES, QuantWeight, QuantLinear, QuantConv2d, quantize_linear, quantize_conv, quantize_model, palettize, pack,
                       kmeans_1d, save, load, state_dict)

def realistic(*shape, outlier_cols=()):
  # Laplace weights with a log-normal scale per output channel (trained layers look like this); planted outlier input columns 25x larger
  w = np.random.laplace(size=shape) * 0.02 * np.exp(0.3 * np.random.randn(shape[0], *(1,) * (len(shape) - 1)))
  w = w.reshape(shape[0], -1)
  w[:, list(outlier_cols)] *= 25
  return w.reshape(shape).astype(np.float32)

def rel(a, b) -> float: return float(np.linalg.norm(a - b) / np.linalg.norm(b))

def make(kind:str, w:np.ndarray):
  layer = nn.Linear(w.shape[1], w.shape[0]) if kind == "linear" else nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], padding=1)
  layer.weight, layer.bias = Tensor(w).realize(), Tensor(np.random.randn(w.shape[0]).astype(np.float32) * 0.1).realize()
  return layer

SHAPES = {"linear": ((256, 320), (2, 24, 320)), "conv": ((48, 32, 3, 3), (2, 32, 10, 10))}   # (weight, x): R = 320 / 288
def quantize(layer, mode, **kw): return quantize_linear(layer, mode, **kw) if isinstance(layer, nn.Linear) else quantize_conv(layer, mode, **kw)

def dequant(qw:QuantWeight) -> np.ndarray:
  O, R = qw.shape[0], int(np.prod(qw.shape[1:]))
  if qw.mode == "int8":
    w = qw.q.numpy().reshape(O, R).astype(np.float32) * qw.scale.numpy()[:, None]
    if qw.cols: w[:, list(qw.cols)] = qw.outliers.numpy()
  else:
    idx, lut = quant._unpack(qw.idx, MODES[qw.mode], O).numpy(), qw.lut.numpy()
    w = lut[np.arange(O)[:, None] // (O // lut.shape[0]), idx]
  return w.reshape(qw.shape)

def _with(layer, w):   # a shallow copy of the float layer with another weight (numpy array or Tensor)
  l = copy.copy(layer)
  l.weight = w if isinstance(w, Tensor) else Tensor(w)
  return l

def matmul_part(y:np.ndarray, layer) -> np.ndarray:   # output minus the (unquantised) bias: the part the error bounds are about
  return y - layer.bias.numpy().reshape(-1, *(1,) * (2 if isinstance(layer, nn.Conv2d) else 0))

def panter_dite(w:np.ndarray, bits:int) -> float:
  # relative rms error of the asymptotically optimal 2^bits-level quantiser; int p^(1/3) from equal-count bins (mass 1/B, width d) of 64
  # samples each (fewer per bin biases it low: -17% on 5120 Gaussian samples with 1-sample bins, within 0.3% of the exact value at 64)
  bins = max(16, w.size // 64)
  s = np.sort(w.ravel().astype(np.float64))
  d = np.diff(s[np.linspace(0, len(s) - 1, bins + 1).round().astype(np.int64)])
  return float(np.sqrt(np.sum(bins ** (-1 / 3) * d ** (2 / 3)) ** 3 / 12 / 4 ** bits / np.mean(s ** 2)))

@pytest.mark.parametrize("bits", [4, 6, 8])
def test_pack_unpack(bits):
  for O in (13, 30, 64):   # odd and not multiple of 4: padding in pack, shrink in unpack
    idx = np.random.randint(0, 2 ** bits, (O, 5)).astype(np.uint8)
    p = pack(idx, bits)
    assert p.shape == ({8: O, 4: (O + 1) // 2, 6: (O + -O % 4) * 3 // 4}[bits], 5)
    np.testing.assert_array_equal(quant._unpack(Tensor(p), bits, O).numpy(), idx)

def test_kmeans_1d():
  v = np.random.randn(50000)
  c = kmeans_1d(v, 16)
  np.testing.assert_array_equal(c, kmeans_1d(v, 16))   # deterministic
  assert np.all(np.diff(c) >= 0)
  # Lloyd-Max optimum for 16 levels on N(0, 1) has MSE 0.009497 (Max 1960); sample noise aside we should be on it
  mse = np.mean((c[np.abs(v[:, None] - c).argmin(1)] - v) ** 2)
  assert mse < 0.009497 * 1.03
  # fewer distinct values than levels (pruned or already-quantised weights): reconstructed exactly
  w = np.random.choice(np.array([-0.5, 0.0, 0.25], np.float32), (8, 30))
  idx, lut = palettize(w, 4)
  np.testing.assert_array_equal(lut[0][idx], w)

@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_int8(kind):
  wshape, xshape = SHAPES[kind]
  planted = (5, 77, 200)
  w = realistic(*wshape, outlier_cols=planted)
  layer, x = make(kind, w), Tensor(np.random.randn(*xshape).astype(np.float32)).realize()
  ref = layer(x).numpy()
  q = quantize(layer, "int8")
  assert set(planted) <= set(q.weight.cols) and len(q.weight.cols) <= w[0].size // quant.OUTLIER_FRAC
  assert q.weight.q.dtype == dtypes.int8 and q.weight.q.shape == w.shape and q.weight.outliers.shape == (w.shape[0], len(q.weight.cols))
  y = q(x).numpy()
  np.testing.assert_allclose(y, _with(layer, dequant(q.weight))(x).numpy(), rtol=1e-5, atol=1e-5 * np.abs(ref).max())
  w2, s = w.reshape(w.shape[0], -1), q.weight.scale.numpy()
  pred = np.sqrt(np.sum((w2.shape[1] - len(q.weight.cols)) * s.astype(np.float64) ** 2 / 12) / np.sum(w2.astype(np.float64) ** 2))
  err = rel(matmul_part(y, layer), matmul_part(ref, layer))
  assert pred < 1.5e-2 and err < 1.3 * pred, (err, pred)
  qn = copy.copy(q)
  qn.weight = QuantWeight.from_float(w, "int8", dtypes.float32, outliers=False)
  yn = qn(x).numpy()
  assert rel(matmul_part(yn, layer), matmul_part(ref, layer)) > 4 * err   # the planted columns set the scale of every row without the split

@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_palettize(kind):
  wshape, xshape = SHAPES[kind]
  w = realistic(*wshape)
  layer, x = make(kind, w), Tensor(np.random.randn(*xshape).astype(np.float32)).realize()
  ref = layer(x).numpy()
  errs = {}
  for mode in ("pal8", "pal6", "pal4"):
    bits = MODES[mode]
    q = quantize(layer, mode)
    assert q.weight.lut.shape == (1, 2 ** bits) and q.weight.idx.dtype == dtypes.uint8
    assert q.weight.idx.numel() == w.shape[0] * np.prod(w.shape[1:]) * bits // 8   # O multiple of 4 here: exact packing
    wd = dequant(q.weight)
    y = q(x).numpy()
    np.testing.assert_allclose(y, _with(layer, wd)(x).numpy(), rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    werr = rel(wd, w)
    assert werr < 1.1 * panter_dite(w, bits), (mode, werr, panter_dite(w, bits))
    errs[mode] = rel(matmul_part(y, layer), matmul_part(ref, layer))
    assert 0.75 * werr < errs[mode] < 1.3 * werr, (mode, errs[mode], werr)
  assert 2.5 * errs["pal8"] < errs["pal6"] and 2.5 * errs["pal6"] < errs["pal4"], errs

@pytest.mark.parametrize("kw", [dict(stride=2, dilation=2, padding=(1, 2)), dict(groups=2, padding=1), dict(padding="same", bias=False),
                                dict(kernel_size=1)])
def test_conv_variants(kw):
  # the palettized conv path unfolds the input itself (the gather must sit after the broadcast): same geometry as nn.Conv2d's conv2d
  kw = {"kernel_size": 3} | kw
  layer = nn.Conv2d(16, 32, **kw)
  layer.weight = Tensor(realistic(*layer.weight.shape, outlier_cols=(4,))).realize()
  x = Tensor(np.random.randn(2, 16, 9, 11).astype(np.float32)).realize()
  for mode in ("int8", "pal4"):
    q = quantize_conv(layer, mode)
    assert mode == "pal4" or bool(q.weight.cols) == (layer.groups == 1)
    np.testing.assert_allclose(q(x).numpy(), _with(layer, dequant(q.weight))(x).numpy(), rtol=1e-5, atol=1e-5)

def test_palettize_groups():
  # output channels in 4 groups of 16 whose scales differ by 4x each: one LUT per group quantises every channel at its own scale, one LUT
  # for the tensor spends its 16 levels on the largest group (small channels land on ~1-2 levels: mean per-channel error ~0.5)
  w = realistic(64, 320) * np.repeat(4.0 ** -np.arange(4), 16)[:, None].astype(np.float32)
  idx, lut = palettize(w, 4, group_size=16)
  assert lut.shape == (4, 16) and lut.dtype == np.float16 and idx.max() < 16
  layer = make("linear", w)
  x = Tensor(np.random.randn(8, 320).astype(np.float32)).realize()
  q1, q16 = quantize_linear(layer, "pal4"), quantize_linear(layer, "pal4", group_size=16)
  np.testing.assert_allclose(q16(x).numpy(), _with(layer, dequant(q16.weight))(x).numpy(), rtol=1e-5, atol=1e-5)
  d1, d16 = dequant(q1.weight), dequant(q16.weight)
  for g in range(0, 64, 16): assert rel(d16[g:g+16], w[g:g+16]) < 1.1 * panter_dite(w[g:g+16], 4)   # each group at its own optimum
  per_channel = lambda d: np.mean(np.linalg.norm(d - w, axis=1) / np.linalg.norm(w, axis=1))
  assert per_channel(d16) < 0.5 * per_channel(d1)

def _peak_during(fn):
  # peak of tinygrad's allocated bytes while fn runs, above what was allocated before (tinygrad-notes section e)
  with PeakMemory() as m: out = fn()
  return out, m.peak

@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("mode", list(MODES))
def test_fused_dequant(kind, mode):
  # x and y are far smaller than the weight: one kernel, and nothing allocated during the call but y itself, i.e. no dequantised weight
  w = realistic(1280, 320, outlier_cols=(3, 9)) if kind == "linear" else realistic(128, 128, 3, 3, outlier_cols=(3, 9))
  layer = make(kind, w)
  x = Tensor(np.random.randn(*((1, 16, 320) if kind == "linear" else (1, 128, 4, 4))).astype(np.float32)).realize()
  q = quantize(layer, mode)
  GlobalCounters.reset()
  y, peak = _peak_during(lambda: q(x).realize())
  assert GlobalCounters.kernel_count == 1 and peak <= y.nbytes() < w.size, (GlobalCounters.kernel_count, peak)
  # controls, showing the check sees a materialised weight: the LUT gather as Tensor indexing, lut[idx], is a reduce before the matmul's
  # broadcast and tinygrad gives it its own kernel and a weight-size buffer; for int8, an explicit dequant pass (.contiguous())
  wd = (q.weight.q.cast(dtypes.float32) * q.weight.scale.reshape(-1, *(1,) * (w.ndim - 1))).contiguous() if mode == "int8" else \
       q.weight.lut[0][quant._unpack(q.weight.idx, MODES[mode], w.shape[0])].reshape(w.shape)
  GlobalCounters.reset()
  _, peak_naive = _peak_during(lambda: _with(layer, wd)(x).realize())
  assert GlobalCounters.kernel_count >= 2 and peak_naive >= w.size * 4

def test_half_layer():
  # fp16 model: LUT / scale held in fp16, output dtype as nn.Linear's, int8 sums accumulated in fp32
  w = realistic(256, 320)
  layer = make("linear", w)
  layer.weight, layer.bias = layer.weight.half().realize(), layer.bias.half().realize()
  x = Tensor(np.random.randn(4, 320).astype(np.float16)).realize()
  ref = layer(x).float().numpy()
  for mode in ("int8", "pal8"):
    q = quantize_linear(layer, mode)
    y = q(x)
    assert y.dtype == dtypes.half and (q.weight.scale if mode == "int8" else q.weight.lut).dtype == dtypes.half
    assert rel(y.float().numpy(), ref) < 2e-2

class Block:
  def __init__(self):
    self.proj_in = nn.Linear(64, 96)
    self.convs = [nn.Conv2d(16, 32, 3, padding=1), [nn.Linear(96, 64), lambda x: x], nn.GroupNorm(4, 32)]
    self.tiny = nn.Linear(8, 8)   # 64 elements: stays float
  def __call__(self, h:Tensor, img:Tensor) -> tuple[Tensor, Tensor]:
    h = self.convs[1][1](self.convs[1][0](self.proj_in(h).gelu())) + self.tiny(h[..., :8]).sum(-1, keepdim=True)
    return h, self.convs[2](self.convs[0](img))

class Model:
  def __init__(self):
    self.conv_in = nn.Conv2d(16, 64, 3, padding=1)   # 9216 elements but skipped by name
    self.blocks = [Block(), Block()]
    self.heads = {"a": nn.Linear(64, 128)}
  def __call__(self, h:Tensor, img:Tensor) -> Tensor:
    c = self.conv_in(img).mean((2, 3))
    for b in self.blocks: h, img = b(h + c.unsqueeze(1), img[:, :16])
    return self.heads["a"](h).flatten(1).cat(img.flatten(1), dim=1)

def _init(model):
  for k, v in get_state_dict(model).items():
    v.replace(Tensor(realistic(*v.shape) if v.ndim > 1 else np.random.randn(*v.shape).astype(np.float32) * 0.1).realize())
  return model

def _inputs(): return Tensor(np.random.randn(2, 5, 64).astype(np.float32)).realize(), Tensor(np.random.randn(2, 16, 6, 6).astype(np.float32)).realize()

def test_quantize_model():
  model = _init(Model())
  h, img = _inputs()
  ref = model(h, img).numpy()
  rep = quantize_model(model, "int8")
  expect = [f"blocks.{i}.{n}" for i in range(2) for n in ("proj_in", "convs.0", "convs.1.0")] + ["heads.a"]
  assert sorted(rep["layers"]) == sorted(expect) and rep["count"] == 7
  assert {"conv_in", "blocks.0.tiny", "blocks.1.tiny"} <= set(rep["skipped"])
  assert isinstance(model.blocks[1].convs[1][0], QuantLinear) and isinstance(model.blocks[0].convs[0], QuantConv2d)
  assert isinstance(model.heads["a"], QuantLinear) and type(model.conv_in) is nn.Conv2d and type(model.blocks[0].tiny) is nn.Linear
  assert "blocks.0.convs.1.0.weight.q" in get_state_dict(model) and "blocks.0.convs.1.0.weight" not in get_state_dict(model)
  # int8 weights: 1 byte/element of 4, + fp32 scale per channel + bias (unchanged) + outlier columns
  assert rep["bytes_before"] / 4 < rep["bytes_after"] < rep["bytes_before"] / 2.5
  assert rel(model(h, img).numpy(), ref) < 2e-2
  with pytest.raises(ValueError, match="unknown mode 'int3'"): quantize_model(Model(), "int3")

def test_save_load_roundtrip(tmp_path):
  # all modes in one file: each part of the model quantised in another mode (the remaining heads.a by the last call)
  model = _init(Model())
  h, img = _inputs()
  for part, mode in ((model.blocks[0], "pal6"), (model.blocks[1].convs, "pal4"), (model.blocks[1], "pal8"), (model, "int8")): quantize_model(part, mode)
  y = model(h, img).numpy()
  fn = str(tmp_path / "q.safetensors")
  save(model, fn)
  fresh = Model()   # random float init, never realised: load swaps in quantised layers and fills every tensor from the file
  meta = load(fresh, fn)
  assert {k: m["mode"] for k, m in meta.items()} == {"blocks.0.proj_in": "pal6", "blocks.0.convs.0": "pal6", "blocks.0.convs.1.0": "pal6",
    "blocks.1.convs.0": "pal4", "blocks.1.convs.1.0": "pal4", "blocks.1.proj_in": "pal8", "heads.a": "int8"}
  a, b = get_state_dict(model), get_state_dict(fresh)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype
    np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())
  np.testing.assert_array_equal(fresh(h, img).numpy(), y)
  sd, md = state_dict(model)
  assert md["tinysd.quant.mode"] == "int8,pal4,pal6,pal8"
  assert all(v.dtype == dtypes.float16 for k, v in sd.items() if k.endswith((".scale", ".lut", ".outliers")))
  plain = str(tmp_path / "plain.safetensors")
  safe_save(get_state_dict(Model()), plain)
  with pytest.raises(ValueError, match="is not a tinysd quantised safetensors file"): load(Model(), plain)   # a float checkpoint is not a quantised one
