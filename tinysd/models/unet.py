# The conditional UNet of SD1.x / SD2.x / SDXL (and their 9-channel inpainting variants), named as diffusers' UNet2DConditionModel.
from __future__ import annotations
import math
from tinygrad import Tensor, dtypes
from tinygrad.nn import Conv2d, Linear, GroupNorm, LayerNorm
from tinysd.configs import UNetConfig
from tinysd.models.layers import Attention, ResnetBlock2D, Downsample2D, Upsample2D, upcast

def timestep_embedding(t:Tensor, dim:int, flip_sin_to_cos:bool=True, freq_shift:float=0, max_period:int=10000) -> Tensor:
  # (N,) -> (N, dim) fp32 sinusoids; frequencies from python floats so they are exact constants
  half = dim // 2
  freqs = Tensor([math.exp(-math.log(max_period) * i / (half - freq_shift)) for i in range(half)], dtype=dtypes.float32)
  arg = t.float()[:, None] * freqs[None, :]
  return arg.cos().cat(arg.sin(), dim=-1) if flip_sin_to_cos else arg.sin().cat(arg.cos(), dim=-1)

class TimestepEmbedding:
  def __init__(self, in_features:int, out_features:int):
    self.linear_1, self.linear_2 = Linear(in_features, out_features), Linear(out_features, out_features)
  def __call__(self, x:Tensor) -> Tensor: return self.linear_2(self.linear_1(x).silu())

class GEGLU:
  def __init__(self, dim_in:int, dim_out:int): self.proj = Linear(dim_in, dim_out * 2)
  def __call__(self, x:Tensor) -> Tensor:
    h, gate = self.proj(x).chunk(2, dim=-1)
    return h * gate.gelu(approximate="none")   # diffusers' GEGLU uses exact (erf) gelu

class FeedForward:
  def __init__(self, dim:int, mult:int=4): self.net = [GEGLU(dim, dim * mult), lambda x: x, Linear(dim * mult, dim)]   # net.1 is dropout
  def __call__(self, x:Tensor) -> Tensor: return x.sequential(self.net)

class BasicTransformerBlock:
  def __init__(self, dim:int, heads:int, context_dim:int):
    self.norm1, self.attn1 = LayerNorm(dim), Attention(dim, heads, dim // heads)
    self.norm2, self.attn2 = LayerNorm(dim), Attention(dim, heads, dim // heads, context_dim=context_dim)
    self.norm3, self.ff = LayerNorm(dim), FeedForward(dim)
  def __call__(self, x:Tensor, context:Tensor) -> Tensor:
    x = x + self.attn1(upcast(self.norm1, x))
    x = x + self.attn2(upcast(self.norm2, x), context)
    return x + self.ff(upcast(self.norm3, x))

class Transformer2DModel:
  def __init__(self, channels:int, heads:int, depth:int, context_dim:int, groups:int, linear_proj:bool):
    self.norm = GroupNorm(groups, channels, eps=1e-6)
    self.proj_in = Linear(channels, channels) if linear_proj else Conv2d(channels, channels, 1)
    self.transformer_blocks = [BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)]
    self.proj_out = Linear(channels, channels) if linear_proj else Conv2d(channels, channels, 1)
    self.linear_proj = linear_proj
  def __call__(self, x:Tensor, context:Tensor) -> Tensor:
    B, C, H, W = x.shape
    h = upcast(self.norm, x)
    if not self.linear_proj: h = self.proj_in(h)
    h = h.permute(0, 2, 3, 1).reshape(B, H*W, C)
    if self.linear_proj: h = self.proj_in(h)
    for blk in self.transformer_blocks: h = blk(h, context)
    if self.linear_proj: h = self.proj_out(h)
    h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)
    if not self.linear_proj: h = self.proj_out(h)
    return x + h

class DownBlock:
  # CrossAttnDownBlock2D when `attn` (heads, depth) is given, DownBlock2D otherwise
  def __init__(self, cfg:UNetConfig, cin:int, cout:int, temb:int, attn:tuple[int, int]|None, add_downsample:bool):
    g, n = cfg.norm_num_groups, cfg.layers_per_block
    self.resnets = [ResnetBlock2D(cin if j == 0 else cout, cout, temb, g, cfg.norm_eps) for j in range(n)]
    self.attentions = [Transformer2DModel(cout, *attn, cfg.cross_attention_dim, g, cfg.use_linear_projection) for _ in range(n)] if attn else []
    self.downsamplers = [Downsample2D(cout)] if add_downsample else []
  def __call__(self, x:Tensor, emb:Tensor, ctx:Tensor) -> tuple[Tensor, list[Tensor]]:
    skips = []
    for j, resnet in enumerate(self.resnets):
      x = resnet(x, emb)
      if self.attentions: x = self.attentions[j](x, ctx)
      skips.append(x)
    for d in self.downsamplers: skips.append(x := d(x))
    return x, skips

