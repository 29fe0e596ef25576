# Blocks shared by the UNet and the VAE. Attribute names are diffusers' state-dict keys.
from __future__ import annotations
from tinygrad import Tensor
from tinygrad.nn import Conv2d, Linear, GroupNorm

def upcast(norm, x:Tensor) -> Tensor:
  # GroupNorm/LayerNorm statistics in fp32: (x-mean)^2 overflows / loses the variance in fp16 on real activations
  return norm(x.float()).cast(x.dtype)

def attention(q:Tensor, k:Tensor, v:Tensor, heads:int) -> Tensor:
  # (B, L, heads*d) x3 -> (B, L, heads*d). Exactly one SDPA call per attention: ops/ swaps it out by graph rewrite.
  (B, Lq, C), Lk = q.shape, k.shape[1]
  q, k, v = q.reshape(B, Lq, heads, -1).transpose(1, 2), k.reshape(B, Lk, heads, -1).transpose(1, 2), v.reshape(B, Lk, heads, -1).transpose(1, 2)
  return q.scaled_dot_product_attention(k, v).transpose(1, 2).reshape(B, Lq, C)

class Attention:
  def __init__(self, query_dim:int, heads:int, dim_head:int, context_dim:int|None=None, bias:bool=False):
    inner, self.heads = heads * dim_head, heads
    self.to_q = Linear(query_dim, inner, bias=bias)
    self.to_k = Linear(context_dim or query_dim, inner, bias=bias)
    self.to_v = Linear(context_dim or query_dim, inner, bias=bias)
    self.to_out = [Linear(inner, query_dim)]
  def __call__(self, x:Tensor, context:Tensor|None=None) -> Tensor:
    ctx = x if context is None else context
    return self.to_out[0](attention(self.to_q(x), self.to_k(ctx), self.to_v(ctx), self.heads))

class ResnetBlock2D:
  def __init__(self, in_channels:int, out_channels:int, temb_channels:int|None=None, groups:int=32, eps:float=1e-5):
    self.norm1 = GroupNorm(groups, in_channels, eps=eps)
    self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
    self.time_emb_proj = Linear(temb_channels, out_channels) if temb_channels is not None else None
    self.norm2 = GroupNorm(groups, out_channels, eps=eps)
    self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
    self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
  def __call__(self, x:Tensor, temb:Tensor|None=None) -> Tensor:
    h = self.conv1(upcast(self.norm1, x).silu())
    if self.time_emb_proj is not None and temb is not None: h = h + self.time_emb_proj(temb.silu())[:, :, None, None]
    h = self.conv2(upcast(self.norm2, h).silu())
    return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h

class Downsample2D:
  # padding=0 is the VAE encoder's variant: diffusers pads (0,1,0,1) by hand before the stride-2 conv
  def __init__(self, channels:int, padding:int=1):
    self.conv, self.padding = Conv2d(channels, channels, 3, stride=2, padding=padding), padding
  def __call__(self, x:Tensor) -> Tensor: return self.conv(x if self.padding else x.pad((0, 1, 0, 1)))

class Upsample2D:
  def __init__(self, channels:int): self.conv = Conv2d(channels, channels, 3, padding=1)
  def __call__(self, x:Tensor, size:tuple[int, int]|None=None) -> Tensor:
    B, C, H, W = x.shape
    if size is None or tuple(size) == (2*H, 2*W): x = x[:, :, :, None, :, None].expand(B, C, H, 2, W, 2).reshape(B, C, 2*H, 2*W)
    else: x = x.interpolate(tuple(size), mode="nearest")   # odd latent sizes: match the skip connection, as diffusers' upsample_size
    return self.conv(x)
