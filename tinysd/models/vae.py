# The KL autoencoder of SD1.x / SD2.x / SDXL, named as diffusers' AutoencoderKL.
from __future__ import annotations
from tinygrad import Tensor
from tinygrad.nn import Conv2d, Linear, GroupNorm
from tinysd.configs import VAEConfig
from tinysd.models.layers import ResnetBlock2D, Downsample2D, Upsample2D, attention, upcast

class DiagonalGaussian:
  def __init__(self, moments:Tensor):
    self.mean, logvar = moments.chunk(2, dim=1)
    self.logvar = logvar.clip(-30.0, 20.0)
    self.std = (0.5 * self.logvar).exp()
  def sample(self, noise:Tensor) -> Tensor: return self.mean + self.std * noise.cast(self.mean.dtype)
  def mode(self) -> Tensor: return self.mean

class SpatialAttention:
  # single-head self attention over all pixels, with its own GroupNorm and residual (diffusers' Attention with group_norm)
  def __init__(self, ch:int, groups:int):
    self.group_norm = GroupNorm(groups, ch, eps=1e-6)
    self.to_q, self.to_k, self.to_v = Linear(ch, ch), Linear(ch, ch), Linear(ch, ch)
    self.to_out = [Linear(ch, ch)]
  def __call__(self, x:Tensor) -> Tensor:
    B, C, H, W = x.shape
    h = upcast(self.group_norm, x).reshape(B, C, H*W).transpose(1, 2)
    h = self.to_out[0](attention(self.to_q(h), self.to_k(h), self.to_v(h), heads=1))
    return x + h.transpose(1, 2).reshape(B, C, H, W)

class UNetMidBlock2D:
  def __init__(self, ch:int, groups:int, add_attention:bool):
    self.resnets = [ResnetBlock2D(ch, ch, None, groups, 1e-6) for _ in range(2)]
    self.attentions = [SpatialAttention(ch, groups)] if add_attention else []
  def __call__(self, x:Tensor) -> Tensor:
    x = self.resnets[0](x)
    for a in self.attentions: x = a(x)
    return self.resnets[1](x)

class EncoderBlock:
  def __init__(self, cin:int, cout:int, n:int, groups:int, add_downsample:bool):
    self.resnets = [ResnetBlock2D(cin if j == 0 else cout, cout, None, groups, 1e-6) for j in range(n)]
    self.downsamplers = [Downsample2D(cout, padding=0)] if add_downsample else []
  def __call__(self, x:Tensor) -> Tensor: return x.sequential(self.resnets + self.downsamplers)

class DecoderBlock:
  def __init__(self, cin:int, cout:int, n:int, groups:int, add_upsample:bool):
    self.resnets = [ResnetBlock2D(cin if j == 0 else cout, cout, None, groups, 1e-6) for j in range(n)]
    self.upsamplers = [Upsample2D(cout)] if add_upsample else []
  def __call__(self, x:Tensor) -> Tensor: return x.sequential(self.resnets + self.upsamplers)

class Encoder:
  def __init__(self, cfg:VAEConfig):
    ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
    self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
    self.down_blocks = [EncoderBlock(ch[max(i-1, 0)], ch[i], cfg.layers_per_block, g, i < n-1) for i in range(n)]
    self.mid_block = UNetMidBlock2D(ch[-1], g, cfg.mid_block_add_attention)
    self.conv_norm_out = GroupNorm(g, ch[-1], eps=1e-6)
    self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)
  def __call__(self, x:Tensor) -> Tensor:
    x = self.mid_block(self.conv_in(x).sequential(self.down_blocks))
    return self.conv_out(upcast(self.conv_norm_out, x).silu())

class Decoder:
  def __init__(self, cfg:VAEConfig):
    ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
    self.conv_in = Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
    self.mid_block = UNetMidBlock2D(ch[0], g, cfg.mid_block_add_attention)
    self.up_blocks = [DecoderBlock(ch[max(i-1, 0)], ch[i], cfg.layers_per_block + 1, g, i < n-1) for i in range(n)]
    self.conv_norm_out = GroupNorm(g, ch[-1], eps=1e-6)
    self.conv_out = Conv2d(ch[-1], cfg.out_channels, 3, padding=1)
  def __call__(self, z:Tensor) -> Tensor:
    x = self.mid_block(self.conv_in(z)).sequential(self.up_blocks)
    return self.conv_out(upcast(self.conv_norm_out, x).silu())

class AutoencoderKL:
  posterior = DiagonalGaussian   # what encode returns; ops/tiling builds it from blended moments without importing this module
  def __init__(self, cfg:VAEConfig):
    self.cfg, self.scaling_factor, self.shift_factor = cfg, cfg.scaling_factor, cfg.shift_factor
    self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
    self.quant_conv = Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1) if cfg.use_quant_conv else None
    self.post_quant_conv = Conv2d(cfg.latent_channels, cfg.latent_channels, 1) if cfg.use_post_quant_conv else None

  def encode(self, x:Tensor) -> DiagonalGaussian:
    # x: images in [-1, 1], (B, 3, H, W); the moments are unscaled (multiply samples by scaling_factor for the UNet)
    h = self.encoder(x.cast(self.encoder.conv_in.weight.dtype))
    return DiagonalGaussian(h if self.quant_conv is None else self.quant_conv(h))

  def decode(self, z:Tensor) -> Tensor:
    # z: latents already divided by scaling_factor; returns images in about [-1, 1]
    z = z.cast(self.decoder.conv_in.weight.dtype)
    return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))
