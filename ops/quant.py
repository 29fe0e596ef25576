# Weight quantisation at load time for Linear / Conv2d layers, dequantised inside the consuming kernel (no full-precision weight buffer):
#   int8        LLM.int8-style: per-output-channel absmax scale, y = (x @ q^T) * scale + x[:, cols] @ w_cols^T, where cols are the few input
#               features whose max |w| (over output channels) is far above the rest, kept in fp16. The cast int8 -> float is elementwise,
#               so tinygrad fuses it into the matmul's reduce; scale and the rank-k outlier term are elementwise on the output (epilogue).
#   pal8/6/4    k-means palettization (Apple's coremltools recipe): a LUT of 2^bits fp16 centroids per tensor (or per group of output
#               channels), an index per weight, packed along the output channels (4-bit: 2 per byte; 6-bit: a 4-bit plane + a 2-bit
#               plane = 4 indices in 3 bytes).
#               The LUT gather is written as a one-hot sum over the 2^bits entries *after* the weight is broadcast to the matmul's shape:
#               the scheduler then keeps it inside the matmul kernel, and codegen's load collapse (codegen/simplify.py pm_load_collapse)
#               turns the one-hot sum into a single indexed load lut[idx]. (lut[idx] via Tensor indexing is a reduce before the broadcast,
#               which the scheduler realises as a full-size weight buffer.) The index must be int32 and the LUT in the compute dtype:
#               with uint8 compares the collapse does not fire (a 256-step loop per weight), and a gathered __fp16 costs a scalar
#               conversion per weight per use on CPU (5x slower matmul), so in memory the LUT/scale/outliers live in the layer's dtype.
# quantize_model swaps layers in place; save/load use one .safetensors file (int8/uint8 tensors + fp16 scales/LUTs, layout in __metadata__).
from __future__ import annotations
import json, math
import numpy as np
from tinygrad import Tensor, dtypes
from tinygrad.dtype import DType, least_upper_dtype
from tinygrad.nn import Linear, Conv2d, ConvTranspose2d
from tinygrad.nn.state import get_state_dict, safe_save, safe_load

MODES = {"int8": 8, "pal8": 8, "pal6": 6, "pal4": 4}
# int8 outliers: a column is an outlier when its max |w| exceeds OUTLIER_RATIO x the median column max (it then sets the absmax scale of the
# rows it dominates, inflating their rounding step by that ratio); at most in_features // OUTLIER_FRAC of them, so the fp16 side matrix
# costs at most 2/OUTLIER_FRAC of the int8 bytes (3% at 64).
OUTLIER_RATIO, OUTLIER_FRAC = 3.0, 64
KMEANS_ITERS = 100
# kept in full precision: the first/last UNet convs (latents in, noise prediction out: their errors go straight to the sampler; keeping
# first/last layers is the usual choice in low-bit quantisation) and the global conditioning MLPs, time_embedding (and SDXL's add_embedding,
# pooled text + size ids), whose one vector feeds every resnet block. Together 2.1M weights (4.2 MB fp16) in SD1.5, 7.3M in SDXL.
DEFAULT_SKIP = ("conv_in", "conv_out", "time_embedding", "add_embedding")

# *** numpy side: quantisers and packing ***

