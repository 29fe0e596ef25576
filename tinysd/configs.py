# Model architectures as plain data. Every family (SD1, SD2, SDXL, inpainting variants) is a set of these, not a subclass.
# Field names follow the diffusers/transformers config.json keys so a diffusers folder maps onto them directly.
from __future__ import annotations
from dataclasses import dataclass, field, fields, replace

def _pick(cls, d:dict, **over):
  names = {f.name for f in fields(cls)}
  kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
  kw.update(over)
  return cls(**kw)

@dataclass(frozen=True)
class CLIPConfig:
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"        # SD1 (OpenAI CLIP); "gelu" for OpenCLIP ViT-H / bigG
  layer_norm_eps: float = 1e-5
  projection_dim: int | None = None     # set for CLIPTextModelWithProjection (SDXL's second encoder)
  eos_token_id: int = 2                 # 2 = legacy configs: pooled output taken at argmax(input_ids)
  @staticmethod
  def from_diffusers(d:dict) -> CLIPConfig:
    with_proj = any("WithProjection" in a for a in d.get("architectures", []) or [])
    return _pick(CLIPConfig, d, projection_dim=d.get("projection_dim") if with_proj else None)

@dataclass(frozen=True)
class UNetConfig:
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",)*3 + ("DownBlock2D",)
  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",)*3
  layers_per_block: int = 2
  transformer_layers_per_block: int | tuple[int, ...] = 1
  attention_head_dim: int | tuple[int, ...] = 8       # diffusers' legacy name: this is the number of heads
  num_attention_heads: int | tuple[int, ...] | None = None
  cross_attention_dim: int = 768
  use_linear_projection: bool = False
  upcast_attention: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  addition_embed_type: str | None = None            # "text_time" for SDXL
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None
  sample_size: int = 64
  def heads(self) -> tuple[int, ...]:
    h = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
    return h if isinstance(h, tuple) else (h,)*len(self.block_out_channels)
  def depths(self) -> tuple[int, ...]:
    d = self.transformer_layers_per_block
    return d if isinstance(d, tuple) else (d,)*len(self.block_out_channels)
  @staticmethod
  def from_diffusers(d:dict) -> UNetConfig: return _pick(UNetConfig, d)

@dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  force_upcast: bool = True              # SD1/SD2/SDXL VAEs overflow in fp16 on real images
  sample_size: int = 512
  @staticmethod
  def from_diffusers(d:dict) -> VAEConfig: return _pick(VAEConfig, d)

@dataclass(frozen=True)
class SchedulerConfig:
  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"
  prediction_type: str = "epsilon"       # or "v_prediction" (SD2 768-v)
  steps_offset: int = 1
  timestep_spacing: str = "leading"
  set_alpha_to_one: bool = False
  clip_sample: bool = False
  @staticmethod
  def from_diffusers(d:dict) -> SchedulerConfig: return _pick(SchedulerConfig, d)

@dataclass(frozen=True)
class ModelConfig:
  family: str                                  # "sd1", "sd2", "sdxl"; "-inpaint" suffix for 9-channel UNets
  text_encoders: tuple[CLIPConfig, ...]
  unet: UNetConfig
  vae: VAEConfig
  scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
  pad_token_ids: tuple[int, ...] = (49407,)    # per text encoder: EOS for OpenAI CLIP, 0 ("!") for OpenCLIP
  clip_skip_penultimate: tuple[bool, ...] = (False,)   # SD2 and SDXL condition on the penultimate layer

SD15 = ModelConfig("sd1", (CLIPConfig(),), UNetConfig(), VAEConfig())
SD2 = ModelConfig("sd2", (CLIPConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu"),),
                  UNetConfig(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True, sample_size=96),
                  VAEConfig(sample_size=768), SchedulerConfig(prediction_type="v_prediction"), pad_token_ids=(0,), clip_skip_penultimate=(False,))  # SD2: 23-layer tower, final LN
SDXL = ModelConfig("sdxl", (CLIPConfig(), CLIPConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                                                     hidden_act="gelu", projection_dim=1280)),
                   UNetConfig(block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",)*2,
                              up_block_types=("CrossAttnUpBlock2D",)*2 + ("UpBlock2D",), transformer_layers_per_block=(1, 2, 10),
                              attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                              addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, sample_size=128),
                   VAEConfig(scaling_factor=0.13025, sample_size=1024), pad_token_ids=(49407, 0), clip_skip_penultimate=(True, True))

def with_inpaint(cfg:ModelConfig) -> ModelConfig:
  return replace(cfg, family=cfg.family + "-inpaint", unet=replace(cfg.unet, in_channels=9))
