# The CPU fast path: every Linear and Conv2d of the models (and of anything else built from tinygrad.nn) runs on our GEMM kernels
# (ops/cpu_gemm.py; big stride-1 3x3 convs as Winograd, ops/cpu_winograd.py) when the tensors live on the CPU device in fp32, SiLU, GELU,
# quick GELU, GroupNorm (+ a SiLU after it, fused) and LayerNorm on ours (ops/cpu_act.py, ops/cpu_norm.py), and all CPU kernels use every
# core (ops/cpu_pool.py). Model code is unchanged: install() wraps tinygrad.nn.Linear/Conv2d/GroupNorm/LayerNorm.__call__ and
# Tensor.silu/gelu/quick_gelu, and each call falls back to tinygrad's own op when the case is not ours (another device, fp16 compute,
# groups/dilation, tiny or symbolic shapes).
# Switches: TINYSD_KERNELS=generic (tinygrad's kernels only, on one core as tinygrad 0.14 runs them), TINYSD_ISA=avx512|avx2 (force an ISA:
# the AVX2 path can be tested on an AVX-512 machine), TINYSD_THREADS=n.
from __future__ import annotations
import functools, os, platform, weakref
from tinygrad import Tensor, dtypes
from tinygrad.nn import Linear, Conv2d, GroupNorm, LayerNorm
from . import tg, cpu_gemm, cpu_winograd, cpu_act, cpu_norm

MIN_FLOPS = 1 << 20   # below this a tinygrad kernel is as good and saves a compile
FOLD_PIXELS = 64      # convs over images of at most this many output pixels fold the batch into N (ops/cpu_gemm.py Gemm.fold)
# stride-1 3x3 convs with at least this many 4x4 output tiles (all images) run as Winograd F(4x4,3x3) (ops/cpu_winograd.py). Measured on
# Zen 5, 2 threads: 1.5-2.9x the direct conv from 128 tiles (UNet 32x32 and 64x64 levels, every VAE decoder level); at 32 tiles (16x16,
# CFG batch) the per-call filter transform eats the gain (1.04x). TINYSD_WINOGRAD=0: never, =1: every stride-1 3x3 conv (tests).
WINO_MIN_TILES = 128

@functools.cache   # read once per process: the CPU does not change under it, and cpu_isa() is asked for every traced attention
def cpuinfo() -> dict[str, str]:
  """The first processor's fields in /proc/cpuinfo (Linux); {} elsewhere."""
  info: dict[str, str] = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if not line.strip(): break
        k, _, v = line.partition(":")
        info[k.strip()] = v.strip()
  except OSError: pass
  return info

def cpu_flags() -> set[str]: return set(cpuinfo().get("flags", "").split())

def cpu_isa() -> str|None:
  """The widest ISA our kernels have for this CPU (run-time detection), TINYSD_ISA if set, None where we have none (non-x86)."""
  if (forced := os.environ.get("TINYSD_ISA")): return forced if forced in cpu_gemm.ISAS else None
  if platform.machine().lower() not in ("x86_64", "amd64"): return None
  f = cpu_flags()
  if "avx512f" in f: return "avx512"
  if {"avx2", "fma"} <= f: return "avx2"
  return None

def generic() -> bool: return os.environ.get("TINYSD_KERNELS", "").lower() == "generic"

def winograd() -> str:
  v = os.environ.get("TINYSD_WINOGRAD", "auto").lower()
  return v if v in ("0", "1") else "auto"

def threads() -> int:
  if (n := os.environ.get("TINYSD_THREADS")): return max(1, int(n))
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

def _on_cpu(t:Tensor) -> bool: return isinstance(t.device, str) and t.device.split(":")[0] == "CPU" and tg.renders_c(t.device)

# bf16-stored weights stay on tinygrad's path: clang 14 rejects a __bf16 kernel parameter on x86, and tinygrad names the buffer that way
_DT = {dtypes.float32: "f32", dtypes.float16: "f16"}

def _ours(x:Tensor, w:Tensor, flops:int) -> bool:
  return (_state["isa"] is not None and _on_cpu(x) and x.dtype == dtypes.float32 and w.dtype in _DT and flops >= MIN_FLOPS
          and all(isinstance(s, int) for s in x.shape))

def linear(x:Tensor, weight:Tensor, bias:Tensor|None) -> Tensor|None:
  """x @ weight.T + bias on our kernel, or None when not ours. weight (N, K) fp32 or fp16 (widened while packed); bf16 stays generic."""
  w = tg.stored_form(weight)
  (N, K), M = w.shape, x.numel() // x.shape[-1]
  if not _ours(x, w, 2 * M * N * K) or (bias is not None and bias.shape != (N,)): return None
  g = cpu_gemm.Gemm(1, M, N, K, "f32", (0, K, 1), _DT[w.dtype], (0, 1, K), c_strides=(0, N), bias=None if bias is None else "n",
                    threads=_state["threads"], isa=_state["isa"], prec=_state["prec"])
  out = cpu_gemm.run(g, x.reshape(M, K), w, None if bias is None else bias.float())
  return out.reshape(*x.shape[:-1], N)

