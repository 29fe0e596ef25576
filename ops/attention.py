# Split ("memory-efficient") attention: softmax(q k^T / sqrt(d) + mask) v computed tile by tile with an online softmax, so the
# (..., Lq, Lk) score matrix is never materialised (1.07 GB in fp32 for SD1.x 512px self-attention at batch 2, 8 heads).
# Model code keeps calling Tensor.scaled_dot_product_attention; install() swaps those calls out by rewriting the lazy graph (ops/tg.py
# finds them). Plain Tensor code, so it runs on every backend with tinygrad's own matmul kernels. Two scheduler facts make the tiles
# really die: the split runs inside a FUNCTION (tg.region), where .contiguous() buffers are planned into the arena by lifetime, and each
# tile's first kernel reads its predecessor's result (_after), since tinygrad linearises independent kernels breadth-first.
from __future__ import annotations
import math
from tinygrad import Tensor, dtypes
from . import tg

def _after(x:Tensor) -> Tensor:
  # An exact 0.0 that reads one element of x (|x| < 0 is False for every float, NaN and inf too). Added to the next tile's reference it makes
  # that tile's kernel run after x's: kernels are linearised breadth-first, so independent query chunks would otherwise all be live at once.
  return (x[(0,) * (x.ndim - 1) + (slice(-1, None),)].abs() < 0).where(1.0, 0.0)

def _mask_tile(mask:Tensor, i:int, n:int, j:int, m:int) -> Tensor:
  if mask.ndim < 2: mask = mask.reshape((1,) * (2 - mask.ndim) + mask.shape)
  if mask.shape[-2] != 1: mask = mask[..., i:i+n, :]
  if mask.shape[-1] != 1: mask = mask[..., j:j+m]
  return mask.where(0.0, -math.inf) if mask.dtype == dtypes.bool else mask

def _split_attention(q:Tensor, k:Tensor, v:Tensor, attn_mask:Tensor|None, is_causal:bool, q_chunk:int, k_chunk:int) -> Tensor:
  Lq, Lk, D = q.shape[-2], k.shape[-2], v.shape[-1]
  scale = 1 / math.sqrt(q.shape[-1])
  v1 = v.float().pad(((0, 0),) * (v.ndim - 1) + ((0, 1),), value=1.0)   # a ones column: the row sum l comes out of p @ v1 for free
  outs, prev = [], None
  for i in range(0, Lq, q_chunk):
    qi = q[..., i:i+q_chunk, :]
    n, acc, m, mr = qi.shape[-2], None, None, None
    for j in range(0, min(Lk, i + n) if is_causal else Lk, k_chunk):   # causal: key tiles right of the diagonal are all masked
      s = qi.matmul(k[..., j:j+k_chunk, :].transpose(-2, -1), dtype=dtypes.float32) * scale
      nk = s.shape[-1]
      if is_causal: s = s + Tensor.ones(n, nk, dtype=dtypes.bool, device=q.device).tril(i - j).where(0.0, -math.inf)
      if attn_mask is not None: s = s + _mask_tile(attn_mask, i, n, j, nk)
      # state per row: m = running max (may be -inf while all keys so far are masked), mr = finite reference (m, or 0),
      # acc = [sum_j exp(s_j - mr) v_j, sum_j exp(s_j - mr)]. The tile is stored once, relative to the previous reference.
      ref = (0.0 if prev is None else _after(prev)) if acc is None else mr + _after(acc)
      t = (s - ref).contiguous()
      mt = t.max(-1, keepdim=True) + ref
      m, mr_old = (mt if m is None else m.maximum(mt)).contiguous(), mr
      mr = (m == -math.inf).where(0.0, m)
      # p is stored (2 live tiles): fused into the p @ v1 kernel, tinygrad's software exp would run once per output column
      pv = (t + (ref - mr)).exp().contiguous().matmul(v1[..., j:j+k_chunk, :], dtype=dtypes.float32)
      # rescale the old sums; min(., 0) only matters for rows with m = -inf so far, where acc = 0 and exp(mr_old - mr) could overflow
      acc = (pv if acc is None else acc * (mr_old - mr).minimum(0.0).exp() + pv).contiguous()
    outs.append(acc[..., :D] / acc[..., D:])
    prev = acc
  out = outs[0] if len(outs) == 1 else outs[0].cat(*outs[1:], dim=-2)
  return out.cast(q.dtype)

def split_attention(q:Tensor, k:Tensor, v:Tensor, attn_mask:Tensor|None=None, is_causal:bool=False, q_chunk:int=1024, k_chunk:int=1024) -> Tensor:
  """Same result as q.scaled_dot_product_attention(k, v, attn_mask, is_causal=is_causal) (fp32 math inside, cast to q.dtype), computed in
  (q_chunk x k_chunk) tiles: live memory is one tile per batch*head instead of the full (..., Lq, Lk) score matrix."""
  if is_causal and attn_mask is not None: raise RuntimeError("cannot set attn_mask when is_causal=True")
  if q_chunk < 1 or k_chunk < 1: raise ValueError(f"chunks must be positive, got {q_chunk=} {k_chunk=}")
  return tg.region(_split_attention, q, k, v, attn_mask, is_causal, q_chunk, k_chunk)

def _impl(q_chunk:int, k_chunk:int):
  def impl(q:Tensor, k:Tensor, v:Tensor, attn_mask:Tensor|None, is_causal:bool) -> Tensor|None:
    if q.shape[-2] <= q_chunk and k.shape[-2] <= k_chunk: return None   # one tile: plain SDPA already is that
    return split_attention(q, k, v, attn_mask, is_causal, q_chunk, k_chunk)
  return impl

def install(*tensors:Tensor, q_chunk:int=1024, k_chunk:int=1024) -> Tensor|tuple[Tensor, ...]:
  """Rewrites the lazy graphs of tensors so that every Tensor.scaled_dot_product_attention in them (@function bodies included) larger than
  one (q_chunk x k_chunk) tile runs as split_attention. Call right before realize, e.g. on the UNet output inside the TinyJit step; returns
  the new Tensor(s), the given ones are unchanged."""
  new, _ = tg.rewrite_sdpa(list(tensors), _impl(q_chunk, k_chunk))
  return new[0] if len(new) == 1 else tuple(new)
