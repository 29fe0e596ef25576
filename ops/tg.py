# The one adapter over tinygrad internals (UOp, Ops, PatternMatcher, graph_rewrite, @function): a tinygrad upgrade touches only this file.
# Everything here is read from / tested against tinygrad==0.14.0.
from __future__ import annotations
from typing import Callable
from tinygrad import Tensor, function
from tinygrad.uop.ops import UOp, Ops, UPat, PatternMatcher, graph_rewrite

def _in_body(u:UOp) -> bool: return any(x.op is Ops.PARAM and x.arg.slot >= 0 for x in u.toposort(enter_calls=False))   # -1: Variables

def region(fxn:Callable[..., Tensor], *args, **kwargs) -> Tensor:
  # Runs fxn as one tinygrad FUNCTION (inlined again by the scheduler). Why it matters: a top-level .contiguous() becomes a Tensor-visible
  # buffer held for the whole schedule, while one inside a FUNCTION body is a scheduler-internal buffer that the memory planner packs into
  # the arena by lifetime. Tensors among args/kwargs become the explicit inputs; fxn must not close over realized buffers.
  # Inside another FUNCTION's body (inputs built on PARAMs) fxn runs inline: that body already is a region, and a nested FUNCTION's PARAMs
  # would hash-cons with the outer ones of the same slot and shape and get substituted wrongly.
  if any(isinstance(a, Tensor) and _in_body(a.uop) for a in (*args, *kwargs.values())): return fxn(*args, **kwargs)
  return function(fxn)(*args, **kwargs)

# *** recognising Tensor.scaled_dot_product_attention in a lazy graph ***

def _strip_cast(u:UOp) -> UOp: return u.src[0] if u.op is Ops.CAST else u

def _dot(u:UOp) -> tuple[UOp, UOp]|None:
  # a @ b lowers to REDUCE(ADD)(PERMUTE(last axis first)([CAST] MUL(a', b'))), a' = a.reshape(..., M, 1, K), b' = (b^T).reshape(..., 1, N, K)
  if u.op is not Ops.REDUCE or u.arg[0] is not Ops.ADD or u.src[0].op is not Ops.PERMUTE: return None
  if (m:=_strip_cast(u.src[0].src[0])).op is not Ops.MUL or len(m.shape) < 3: return None
  a, b = m.src
  if a.shape[-2] != 1 or b.shape[-3] != 1: a, b = b, a
  return (a, b) if a.shape[-2] == 1 and b.shape[-3] == 1 else None

def _sdpa_operands(u:UOp) -> tuple[UOp, UOp, UOp, UOp|None]|None:
  # peels out = softmax(q @ k^T / sqrt(d) [+ mask]) @ v as lowered by tinygrad 0.14 (mixin/rand.py, mixin/op.py _softmax, dot).
  # Only candidates: the caller checks that rebuilding SDPA from them gives back exactly u (UOps are hash-consed).
  if (d:=_dot(_strip_cast(u))) is None: return None
  p, vt = d
  if p.op is not Ops.RESHAPE or vt.op is not Ops.PERMUTE or vt.src[0].op is not Ops.RESHAPE: return None
  v, p = vt.src[0].src[0], p.src[0]
  if p.op is not Ops.MUL: return None
  e = next((_strip_cast(s) for s in p.src if _strip_cast(s).op is Ops.EXP2), None)   # softmax = e * 1/sum(e)
  if e is None or (z:=_strip_cast(e.src[0])).op is not Ops.MUL: return None
  x = next((_strip_cast(s) for s in z.src if _strip_cast(s).op is Ops.ADD), None)    # exp2((x - max(x)) * log2(e))
  if x is None: return None
  logits = _strip_cast(x.src[0])
  mask = None
  if logits.op is Ops.ADD:                                                           # qk + mask
    if (logits.src[0].op is Ops.MUL) == (logits.src[1].op is Ops.MUL): return None
    logits, mask = logits.src if logits.src[0].op is Ops.MUL else logits.src[::-1]
  if logits.op is not Ops.MUL: return None
  if (qk:=next((d for s in logits.src if (d:=_dot(s)) is not None), None)) is None: return None   # qk * (1/sqrt(d))
  qr, kt = qk
  if qr.op is not Ops.RESHAPE or kt.op is not Ops.PERMUTE or kt.src[0].op is not Ops.RESHAPE or kt.src[0].src[0].op is not Ops.PERMUTE: return None
  return qr.src[0], kt.src[0].src[0].src[0], v, mask

def match_sdpa(u:UOp) -> dict|None:
  """If u is exactly `q.scaled_dot_product_attention(k, v, attn_mask=..., is_causal=...)`, its arguments as Tensors (attn_mask additive)."""
  if u.op not in {Ops.REDUCE, Ops.CAST} or (ops:=_sdpa_operands(u)) is None: return None
  q, k, v, m = (Tensor(x) if x is not None else None for x in ops)
  tries = [dict(is_causal=True), dict(attn_mask=m)] if m is not None else [{}]
  for kw in tries:
    try:
      if q.scaled_dot_product_attention(k, v, **kw).uop is u: return dict(q=q, k=k, v=v, attn_mask=None, is_causal=False) | kw
    except (RuntimeError, ValueError, AssertionError): pass
  return None

def _swap_sdpa(ctx:dict, u:UOp) -> UOp|None:
  if (args:=match_sdpa(u)) is None or (new:=ctx["impl"](**args)) is None: return None
  ctx["count"] += 1
  return (new if new.dtype == u.dtype else new.cast(u.dtype)).uop

pm_swap_sdpa = PatternMatcher([(UPat((Ops.REDUCE, Ops.CAST), name="u"), _swap_sdpa)])

def rewrite_sdpa(tensors:list[Tensor], impl:Callable[..., Tensor|None]) -> tuple[list[Tensor], int]:
  """Replaces every SDPA in the lazy graphs of tensors (@function bodies included) by impl(q=, k=, v=, attn_mask=, is_causal=) (None keeps
  it). Returns (new tensors, count).
  The given Tensors are not changed; other Tensors sharing the graph keep the original nodes."""
  ctx = {"impl": impl, "count": 0}
  sink = graph_rewrite(UOp.sink(*[t.uop for t in tensors]), pm_swap_sdpa, ctx=ctx, enter_calls=True, name="split attention")
  return [t if s is t.uop else Tensor(s) for t, s in zip(tensors, sink.src)], ctx["count"]

# *** memory-mapped checkpoints ***

def drop_file_pages():
  """Lets the kernel unmap every checkpoint page tinygrad's DISK devices have touched. tinygrad reads a safetensors file through one
  mmap of the whole file, and each page read stays mapped, counting in this process's RSS as long as any lazy tensor keeps the file open
  (lowmem keeps them all open): a model copied into device buffers would then be counted twice. MADV_DONTNEED on a file mapping loses
  nothing (the pages stay in the page cache; a later read maps them again)."""
  import mmap
  from tinygrad.device import Device
  for name in [d for d in Device._opened_devices if d.startswith("DISK")]:
    if (mem := getattr(Device[name], "mem", None)) is not None and hasattr(mmap, "MADV_DONTNEED"):
      try: mem.madvise(mmap.MADV_DONTNEED)
      except (OSError, ValueError): pass   # closed meanwhile, or a platform without madvise on this mapping