def _pair(v) -> tuple[int, int]: return (v, v) if isinstance(v, int) else tuple(v)

def conv2d(x:Tensor, weight:Tensor, bias:Tensor|None, groups=1, stride=1, dilation=1, padding=0) -> Tensor|None:
  """NCHW conv2d on our kernel (implicit GEMM: weights as A, im2col taps gathered by the B pack), or None when not ours."""
  if groups != 1 or _pair(dilation) != (1, 1) or x.ndim != 4 or isinstance(padding, str): return None
  (S, S2), pads = _pair(stride), (padding,) * 4 if isinstance(padding, int) else tuple(padding)
  if len(pads) == 2: pads = (pads[1], pads[1], pads[0], pads[0])
  w = tg.stored_form(weight)
  O, C, KH, KW = w.shape
  B, Cx, H, W = x.shape
  if S != S2 or len(set(pads)) != 1 or Cx != C: return None
  P = pads[0]
  OH, OW = (H + 2 * P - KH) // S + 1, (W + 2 * P - KW) // S + 1
  if not _ours(x, w, 2 * B * O * OH * OW * C * KH * KW) or OH < 1 or OW < 1: return None
  common = dict(c_strides=(O * OH * OW, OH * OW), bias=None if bias is None else "m", threads=_state["threads"], isa=_state["isa"],
                prec=_state["prec"])
  if KH == KW == 3 and S == 1 and (mode := winograd()) != "0":
    TY, TX = cpu_winograd.tiles(OH, OW)
    if mode == "1" or B * TY * TX >= WINO_MIN_TILES:
      # fp32 products even in bf16 mode: bf16-rounded transform-domain operands measured 2.6e-2 rms per conv (10x bf16 direct), and fp32
      # Winograd is still 1.1-1.5x faster than the bf16 direct conv at these sizes
      return cpu_winograd.conv2d(x, w, bias, P, _DT[w.dtype], _state["threads"], _state["isa"])
  conv = cpu_gemm.Conv(C, H, W, KH, KW, S, P, OH, OW)
  if OH * OW <= FOLD_PIXELS and B > 1:   # small images: one GEMM over all images' pixels, threads split the weights (measured 1.3-2x)
    g = cpu_gemm.Gemm(B, O, OH * OW, C * KH * KW, _DT[w.dtype], (0, C * KH * KW, 1), "f32", None, conv=conv, fold=True, **common)
  elif KH == KW == 1 and S == 1 and P == 0:   # 1x1: B is the image itself, (C, H*W) per batch item
    g = cpu_gemm.Gemm(B, O, H * W, C, _DT[w.dtype], (0, C, 1), "f32", (C * H * W, H * W, 1), **common)
  else:
    g = cpu_gemm.Gemm(B, O, OH * OW, C * KH * KW, _DT[w.dtype], (0, C * KH * KW, 1), "f32", conv=conv, **common)
  out = cpu_gemm.run(g, w.reshape(O, -1), x, None if bias is None else bias.float())
  return out.reshape(B, O, OH, OW)

_state: dict = {"isa": None, "threads": 1, "prec": "f32"}

def bf16_available() -> bool: return _state["isa"] == "avx512" and "avx512_bf16" in cpu_flags()

class precision:
  """with precision("bf16"): the GEMMs built (traced) inside use bf16-rounded operands with fp32 accumulation (AVX512-BF16 vdpbf16ps,
  2x the fp32 rate); "f32" (default) is exact fp32. Read when a graph is built, so a TinyJit captured inside keeps it."""
  def __init__(self, prec:str): self.prec = prec
  def __enter__(self):
    if self.prec not in ("f32", "bf16"): raise ValueError(f"unknown GEMM precision {self.prec!r}")
    if self.prec == "bf16" and not bf16_available(): raise RuntimeError("bf16 GEMMs need the CPU fast path on a CPU with AVX512-BF16")
    self.old, _state["prec"] = _state["prec"], self.prec
  def __exit__(self, *exc): _state["prec"] = self.old
_orig: dict = {}
MIN_ACT = 1 << 10   # activations over fewer elements stay tinygrad's (fused into their neighbours there); low enough that the
                    # tiny parity-test models run through ours

def _ours_elementwise(x:Tensor) -> bool:
  return (_state["isa"] is not None and _on_cpu(x) and x.dtype == dtypes.float32 and all(isinstance(s, int) for s in x.shape)
          and x.numel() >= MIN_ACT)

