# Model architectures as plain data. Every family (SD1, SD2, SDXL, inpainting variants) is a set of these, not a subclass.
# Field names follow the diffusers/transformers config.json keys so a diffusers folder maps onto them directly.
from __future__ import annotations
import math, re
from dataclasses import dataclass, field, fields, replace

class ConfigError(ValueError): pass

def _is(v, t:str) -> bool:
  # v against a field's annotation string (these modules use `from __future__ import annotations`): int, float, bool, str, None,
  # tuple[X, ...] and unions of them. JSON's true/false are not ints here, and NaN/Infinity (which json.loads accepts) are not floats.
  t = t.strip()
  if "|" in t: return any(_is(v, a) for a in t.split("|"))
  if m := re.fullmatch(r"tuple\[(\w+), \.\.\.\]", t): return isinstance(v, tuple) and all(_is(x, m[1]) for x in v)
  return {"None": v is None, "bool": isinstance(v, bool), "str": isinstance(v, str), "int": isinstance(v, int) and not isinstance(v, bool),
          "float": isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}[t]

# bounds on ints (each element of a tuple too): sizes >= 1, and loop counts bounded so a bad config fails here, not in a 10^9-layer loop
_LIMITS = {"layers_per_block": (1, 64), "num_hidden_layers": (1, 256), "transformer_layers_per_block": (1, 64), "num_train_timesteps": (1, 100_000),
           "freq_shift": (0, 1 << 20), "steps_offset": (0, 1 << 20), "eos_token_id": (0, 1 << 30)}

def _pick(cls, d:dict, **over):
  """cls from a config.json dict: unknown keys ignored, known ones type- and range-checked (ConfigError naming the key)."""
  if not isinstance(d, dict): raise ConfigError(f"a config must be a JSON object, got {type(d).__name__}")
  names = {f.name: f.type for f in fields(cls)}
  kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
  kw.update(over)
  for k, v in kw.items():
    if not _is(v, names[k]): raise ConfigError(f"{k} must be {names[k].replace(' ', '')}, got {_short(v)}")
    lo, hi = _LIMITS.get(k, (1, 1 << 30))
    for x in v if isinstance(v, tuple) else (v,):
      if isinstance(x, int) and not isinstance(x, bool) and not lo <= x <= hi: raise ConfigError(f"{k} must be in [{lo}, {hi}], got {x}")
  return cls(**kw)

def _short(v) -> str:
  r = repr(v)
  return r if len(r) <= 40 else r[:37] + "..."

def _require(ok:bool, msg:str):
  if not ok: raise ConfigError(msg)

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
    archs = d.get("architectures") if isinstance(d, dict) else None
    with_proj = isinstance(archs, list) and any(isinstance(a, str) and "WithProjection" in a for a in archs)
    return check(_pick(CLIPConfig, d, projection_dim=d.get("projection_dim") if with_proj else None))

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
  upcast_attention: bool = False         # not used yet (SD2.1-768 sets it): attention runs fp32 on the CPU, and in fp32 inside split attention
                                         # (tiles of > 1024 tokens); an fp16 GPU run of a smaller attention computes it in fp16 -- see README
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  addition_embed_type: str | None = None            # "text_time" for SDXL
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None
  sample_size: int | tuple[int, ...] = 64   # not used for inference; some configs hold [h, w]
  def heads(self) -> tuple[int, ...]:
    h = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
    return h if isinstance(h, tuple) else (h,)*len(self.block_out_channels)
  def depths(self) -> tuple[int, ...]:
    d = self.transformer_layers_per_block
    return d if isinstance(d, tuple) else (d,)*len(self.block_out_channels)
  @staticmethod
  def from_diffusers(d:dict) -> UNetConfig: return check(_pick(UNetConfig, d))

@dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None      # SD3/FLUX VAEs only: refused by check() (tinysd has no such models), not silently ignored
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  force_upcast: bool = True              # not used: tinysd decodes in the VAE's dtype and redoes a non-finite decode in fp32 (pipeline.decode)
  sample_size: int | tuple[int, ...] = 512
  @staticmethod
  def from_diffusers(d:dict) -> VAEConfig: return check(_pick(VAEConfig, d))

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
  def from_diffusers(d:dict) -> SchedulerConfig: return check(_pick(SchedulerConfig, d))

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
# `tinysd demo-model`: SD1-shaped (the same blocks, the 8x VAE, the bundled CLIP vocabulary) but 5.8M parameters (3.2M of them token
# embeddings), given random weights, for trying the command line without a download. Its images are noise.
DEMO = ModelConfig("sd1", (CLIPConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),),
                   UNetConfig(block_out_channels=(32, 64, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",)*2 + ("DownBlock2D",),
                              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",)*2, attention_head_dim=2, cross_attention_dim=64, sample_size=32),
                   VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, sample_size=256))