def kmeans_1d(v:np.ndarray, n:int, iters:int=KMEANS_ITERS) -> np.ndarray:
  """Sorted centroids of 1-D k-means (Lloyd) over v. Deterministic: on sorted data each cluster is a contiguous run, so an iteration is a
  searchsorted of the n-1 midpoints plus prefix sums (O(n log N)). Init: quantiles of the p^(1/3) density, the asymptotically MSE-optimal
  point density (Panter-Dite), estimated on equal-count bins whose edges are data quantiles (a bin of mass 1/B and width d has
  p^(1/3) dx ~ d^(2/3)). Plain data quantiles put too few centroids in the tails and Lloyd moves them out very slowly: on Student-t(4)
  weights 256 centroids from plain quantiles had 6.5% relative error after 30 iterations and 3% after 1000; this init has 1.0% after 30."""
  s = np.sort(v.ravel().astype(np.float64))
  cs = np.concatenate([[0.0], np.cumsum(s)])
  e = s[np.linspace(0, len(s) - 1, min(64 * n, len(s) - 1) + 1).round().astype(np.int64)]
  cdf = np.concatenate([[0.0], np.cumsum(np.diff(e) ** (2 / 3))])
  c = np.interp((np.arange(n) + 0.5) / n, cdf / cdf[-1], e) if cdf[-1] > 0 else np.full(n, s[0])
  for _ in range(iters):
    pos = np.concatenate([[0], np.searchsorted(s, (c[1:] + c[:-1]) / 2), [len(s)]])
    cnt = np.diff(pos)
    new = np.sort(np.where(cnt > 0, (cs[pos[1:]] - cs[pos[:-1]]) / np.maximum(cnt, 1), c))   # an empty cluster keeps its centroid
    if np.array_equal(new, c): break
    c = new
  return c

def palettize(w:np.ndarray, bits:int, group_size:int|None=None) -> tuple[np.ndarray, np.ndarray]:
  """w (O, R) -> (idx (O, R) uint8, lut (O // group_size, 2^bits) fp16): one LUT per group of group_size output channels (None: per tensor)."""
  O, gs = w.shape[0], group_size or w.shape[0]
  if O % gs: raise ValueError(f"group_size {gs} must divide the {O} output channels")
  idx, luts = np.empty(w.shape, np.uint8), []
  for g in range(0, O, gs):
    lut = np.sort(kmeans_1d(w[g:g+gs], 2 ** bits).astype(np.float16))   # assign against the fp16 centroids that will be stored
    mids = (lut[1:].astype(np.float64) + lut[:-1]) / 2
    idx[g:g+gs] = np.searchsorted(mids, w[g:g+gs].astype(np.float64))
    luts.append(lut)
  return idx, np.stack(luts)

def int8_quantize(w:np.ndarray, max_outliers:int) -> tuple[np.ndarray, np.ndarray, list[int], np.ndarray]:
  """w (O, R) -> (q int8 (O, R) with outlier columns zeroed, scale fp16 (O,), outlier columns, their weights fp16 (O, k))."""
  colmax = np.abs(w).max(0)
  cand = np.argsort(-colmax, kind="stable")[:max_outliers]
  cols = sorted(int(c) for c in cand if colmax[c] > OUTLIER_RATIO * np.median(colmax))
  wi = w.copy()
  wi[:, cols] = 0
  scale = np.maximum(np.abs(wi).max(1) / 127, 2.0 ** -24).astype(np.float16)   # fp16-exact, so a save/load round trip is bit-exact
  q = np.clip(np.rint(wi / scale.astype(np.float32)[:, None]), -127, 127).astype(np.int8)
  return q, scale, cols, w[:, cols].astype(np.float16)