def activation(kind:str, x:Tensor) -> Tensor|None:
  """kind(x) on our kernel (ops/cpu_act.py), or None when not ours."""
  return cpu_act.run(kind, x, _state["threads"]) if _ours_elementwise(x) else None

# GroupNorm outputs of ours, by UOp -> the call's arguments: a SiLU applied to one is computed as one fused GroupNorm+SiLU kernel from them
# (the unfused GroupNorm output is then never used, so never scheduled)
_gn_outputs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

def group_norm(x:Tensor, G:int, weight:Tensor|None, bias:Tensor|None, eps:float) -> Tensor|None:
  if not _ours_elementwise(x) or x.ndim < 2 or x.shape[1] % G: return None
  out = cpu_norm.group_norm(x, G, weight, bias, eps, False, _state["threads"])
  _gn_outputs[out.uop] = (x, G, weight, bias, eps)
  return out

def layer_norm(x:Tensor, weight:Tensor|None, bias:Tensor|None, eps:float) -> Tensor|None:
  return cpu_norm.layer_norm(x, weight, bias, eps, _state["threads"]) if _ours_elementwise(x) else None

def _silu(self:Tensor) -> Tensor:
  if (gn := _gn_outputs.get(self.uop)) is not None:
    x, G, weight, bias, eps = gn
    return cpu_norm.group_norm(x, G, weight, bias, eps, True, _state["threads"])
  out = activation("silu", self)
  return _orig["silu"](self) if out is None else out

def _group_norm_call(self, x:Tensor) -> Tensor:
  out = group_norm(x, self.num_groups, self.weight, self.bias, self.eps) if (self.weight is None) == (self.bias is None) else None
  return _orig["group_norm"](self, x) if out is None else out

def _layer_norm_call(self, x:Tensor) -> Tensor:
  ok = len(self.normalized_shape) == 1 and (self.weight is None) == (self.bias is None)
  out = layer_norm(x, self.weight, self.bias, self.eps) if ok else None
  return _orig["layer_norm"](self, x) if out is None else out

def _gelu(self:Tensor, approximate:str="tanh") -> Tensor:
  out = activation("gelu", self) if approximate == "none" else None
  return _orig["gelu"](self, approximate) if out is None else out

def _quick_gelu(self:Tensor) -> Tensor:
  out = activation("quick_gelu", self)
  return _orig["quick_gelu"](self) if out is None else out

def _linear_call(self, x:Tensor) -> Tensor:
  out = linear(x, self.weight, self.bias)
  return _orig["linear"](self, x) if out is None else out

def _conv_call(self, x:Tensor) -> Tensor:
  out = conv2d(x, self.weight, self.bias, self.groups, self.stride, self.dilation, self.padding)
  return _orig["conv"](self, x) if out is None else out

def install() -> dict:
  """Turns the CPU fast path on for this process (idempotent) unless TINYSD_KERNELS=generic or the CPU has no ISA of ours. Returns the
  state: {"isa": ..., "threads": ...}."""
  if _orig or generic(): return _state
  isa = cpu_isa()
  if isa is None: return _state
  n = threads()
  if n > 1:
    try: n = tg.install_cpu_threads(n)
    except (OSError, RuntimeError) as e:   # no compiler for the pool: kernels still run, one core
      import sys
      print(f"tinysd: CPU thread pool unavailable ({e}); running on one core", file=sys.stderr)
      n = 1
  _state.update(isa=isa, threads=n)
  _orig["linear"], _orig["conv"] = Linear.__call__, Conv2d.__call__
  Linear.__call__, Conv2d.__call__ = _linear_call, _conv_call
  _orig.update(silu=Tensor.silu, gelu=Tensor.gelu, quick_gelu=Tensor.quick_gelu, group_norm=GroupNorm.__call__, layer_norm=LayerNorm.__call__)
  Tensor.silu, Tensor.gelu, Tensor.quick_gelu = _silu, _gelu, _quick_gelu
  GroupNorm.__call__, LayerNorm.__call__ = _group_norm_call, _layer_norm_call
  return _state

def enabled() -> bool: return bool(_orig) and _state["isa"] is not None

def uninstall():
  """Back to tinygrad's Linear/Conv2d (the thread pool stays: it is harmless and shared)."""
  if _orig:
    Linear.__call__, Conv2d.__call__ = _orig.pop("linear"), _orig.pop("conv")
    Tensor.silu, Tensor.gelu, Tensor.quick_gelu = _orig.pop("silu"), _orig.pop("gelu"), _orig.pop("quick_gelu")
    GroupNorm.__call__, LayerNorm.__call__ = _orig.pop("group_norm"), _orig.pop("layer_norm")
  _state.update(isa=None)