def check(c):
  """c itself, or ConfigError when its fields do not fit together or name something tinysd/models and tinysd/samplers do not have."""
  if isinstance(c, CLIPConfig):
    _require(c.hidden_act in ("quick_gelu", "gelu"), f"hidden_act must be quick_gelu or gelu, got {c.hidden_act!r}")
    _require(c.hidden_size % c.num_attention_heads == 0, f"hidden_size {c.hidden_size} is not divisible by {c.num_attention_heads} heads")
  elif isinstance(c, UNetConfig):
    L = len(c.block_out_channels)
    _require(1 <= L <= 8, f"block_out_channels must have 1 to 8 levels, got {L}")
    _require(len(c.down_block_types) == L and len(c.up_block_types) == L, f"down/up_block_types must have {L} entries, one per level")
    _require(set(c.down_block_types) <= {"CrossAttnDownBlock2D", "DownBlock2D"} and set(c.up_block_types) <= {"CrossAttnUpBlock2D", "UpBlock2D"},
             f"unsupported block types {sorted(set(c.down_block_types + c.up_block_types))}")
    _require(len(c.heads()) == L and len(c.depths()) == L, f"attention heads and transformer_layers_per_block must have {L} entries")
    _require(all(ch % c.norm_num_groups == 0 and ch % h == 0 for ch, h in zip(c.block_out_channels, c.heads())),
             f"block_out_channels {c.block_out_channels} must be divisible by norm_num_groups {c.norm_num_groups} and by the heads {c.heads()}")
    _require(c.addition_embed_type in (None, "text_time"), f"unsupported addition_embed_type {c.addition_embed_type!r}")
    _require(c.addition_embed_type is None or (c.addition_time_embed_dim is not None and c.projection_class_embeddings_input_dim is not None),
             "addition_embed_type text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim")
  elif isinstance(c, VAEConfig):
    _require(1 <= len(c.block_out_channels) <= 8, f"block_out_channels must have 1 to 8 levels, got {len(c.block_out_channels)}")
    _require(all(ch % c.norm_num_groups == 0 for ch in c.block_out_channels),
             f"block_out_channels {c.block_out_channels} must be divisible by norm_num_groups {c.norm_num_groups}")
    _require(c.scaling_factor != 0, "scaling_factor must not be 0")
    _require(not c.shift_factor, f"shift_factor {c.shift_factor} is an SD3/FLUX VAE's; tinysd runs SD1/SD2/SDXL VAEs only")
  elif isinstance(c, SchedulerConfig):
    # what tinysd/samplers.py implements, so a bad scheduler_config.json fails before the weights are read, not at the first step
    _require(c.beta_schedule in ("linear", "scaled_linear"), f"unsupported beta_schedule {c.beta_schedule!r}; tinysd has linear, scaled_linear")
    _require(c.prediction_type in ("epsilon", "v_prediction"), f"unsupported prediction_type {c.prediction_type!r}; tinysd has epsilon, v_prediction")
    _require(c.timestep_spacing in ("leading", "trailing", "linspace"), f"unsupported timestep_spacing {c.timestep_spacing!r}")
    _require(0 < c.beta_start <= c.beta_end < 1, f"betas must satisfy 0 < beta_start <= beta_end < 1, got {c.beta_start}, {c.beta_end}")
  elif isinstance(c, ModelConfig):
    _require(c.family in ("sd1", "sd2", "sdxl", "sd1-inpaint", "sd2-inpaint", "sdxl-inpaint"), f"unknown family {c.family!r}")
    _require(1 <= len(c.text_encoders) <= 2 and len(c.pad_token_ids) == len(c.clip_skip_penultimate) == len(c.text_encoders),
             "one or two text encoders, each with a pad token id and a clip-skip flag")
    for x in (*c.text_encoders, c.unet, c.vae, c.scheduler): check(x)
  return c

def with_inpaint(cfg:ModelConfig) -> ModelConfig:
  return replace(cfg, family=cfg.family + "-inpaint", unet=replace(cfg.unet, in_channels=9))