class UpBlock:
  # CrossAttnUpBlock2D / UpBlock2D: layers_per_block+1 resnets, each eating one skip connection
  def __init__(self, cfg:UNetConfig, cprev:int, cout:int, cskip_last:int, temb:int, attn:tuple[int, int]|None, add_upsample:bool):
    g, n = cfg.norm_num_groups, cfg.layers_per_block + 1
    self.resnets = [ResnetBlock2D((cprev if j == 0 else cout) + (cskip_last if j == n-1 else cout), cout, temb, g, cfg.norm_eps) for j in range(n)]
    self.attentions = [Transformer2DModel(cout, *attn, cfg.cross_attention_dim, g, cfg.use_linear_projection) for _ in range(n)] if attn else []
    self.upsamplers = [Upsample2D(cout)] if add_upsample else []
  def __call__(self, x:Tensor, emb:Tensor, ctx:Tensor, skips:list[Tensor], size:tuple[int, int]|None) -> Tensor:
    for j, resnet in enumerate(self.resnets):
      x = resnet(x.cat(skips.pop(), dim=1), emb)
      if self.attentions: x = self.attentions[j](x, ctx)
    for u in self.upsamplers: x = u(x, size)
    return x

class UNetMidBlock2DCrossAttn:
  def __init__(self, cfg:UNetConfig, ch:int, temb:int, heads:int, depth:int):
    g = cfg.norm_num_groups
    self.resnets = [ResnetBlock2D(ch, ch, temb, g, cfg.norm_eps) for _ in range(2)]
    self.attentions = [Transformer2DModel(ch, heads, depth, cfg.cross_attention_dim, g, cfg.use_linear_projection)]
  def __call__(self, x:Tensor, emb:Tensor, ctx:Tensor) -> Tensor:
    return self.resnets[1](self.attentions[0](self.resnets[0](x, emb), ctx), emb)

class UNet2DConditionModel:
  def __init__(self, cfg:UNetConfig):
    self.cfg, ch, heads, depths = cfg, cfg.block_out_channels, cfg.heads(), cfg.depths()
    temb, nlev = ch[0] * 4, len(ch)
    self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
    self.time_embedding = TimestepEmbedding(ch[0], temb)
    self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb) if cfg.addition_embed_type == "text_time" else None
    assert cfg.addition_embed_type in (None, "text_time"), f"unsupported addition_embed_type {cfg.addition_embed_type}"
    # heads/depth are per level; diffusers' attention_head_dim quirk is resolved in cfg.heads()
    attn = lambda t, h, d: (h, d) if t.startswith("CrossAttn") else None
    self.down_blocks = [DownBlock(cfg, ch[max(i-1, 0)], ch[i], temb, attn(t, heads[i], depths[i]), i < nlev-1)
                        for i, t in enumerate(cfg.down_block_types)]
    self.mid_block = UNetMidBlock2DCrossAttn(cfg, ch[-1], temb, heads[-1], depths[-1])
    rch, rheads, rdepths = ch[::-1], heads[::-1], depths[::-1]
    self.up_blocks = [UpBlock(cfg, rch[max(i-1, 0)], rch[i], rch[min(i+1, nlev-1)], temb, attn(t, rheads[i], rdepths[i]), i < nlev-1)
                      for i, t in enumerate(cfg.up_block_types)]
    self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
    self.conv_out = Conv2d(ch[0], cfg.out_channels, 3, padding=1)
    self.keep_skip = None   # hook on the copies of the skip tensors held from the down path to the up path (ops/shortcuts.py)

  def __call__(self, sample:Tensor, timestep:Tensor|float|int, encoder_hidden_states:Tensor,
               text_embeds:Tensor|None=None, time_ids:Tensor|None=None) -> Tensor:
    cfg, dt, B = self.cfg, self.conv_in.weight.dtype, sample.shape[0]
    t = (timestep if isinstance(timestep, Tensor) else Tensor([float(timestep)], dtype=dtypes.float32)).reshape(-1)
    if t.shape[0] != B: t = t.expand(B)
    emb = self.time_embedding(timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).cast(dt))
    if self.add_embedding is not None:
      assert text_embeds is not None and time_ids is not None, "SDXL UNet needs text_embeds (B, 1280) and time_ids (B, 6)"
      tid = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift).reshape(B, -1)
      emb = emb + self.add_embedding(text_embeds.cast(dt).cat(tid.cast(dt), dim=-1))
    ctx = encoder_hidden_states.cast(dt)
    x = self.conv_in(sample.cast(dt))
    keep = self.keep_skip or (lambda t: t)   # only the stored copies go through it: the down path goes on with the plain tensors
    skips = [keep(x)]
    for blk in self.down_blocks:
      x, s = blk(x, emb, ctx)
      skips += [keep(t) for t in s]
    x = self.mid_block(x, emb, ctx)
    for blk in self.up_blocks:
      n = len(blk.resnets)
      res, skips = skips[-n:], skips[:-n]
      x = blk(x, emb, ctx, res, skips[-1].shape[2:] if skips else None)
    return self.conv_out(upcast(self.conv_norm_out, x).silu())