def pack(idx:np.ndarray, bits:int) -> np.ndarray:
  """idx (O, R) -> (ceil(O*bits/8), R) uint8, packed along the output channels: the matmul/conv kernels upcast that axis by 4, so each
  unrolled lane has a constant shift (packed along R, the conv's flattened (cin, kh, kw) reduce axis, the shifts are per element: pal4
  conv 2x slower). 4-bit: two rows per byte, the even row in the low nibble. 6-bit: a 4-bit plane of the low nibbles, then a 2-bit plane
  of the high bits (four rows per byte), i.e. 4 indices in 3 bytes, unpacked with shifts and masks only."""
  if bits == 8: return idx.astype(np.uint8)
  def planes(v, w):   # values of w bits, 8 // w rows per byte, the first row in the low bits
    v = v.reshape(-1, 8 // w, v.shape[1]).astype(np.uint16)
    return (v << (np.arange(8 // w, dtype=np.uint16) * w)[:, None]).sum(1).astype(np.uint8)
  idx = np.pad(idx, ((0, -idx.shape[0] % (2 if bits == 4 else 4)), (0, 0)))
  return planes(idx, 4) if bits == 4 else np.concatenate([planes(idx & 15, 4), planes(idx >> 4, 2)])

def _unpack(p:Tensor, bits:int, O:int) -> Tensor:
  # tinygrad side of pack: (P, R) uint8 -> (O, R) int32, elementwise (fuses into the consumer)
  p = p.cast(dtypes.int32)
  def planes(t, w): return ((t.unsqueeze(1) >> (Tensor.arange(8 // w) * w).reshape(1, -1, 1)) & (2 ** w - 1)).flatten(0, 1)
  if bits == 8: return p
  if bits == 4: return planes(p, 4)[:O]
  h = p.shape[0] * 2 // 3   # rows of the 4-bit plane
  # + rather than |: tinygrad bounds a sum of masked values to [0, 63], so the collapsed lut[idx] load needs no bounds gate (with | it does)
  return (planes(p[:h], 4) + planes(p[h:], 2) * 16)[:O]

# *** quantised weight and layers ***

class QuantWeight:
  """A weight of shape `shape` in `mode`; its tensors (q, scale, outliers / idx, lut) are the state-dict entries. shape and dtype mirror
  the float weight's for model code that reads them (e.g. `conv_in.weight.dtype`)."""
  def __init__(self, mode:str, shape:tuple[int, ...], dtype:DType, tensors:dict[str, Tensor], cols:tuple[int, ...]=()):
    if mode not in MODES: raise ValueError(f"unknown mode {mode!r}, expected one of {tuple(MODES)}")
    self.mode, self.shape, self.dtype, self.cols = mode, tuple(shape), dtype, tuple(cols)
    for k, v in tensors.items(): setattr(self, k, v)

  @staticmethod
  def from_float(w:np.ndarray, mode:str, dtype:DType, device:str|None=None, group_size:int|None=None, outliers:bool=True) -> QuantWeight:
    w2 = w.reshape(w.shape[0], -1).astype(np.float32)
    if mode == "int8":
      q, scale, cols, wo = int8_quantize(w2, max(1, w2.shape[1] // OUTLIER_FRAC) if outliers else 0)
      t = {"q": Tensor(q.reshape(w.shape), device=device), "scale": Tensor(scale, device=device).cast(dtype)}
      if cols: t["outliers"] = Tensor(wo, device=device).cast(dtype)
      return QuantWeight(mode, w.shape, dtype, {k: v.contiguous().realize() for k, v in t.items()}, cols)
    idx, lut = palettize(w2, MODES[mode], group_size)
    t = {"idx": Tensor(pack(idx, MODES[mode]), device=device), "lut": Tensor(lut, device=device).cast(dtype)}
    return QuantWeight(mode, w.shape, dtype, {k: v.contiguous().realize() for k, v in t.items()})

  @staticmethod
  def layout(meta:dict) -> dict[str, tuple[tuple[int, ...], DType|None]]:
    """name -> (shape, dtype; None = the float compute dtype) of the tensors of a weight described by meta()."""
    mode, shape = meta["mode"], tuple(meta["shape"])
    O, R = shape[0], math.prod(shape[1:])
    if mode == "int8": return {"q": (shape, dtypes.int8), "scale": ((O,), None)} | ({"outliers": ((O, len(meta["cols"])), None)} if meta["cols"] else {})
    bits = MODES[mode]
    return {"idx": ((pack(np.zeros((O, 1), np.uint8), bits).shape[0], R), dtypes.uint8), "lut": ((meta["groups"], 2 ** bits), None)}

  @staticmethod
  def empty(meta:dict, dtype:DType, device:str|None=None) -> QuantWeight:
    # placeholder with the right shapes for load(): the file's tensors replace these
    if meta["mode"] not in MODES: raise ValueError(f"unknown mode {meta['mode']!r}, expected one of {tuple(MODES)}")
    t = {k: Tensor.empty(*shp, dtype=dt or dtype, device=device) for k, (shp, dt) in QuantWeight.layout(meta).items()}
    return QuantWeight(meta["mode"], tuple(meta["shape"]), dtype, t, meta.get("cols", ()))

  def meta(self) -> dict:
    return {"mode": self.mode, "shape": list(self.shape)} | ({"cols": list(self.cols)} if self.mode == "int8" else {"groups": self.lut.shape[0]})

  def tensors(self) -> dict[str, Tensor]: return {k: v for k, v in self.__dict__.items() if isinstance(v, Tensor)}
  def nbytes(self, disk:bool=False) -> int:
    # in memory: as held; on disk: the float side tensors (scale, lut, outliers) are fp16
    return sum(v.numel() * (2 if disk and dtypes.is_float(v.dtype) else v.dtype.itemsize) for v in self.tensors().values())

  def gathered(self, layout) -> Tensor:
    """Palettized weight dequantised at the consumer's broadcast shape: layout maps an (O, R, *rest) tensor to (*broadcast, *rest); the
    one-hot sum over the LUT entries comes after it, so tinygrad keeps it in the consumer's kernel and collapses it into lut[idx]."""
    O, n = self.shape[0], self.lut.shape[1]
    idx = _unpack(self.idx, MODES[self.mode], O)
    lut = self.lut.reshape(-1, 1, 1, n).expand(self.lut.shape[0], O // self.lut.shape[0], 1, n).reshape(O, 1, n)
    return layout((idx.unsqueeze(-1) == Tensor.arange(n)).where(lut, 0)).sum(-1)

def _out_dtype(x:Tensor, w:QuantWeight) -> DType: return least_upper_dtype(x.dtype, w.dtype)

class QuantLinear:
  """Drop-in for tinygrad.nn.Linear with a QuantWeight."""
  def __init__(self, weight:QuantWeight, bias:Tensor|None): self.weight, self.bias = weight, bias
  def __call__(self, x:Tensor) -> Tensor:
    w, dt = self.weight, _out_dtype(x, self.weight)
    if w.mode == "int8":
      # fp32 accumulate: unscaled sums of |q| <= 127 can leave the fp16 range
      y = x.matmul(w.q.cast(w.dtype).T, dtype=dtypes.float32) * w.scale.float()
      for j, c in enumerate(w.cols): y = y + x[..., c:c+1].float() * w.outliers[:, j].float()
    else:
      lead = x.shape[:-1]
      y = (x.unsqueeze(-2) * w.gathered(lambda t: t.reshape((1,) * len(lead) + t.shape).expand(lead + t.shape))).sum(-1, dtype=dtypes.float32)
    return (y if self.bias is None else y + self.bias).cast(dt)

def _pads(padding, k:tuple[int, int]) -> tuple[int, int, int, int]:
  # nn.Conv2d padding (int, per-dim (ph, pw), or flat (left, right, top, bottom)) -> flat
  if isinstance(padding, int): return (padding,) * 4
  if len(padding) == 2: return (padding[1], padding[1], padding[0], padding[0])
  return tuple(padding)

class QuantConv2d:
  """Drop-in for tinygrad.nn.Conv2d (2-D kernels) with a QuantWeight."""
  def __init__(self, weight:QuantWeight, bias:Tensor|None, stride=1, padding=0, dilation=1, groups:int=1):
    self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups = weight, bias, stride, padding, dilation, groups
    self.kernel_size = tuple(weight.shape[2:])
  def _taps(self, x:Tensor) -> Tensor:
    # padded input unfolded to (bs, cin, oy, ox, kh, kw); dilation via a longer window sliced with a step
    (kh, kw), (sy, sx), (dy, dx) = self.kernel_size, _pair(self.stride), _pair(self.dilation)
    x = x.pad(_pads(self.padding, self.kernel_size))
    x = x.unfold(2, dy * (kh - 1) + 1, sy)[..., ::dy]     # unfold appends the window axis: (bs, cin, oy, W, kh)
    return x.unfold(3, dx * (kw - 1) + 1, sx)[..., ::dx]  # (bs, cin, oy, ox, kh, kw)
  def __call__(self, x:Tensor) -> Tensor:
    w, dt, g = self.weight, _out_dtype(x, self.weight), self.groups
    O, cin = w.shape[:2]
    if w.mode == "int8":
      y = x.conv2d(w.q.cast(w.dtype), None, g, self.stride, self.dilation, self.padding, dtype=dtypes.float32) * w.scale.float().reshape(1, -1, 1, 1)
      if w.cols:
        taps = self._taps(x)
        kk = self.kernel_size[0] * self.kernel_size[1]
        for j, c in enumerate(w.cols):
          t = taps[:, c // kk, :, :, (c % kk) // self.kernel_size[1], c % self.kernel_size[1]]
          y = y + t.unsqueeze(1).float() * w.outliers[:, j].float().reshape(1, -1, 1, 1)
    else:
      taps = self._taps(x)
      bs, _, oy, ox, kh, kw = taps.shape
      taps = taps.reshape(bs, g, 1, cin, oy, ox, kh, kw).permute(0, 1, 2, 4, 5, 3, 6, 7)   # (bs, g, 1, oy, ox, cin, kh, kw)
      def layout(t:Tensor) -> Tensor:   # (O, R, n) -> (bs, g, O/g, oy, ox, cin, kh, kw, n)
        t = t.reshape(g, O // g, 1, 1, cin, kh, kw, -1).unsqueeze(0)
        return t.expand(bs, *t.shape[1:3], oy, ox, *t.shape[5:])
      y = (taps * w.gathered(layout)).sum((-3, -2, -1), dtype=dtypes.float32).reshape(bs, O, oy, ox)
    return (y if self.bias is None else y + self.bias.reshape(1, -1, 1, 1)).cast(dt)

def _pair(v) -> tuple[int, int]: return (v, v) if isinstance(v, int) else tuple(v)

# *** API ***

def _device(w:Tensor) -> str|None: return None if str(w.device).startswith("DISK") else w.device   # weights straight from safe_load

def quantize_linear(layer:Linear, mode:str, group_size:int|None=None) -> QuantLinear:
  w = layer.weight
  return QuantLinear(QuantWeight.from_float(w.numpy(), mode, w.dtype, _device(w), group_size), _realized(layer.bias))

def quantize_conv(layer:Conv2d, mode:str, group_size:int|None=None) -> QuantConv2d:
  w = layer.weight
  if len(w.shape) != 4: raise ValueError(f"only 2-D convolutions, got weight {w.shape}")
  # outlier columns are (cin, kh, kw) taps of the whole input: only meaningful without groups
  qw = QuantWeight.from_float(w.numpy(), mode, w.dtype, _device(w), group_size, outliers=layer.groups == 1)
  return QuantConv2d(qw, _realized(layer.bias), layer.stride, layer.padding, layer.dilation, layer.groups)

def _realized(t:Tensor|None) -> Tensor|None: return None if t is None else t.realize()   # a lazy (random-init / disk) bias: load it now

def _quantizable(layer) -> bool:
  return (isinstance(layer, Linear) or (isinstance(layer, Conv2d) and not isinstance(layer, ConvTranspose2d) and len(layer.weight.shape) == 4))

def _children(obj):
  # (key, child) pairs the way get_state_dict walks: object attributes, list/tuple items, dict values
  if isinstance(obj, (list, tuple)): return list(enumerate(obj))
  if isinstance(obj, dict): return list(obj.items())
  if hasattr(obj, "__dict__") and not isinstance(obj, (Tensor, DType, type)): return list(obj.__dict__.items())
  return []

def _set(obj, key, value):
  if isinstance(obj, (list, dict)): obj[key] = value
  else: setattr(obj, key, value)

def _walk(obj, prefix:str=""):
  # yields (parent, key, name, layer) for every quantisable layer, depth first in attribute order
  seen: set[int] = set()
  def rec(o, p):
    if id(o) in seen: return
    seen.add(id(o))
    for k, c in _children(o):
      name = f"{p}{k}"
      if _quantizable(c): yield o, k, name, c
      elif not isinstance(c, (Tensor, str, int, float, bool, type(None))): yield from rec(c, name + ".")
  yield from rec(obj, prefix)

def _float_bytes(layer) -> int: return sum(t.nbytes() for t in (layer.weight, layer.bias) if t is not None)

def quantize_model(model, mode:str, min_size:int=4096, skip:tuple[str, ...]=DEFAULT_SKIP, group_size:int|None=None) -> dict:
  """Replaces, in place, every Linear / 2-D Conv2d of model with >= min_size weight elements whose state-dict name has no component in
  skip by its quantised drop-in. Returns {"mode", "count", "layers", "skipped", "bytes_before", "bytes_after", "bytes_after_disk"}
  (bytes of the replaced layers' weights + biases)."""
  if mode not in MODES: raise ValueError(f"unknown mode {mode!r}, expected one of {tuple(MODES)}")
  rep = {"mode": mode, "count": 0, "layers": [], "skipped": [], "bytes_before": 0, "bytes_after": 0, "bytes_after_disk": 0}
  for parent, key, name, layer in list(_walk(model)):
    # a layer held directly in a tuple cannot be swapped in place
    if (layer.weight.numel() < min_size or any(s in name.split(".") for s in skip) or isinstance(parent, tuple)
        or (group_size and layer.weight.shape[0] % group_size)):
      rep["skipped"].append(name)
      continue
    q = quantize_linear(layer, mode, group_size) if isinstance(layer, Linear) else quantize_conv(layer, mode, group_size)
    bias = 0 if layer.bias is None else layer.bias.nbytes()
    rep["count"], rep["bytes_before"] = rep["count"] + 1, rep["bytes_before"] + _float_bytes(layer)
    rep["bytes_after"] += q.weight.nbytes() + bias
    rep["bytes_after_disk"] += q.weight.nbytes(disk=True) + bias
    rep["layers"].append(name)
    _set(parent, key, q)
  return rep

def _quant_layers(model) -> dict[str, QuantLinear|QuantConv2d]:
  out, seen = {}, set()
  def rec(o, p):
    if id(o) in seen: return
    seen.add(id(o))
    for k, c in _children(o):
      if isinstance(c, (QuantLinear, QuantConv2d)): out[f"{p}{k}"] = c
      elif not isinstance(c, (Tensor, str, int, float, bool, type(None))): rec(c, f"{p}{k}.")
  rec(model, "")
  return out

def state_dict(model) -> tuple[dict[str, Tensor], dict[str, str]]:
  """(tensors, metadata) of a quantised model: get_state_dict names (a quantised layer's weight becomes weight.q / weight.scale /
  weight.outliers or weight.idx / weight.lut), float side tensors of quantised weights as fp16; metadata["tinysd.quant"] holds each
  quantised layer's mode, shape and outlier columns / LUT groups as JSON."""
  layers = _quant_layers(model)
  qkeys = {f"{n}.weight.{k}": v for n, l in layers.items() for k, v in l.weight.tensors().items()}
  sd = {k: (v.cast(dtypes.float16) if k in qkeys and dtypes.is_float(v.dtype) else v) for k, v in get_state_dict(model).items()}
  modes = sorted({l.weight.mode for l in layers.values()})
  meta = {"format": "tinysd-quant", "tinysd.quant.mode": ",".join(modes),
          "tinysd.quant": json.dumps({n: l.weight.meta() | {"kind": "linear" if isinstance(l, QuantLinear) else "conv"} for n, l in layers.items()})}
  return sd, meta

def save(model, fn:str) -> None:
  sd, meta = state_dict(model)
  safe_save(sd, fn, meta)

def load(model, fn:str, realize:bool=True) -> dict:
  """Restores a file written by save into a freshly built float model: the layers named in its metadata are replaced by quantised
  layers, then every tensor is loaded (cast to the dtype the model holds it in). Returns the per-layer metadata."""
  meta = _read_meta(fn)
  swap_layers(model, meta)
  file, mine = safe_load(fn), get_state_dict(model)
  if mine.keys() != file.keys():
    raise ValueError(f"state dict mismatch: missing {sorted(mine.keys() - file.keys())[:5]}, unexpected {sorted(file.keys() - mine.keys())[:5]}")
  for k, v in mine.items():
    if v.shape != file[k].shape: raise ValueError(f"shape mismatch for {k}: model {v.shape}, file {file[k].shape}")
    v.replace(file[k].to(v.device).cast(v.dtype))
  if realize: Tensor.realize(*mine.values())
  return meta

def swap_layers(model, meta:dict, dtype:DType|None=None) -> None:
  """Replaces the layers named in meta (layer name -> QuantWeight.meta() + "kind") by quantised layers with empty placeholder weights of
  the right shapes, to be filled by load_state_dict; dtype is the compute dtype (default: the float layer's)."""
  for name, m in meta.items():
    try: parent, key = _resolve(model, name)
    except (AttributeError, KeyError, IndexError, ValueError): raise ValueError(f"{name}: no such layer in this model") from None
    layer = parent[key] if isinstance(parent, (list, dict)) else getattr(parent, key)
    if not _quantizable(layer): raise ValueError(f"{name} is not a Linear/Conv2d in this model")
    if tuple(m["shape"]) != tuple(layer.weight.shape): raise ValueError(f"{name}: quantised shape {tuple(m['shape'])}, model {layer.weight.shape}")
    qw = QuantWeight.empty(m, dtype or layer.weight.dtype, layer.weight.device)
    q = QuantLinear(qw, layer.bias) if m["kind"] == "linear" else QuantConv2d(qw, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    _set(parent, key, q)

def _read_meta(fn:str) -> dict:
  with open(fn, "rb") as f: md = json.loads(f.read(int.from_bytes(f.read(8), "little"))).get("__metadata__", {})
  if md.get("format") != "tinysd-quant": raise ValueError(f"{fn} is not a tinysd quantised safetensors file")
  return json.loads(md["tinysd.quant"])

def _resolve(model, name:str):
  *path, last = name.split(".")
  o = model
  for p in path: o = o[int(p)] if isinstance(o, (list, tuple)) else o[p] if isinstance(o, dict) else getattr(o, p)
  return o, (int(last) if isinstance(o, (list, tuple)) else last)

if __name__ == "__main__":
  # python -m tinysd_ops.quant [runs]: SD1.5-sized Linear 320->1280 on 2x4096 tokens and 3x3 Conv2d 320->320 on 2x64x64, fp32 vs each mode
  import sys, time
  from tinygrad import nn
  runs, rng = int(sys.argv[1]) if len(sys.argv) > 1 else 5, np.random.default_rng(0)
  def realistic(*shape):   # Laplace weights with log-normal per-output-channel scale, like trained layers
    return (rng.laplace(size=shape) * 0.02 * np.exp(0.3 * rng.standard_normal((shape[0],) + (1,) * (len(shape) - 1)))).astype(np.float32)
  for layer, x in ((nn.Linear(320, 1280), (2, 4096, 320)), (nn.Conv2d(320, 320, 3, padding=1), (2, 320, 64, 64))):
    layer.weight = Tensor(realistic(*layer.weight.shape)).realize()
    layer.bias = layer.bias.realize()
    x = Tensor(rng.standard_normal(x, dtype=np.float32)).realize()
    ref = layer(x).numpy()
    for mode in ("fp32",) + tuple(MODES):
      q = layer if mode == "fp32" else quantize_linear(layer, mode) if isinstance(layer, Linear) else quantize_conv(layer, mode)
      ts = []
      for _ in range(runs + 1):
        st = time.perf_counter(); y = q(x).numpy(); ts.append(time.perf_counter() - st)
      nb = layer.weight.nbytes() if mode == "fp32" else q.weight.nbytes()
      print(f"{type(layer).__name__:6s} {mode:5s} median {np.median(ts[1:])*1e3:8.1f} ms  weight {nb/1e3:8.1f} kB"
            f" (disk {(nb if mode == 'fp32' else q.weight.nbytes(disk=True))/1e3:8.1f} kB)  rel err {np.linalg.norm(y-ref)/np.linalg.norm(ref):.2e}")
