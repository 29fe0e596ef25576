# Every checkpoint-file fact of tinysd lives here: reading safetensors (and .ckpt via a strict unpickler), the CompVis/A1111 single-file
# layout <-> diffusers key names, family and config detection from tensor shapes, diffusers folders, and export in both layouts.
# The models only ever see diffusers-named state dicts (transformers' `text_model.*` for the text encoders).
from __future__ import annotations
import json, os, pathlib, re, shutil
from dataclasses import dataclass, asdict, replace
from tinygrad import Tensor, dtypes, Device
from tinygrad.dtype import DType
from tinysd.configs import CLIPConfig, UNetConfig, VAEConfig, SchedulerConfig, ModelConfig, SD15, SD2, SDXL, ConfigError, check, _pick
from tinysd.outputs import write_files, temp_dir, commit

class CheckpointError(ValueError): pass

TEMPLATES = {"sd1": SD15, "sd2": SD2, "sdxl": SDXL}
SAFE_DTYPES = {"F64": dtypes.float64, "F32": dtypes.float32, "F16": dtypes.float16, "BF16": dtypes.bfloat16, "I64": dtypes.int64,
               "I32": dtypes.int32, "I16": dtypes.int16, "I8": dtypes.int8, "U8": dtypes.uint8, "BOOL": dtypes.bool}
SAFE_NAMES = {v: k for k, v in SAFE_DTYPES.items()}
DTYPE_NAMES = {"float32": dtypes.float32, "fp32": dtypes.float32, "float": dtypes.float32, "float16": dtypes.float16, "fp16": dtypes.float16,
               "half": dtypes.float16, "bfloat16": dtypes.bfloat16, "bf16": dtypes.bfloat16, "__bf16": dtypes.bfloat16}   # + tinygrad's DType.name
_READABLE = {dtypes.float32: "float32", dtypes.float16: "float16", dtypes.bfloat16: "bfloat16", dtypes.float64: "float64"}

def _te_names(cfg:ModelConfig) -> list[str]: return ["text_encoder"] + [f"text_encoder_{i+1}" for i in range(1, len(cfg.text_encoders))]
def _base(family:str) -> str: return family.removesuffix("-inpaint")

# ---- expected diffusers/transformers state-dict shapes for a config (the names our models use) ----

def _lin(p, o, i, bias=True): return {f"{p}.weight": (o, i)} | ({f"{p}.bias": (o,)} if bias else {})
def _conv(p, o, i, k=3): return {f"{p}.weight": (o, i, k, k), f"{p}.bias": (o,)}
def _norm(p, c): return {f"{p}.weight": (c,), f"{p}.bias": (c,)}

def _resnet(p, cin, cout, temb=None):
  s = _norm(f"{p}.norm1", cin) | _conv(f"{p}.conv1", cout, cin) | _norm(f"{p}.norm2", cout) | _conv(f"{p}.conv2", cout, cout)
  if temb: s |= _lin(f"{p}.time_emb_proj", cout, temb)
  return s | (_conv(f"{p}.conv_shortcut", cout, cin, 1) if cin != cout else {})

def _transformer(p, c, depth, ctx, linear):
  s = _norm(f"{p}.norm", c)
  for n in ("proj_in", "proj_out"): s |= _lin(f"{p}.{n}", c, c) if linear else _conv(f"{p}.{n}", c, c, 1)
  for d in range(depth):
    b = f"{p}.transformer_blocks.{d}"
    for n in ("norm1", "norm2", "norm3"): s |= _norm(f"{b}.{n}", c)
    for a, kv in (("attn1", c), ("attn2", ctx)):
      s |= _lin(f"{b}.{a}.to_q", c, c, False) | _lin(f"{b}.{a}.to_k", c, kv, False) | _lin(f"{b}.{a}.to_v", c, kv, False)
      s |= _lin(f"{b}.{a}.to_out.0", c, c)
    s |= _lin(f"{b}.ff.net.0.proj", 8*c, c) | _lin(f"{b}.ff.net.2", c, 4*c)   # GEGLU: 4c hidden, doubled for the gate
  return s

def unet_shapes(c:UNetConfig) -> dict[str, tuple]:
  ch, L, lpb, depth, temb = c.block_out_channels, len(c.block_out_channels), c.layers_per_block, c.depths(), 4*c.block_out_channels[0]
  down_attn, up_attn = [t.startswith("CrossAttn") for t in c.down_block_types], [t.startswith("CrossAttn") for t in c.up_block_types]
  tf = lambda p, ch, d: _transformer(p, ch, d, c.cross_attention_dim, c.use_linear_projection)
  s = _conv("conv_in", ch[0], c.in_channels) | _lin("time_embedding.linear_1", temb, ch[0]) | _lin("time_embedding.linear_2", temb, temb)
  if c.addition_embed_type == "text_time":
    s |= _lin("add_embedding.linear_1", temb, c.projection_class_embeddings_input_dim) | _lin("add_embedding.linear_2", temb, temb)
  for l in range(L):
    for j in range(lpb):
      s |= _resnet(f"down_blocks.{l}.resnets.{j}", (ch[l-1] if l else ch[0]) if j == 0 else ch[l], ch[l], temb)
      if down_attn[l]: s |= tf(f"down_blocks.{l}.attentions.{j}", ch[l], depth[l])
    if l < L-1: s |= _conv(f"down_blocks.{l}.downsamplers.0.conv", ch[l], ch[l])
  s |= _resnet("mid_block.resnets.0", ch[-1], ch[-1], temb) | tf("mid_block.attentions.0", ch[-1], depth[-1])
  s |= _resnet("mid_block.resnets.1", ch[-1], ch[-1], temb)
  rch, rdepth, prev = ch[::-1], depth[::-1], ch[-1]
  for u in range(L):
    for j in range(lpb+1):   # each up resnet also eats one skip connection from the down path
      skip = rch[min(u+1, L-1)] if j == lpb else rch[u]
      s |= _resnet(f"up_blocks.{u}.resnets.{j}", (prev if j == 0 else rch[u]) + skip, rch[u], temb)
      if up_attn[u]: s |= tf(f"up_blocks.{u}.attentions.{j}", rch[u], rdepth[u])
    if u < L-1: s |= _conv(f"up_blocks.{u}.upsamplers.0.conv", rch[u], rch[u])
    prev = rch[u]
  return s | _norm("conv_norm_out", ch[0]) | _conv("conv_out", c.out_channels, ch[0])

def vae_shapes(c:VAEConfig) -> dict[str, tuple]:
  ch, L, lpb, lat = c.block_out_channels, len(c.block_out_channels), c.layers_per_block, c.latent_channels
  def mid(p, C):
    a = _norm(f"{p}.attentions.0.group_norm", C)
    for n in ("to_q", "to_k", "to_v", "to_out.0"): a |= _lin(f"{p}.attentions.0.{n}", C, C)
    return _resnet(f"{p}.resnets.0", C, C) | (a if c.mid_block_add_attention else {}) | _resnet(f"{p}.resnets.1", C, C)
  s = _conv("encoder.conv_in", ch[0], c.in_channels)
  for i in range(L):
    for j in range(lpb): s |= _resnet(f"encoder.down_blocks.{i}.resnets.{j}", (ch[i-1] if i else ch[0]) if j == 0 else ch[i], ch[i])
    if i < L-1: s |= _conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", ch[i], ch[i])
  s |= mid("encoder.mid_block", ch[-1]) | _norm("encoder.conv_norm_out", ch[-1]) | _conv("encoder.conv_out", 2*lat, ch[-1])
  if c.use_quant_conv: s |= _conv("quant_conv", 2*lat, 2*lat, 1)
  if c.use_post_quant_conv: s |= _conv("post_quant_conv", lat, lat, 1)
  s |= _conv("decoder.conv_in", ch[-1], lat) | mid("decoder.mid_block", ch[-1])
  rch = ch[::-1]
  for i in range(L):
    for j in range(lpb+1): s |= _resnet(f"decoder.up_blocks.{i}.resnets.{j}", (rch[i-1] if i else rch[0]) if j == 0 else rch[i], rch[i])
    if i < L-1: s |= _conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", rch[i], rch[i])
  return s | _norm("decoder.conv_norm_out", ch[0]) | _conv("decoder.conv_out", c.out_channels, ch[0])

def clip_shapes(c:CLIPConfig) -> dict[str, tuple]:
  H, I = c.hidden_size, c.intermediate_size
  s = {"text_model.embeddings.token_embedding.weight": (c.vocab_size, H),
       "text_model.embeddings.position_embedding.weight": (c.max_position_embeddings, H)}
  for i in range(c.num_hidden_layers):
    p = f"text_model.encoder.layers.{i}"
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"): s |= _lin(f"{p}.self_attn.{n}", H, H)
    s |= _norm(f"{p}.layer_norm1", H) | _norm(f"{p}.layer_norm2", H) | _lin(f"{p}.mlp.fc1", I, H) | _lin(f"{p}.mlp.fc2", H, I)
  s |= _norm("text_model.final_layer_norm", H)
  return s | (_lin("text_projection", c.projection_dim, H, False) if c.projection_dim else {})

def component_shapes(cfg:ModelConfig) -> dict[str, dict[str, tuple]]:
  return {"unet": unet_shapes(cfg.unet), "vae": vae_shapes(cfg.vae)} | {n: clip_shapes(c) for n, c in zip(_te_names(cfg), cfg.text_encoders)}

# ---- CompVis (ldm / sgm, as in A1111 single files) names. op: None same tensor, "T" transposed, "conv" 1x1 conv weight (CompVis) vs
# Linear (diffusers), 0/1/2 = q/k/v third of OpenCLIP's packed in_proj ----

_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."), ("norm2.", "out_layers.0."),
           ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection."))
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
               "add_embedding.linear_2": "label_emb.0.2", "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}

def _sub(rest:str, table) -> str:
  for a, b in table:
    if rest.startswith(a): return b + rest[len(a):]
  return rest

def _unet_ldm(k:str, c:UNetConfig) -> str:
  # CompVis numbers blocks in one flat list: input_blocks = [conv_in, (lpb resnets[+attn], downsample) per level], output_blocks likewise
  n = c.layers_per_block + 1
  if (head := k.rsplit(".", 1)[0]) in _UNET_FIXED: return _UNET_FIXED[head] + k[len(head):]
  if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
    l, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
    return f"input_blocks.{1 + l*n + j}." + (f"0.{_sub(rest, _RESNET)}" if kind == "resnets" else f"1.{rest}")
  if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k): return f"input_blocks.{(int(m[1])+1)*n}.0.op.{m[2]}"
  if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", k): return f"middle_block.{2*int(m[1])}.{_sub(m[2], _RESNET)}"
  if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", k): return f"middle_block.1.{m[1]}"
  if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
    u, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
    return f"output_blocks.{u*n + j}." + (f"0.{_sub(rest, _RESNET)}" if kind == "resnets" else f"1.{rest}")
  if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k):
    u = int(m[1])
    return f"output_blocks.{u*n + n-1}.{2 if c.up_block_types[u].startswith('CrossAttn') else 1}.conv.{m[2]}"
  raise KeyError(k)

_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

def _vae_ldm(k:str, c:VAEConfig) -> tuple[str, str|None]:
  L = len(c.block_out_channels)
  if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", k):
    return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}", "conv" if m[2] != "group_norm" and m[3] == "weight" else None
  k = k.replace("conv_shortcut.", "nin_shortcut.")
  for pat, fmt in ((r"(encoder|decoder)\.conv_norm_out\.(.+)", lambda m: f"{m[1]}.norm_out.{m[2]}"),
                   (r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", lambda m: f"{m[1]}.mid.block_{int(m[2])+1}.{m[3]}"),
                   (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"),
                   (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
                   # CompVis numbers decoder levels from the output side
                   (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda m: f"decoder.up.{L-1-int(m[1])}.block.{m[2]}.{m[3]}"),
                   (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", lambda m: f"decoder.up.{L-1-int(m[1])}.upsample.conv.{m[2]}")):
    if m := re.fullmatch(pat, k): return fmt(m), None
  return k, None   # conv_in, conv_out, quant_conv, post_quant_conv keep their names

_OPENCLIP_FIXED = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                   "text_model.embeddings.position_embedding.weight": "positional_embedding",
                   "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}
_OPENCLIP_LAYER = (("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
                   ("mlp.fc2.", "mlp.c_proj."))

def _openclip_ldm(k:str) -> tuple[str, str|int|None]:
  if k in _OPENCLIP_FIXED: return _OPENCLIP_FIXED[k], None
  if k == "text_projection.weight": return "text_projection", "T"   # OpenCLIP computes x @ text_projection
  m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", k)
  if not m: raise KeyError(k)
  if q := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", m[2]):
    return f"transformer.resblocks.{m[1]}.attn.in_proj_{q[2]}", "qkv".index(q[1])
  return f"transformer.resblocks.{m[1]}.{_sub(m[2], _OPENCLIP_LAYER)}", None

def _te_layouts(family:str) -> list[tuple[str, str]]:
  # (CompVis prefix, "hf" = transformers CLIPTextModel keys | "openclip") per text encoder
  return {"sd1": [("cond_stage_model.transformer.", "hf")], "sd2": [("cond_stage_model.model.", "openclip")],
          "sdxl": [("conditioner.embedders.0.transformer.", "hf"), ("conditioner.embedders.1.model.", "openclip")]}[_base(family)]

def compvis_layout(cfg:ModelConfig) -> dict[str, dict[str, tuple[str, str|int|None]]]:
  """component -> {diffusers key: (CompVis key, op)} for every tensor of the config."""
  shapes = component_shapes(cfg)
  out = {"unet": {k: ("model.diffusion_model." + _unet_ldm(k, cfg.unet), None) for k in shapes["unet"]}}
  out["vae"] = {k: ("first_stage_model." + n, op) for k in shapes["vae"] for n, op in [_vae_ldm(k, cfg.vae)]}
  for name, (prefix, kind) in zip(_te_names(cfg), _te_layouts(cfg.family)):
    out[name] = {k: (prefix + k, None) if kind == "hf" else (prefix + n, op) for k in shapes[name] for n, op in [_openclip_ldm(k)]}
  return out

# keys real single files carry that inference does not use: EMA copies, diffusion-schedule buffers, losses, int position ids, CLIP logit scale
_IGNORED = re.compile(r"^(model_ema\.|loss\.|denoiser\.|first_stage_model\.loss\.)|(^|\.)(position_ids|logit_scale)$|^(betas|alphas_cumprod(_prev)?|"
                      r"sqrt_(recip|recipm1|one_minus)?_?alphas_cumprod|log_one_minus_alphas_cumprod|posterior_\w+|lvlb_weights|logvar)$")

def _sd2_unused(cfg:ModelConfig) -> re.Pattern|None:
  # SD2 files hold all 24 OpenCLIP-H blocks and its projection; diffusers' (and our) encoder keeps 23 and ends at the penultimate block
  if _base(cfg.family) != "sd2": return None
  return re.compile(rf"^cond_stage_model\.model\.(transformer\.resblocks\.{cfg.text_encoders[0].num_hidden_layers}\.|text_projection$)")

def _ldm_shape(shape:tuple, op) -> tuple:
  return shape[::-1] if op == "T" else shape + (1, 1) if op == "conv" else (3*shape[0],) + shape[1:] if isinstance(op, int) else shape

# ---- config (de)serialisation, detection and inference ----

def config_to_json(cfg:ModelConfig) -> str: return json.dumps(asdict(cfg), separators=(",", ":"))
def config_from_json(s:str) -> ModelConfig:
  """The ModelConfig config_to_json wrote (a file's tinysd_config metadata), or ConfigError: the text is the file's, not ours to trust."""
  d = _loads(s, "tinysd_config")
  if not isinstance(d, dict) or not isinstance(d.get("text_encoders"), list) or not all(isinstance(d.get(k), list) for k in ("pad_token_ids", "clip_skip_penultimate")):
    raise ConfigError("tinysd_config is not a config object")
  pads, skips = tuple(d["pad_token_ids"]), tuple(d["clip_skip_penultimate"])
  if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 30 for x in pads) or not all(isinstance(x, bool) for x in skips):
    raise ConfigError("tinysd_config: bad pad_token_ids or clip_skip_penultimate")
  if not isinstance(d.get("family"), str): raise ConfigError("tinysd_config: family must be a string")
  cfg = ModelConfig(d["family"], tuple(_pick(CLIPConfig, t) for t in d["text_encoders"]), _pick(UNetConfig, d.get("unet")), _pick(VAEConfig, d.get("vae")),
                    _pick(SchedulerConfig, d.get("scheduler")), pads, skips)
  return check(cfg)

def _loads(s, what):
  # json.loads on the file's text: RecursionError on deep nesting is neither ValueError nor anyone's bug but the file's
  if not isinstance(s, (str, bytes)): raise ConfigError(f"{what} must be a JSON string")
  try: return json.loads(s)
  except (ValueError, RecursionError) as e: raise ConfigError(f"{what} is not valid JSON ({type(e).__name__})") from None

def _json(p:pathlib.Path) -> dict:
  try: return _loads(p.read_bytes(), "config")
  except (OSError, ConfigError) as e: raise CheckpointError(f"{p}: cannot read config ({e})") from None

def _from(cls, p:pathlib.Path):
  try: return cls.from_diffusers(_json(p))
  except ConfigError as e: raise CheckpointError(f"{p}: {e}") from None

def read_diffusers_config(folder) -> ModelConfig:
  """ModelConfig from a diffusers pipeline folder's config.json files (no weights are read)."""
  p = pathlib.Path(folder)
  if not (p/"unet"/"config.json").is_file(): raise CheckpointError(f"{p}: not a diffusers pipeline folder (no unet/config.json)")
  unet, vae = _from(UNetConfig, p/"unet"/"config.json"), _from(VAEConfig, p/"vae"/"config.json")
  tes = tuple(_from(CLIPConfig, p/d/"config.json") for d in ("text_encoder", "text_encoder_2") if (p/d/"config.json").is_file())
  if not (p/"text_encoder"/"config.json").is_file():
    raise CheckpointError(f"{p}: unsupported family: no text_encoder/config.json (SDXL refiners are not supported)")
  family = "sdxl" if len(tes) == 2 else "sd2" if tes[0].hidden_act == "gelu" else "sd1"   # OpenCLIP (SD2): exact gelu, OpenAI CLIP: quick_gelu
  tpl = TEMPLATES[family]
  sch = (p/"scheduler"/"scheduler_config.json")
  cfg = replace(tpl, text_encoders=tes, unet=unet, vae=vae,
                scheduler=_from(SchedulerConfig, sch) if sch.is_file() else tpl.scheduler)
  return _with_channels(cfg, unet.in_channels, p)

def _with_channels(cfg:ModelConfig, in_channels:int, where) -> ModelConfig:
  if in_channels == 9: return replace(cfg, family=_base(cfg.family) + "-inpaint")
  if in_channels != 4: raise CheckpointError(f"{where}: unsupported UNet with {in_channels} input channels (4 = txt2img, 9 = inpainting)")
  return cfg

def detect_family(keys) -> str:
  """sd1 / sd2 / sdxl from the key layout of a CompVis single file (without the -inpaint suffix: that needs shapes)."""
  keys = list(keys)
  has = lambda p: any(k.startswith(p) for k in keys)
  if not has("model.diffusion_model."):
    if has("down_blocks.") or has("encoder.down_blocks.") or has("text_model.") or has("encoder.down."):
      raise CheckpointError("this is a single model component (UNet, VAE or text encoder), not a full Stable Diffusion checkpoint; "
                            "pass the diffusers pipeline folder or a complete single file")
    raise CheckpointError(f"unknown key layout (no model.diffusion_model.* keys; first keys: {', '.join(sorted(keys)[:3])})")
  if has("conditioner.embedders.1.model.") and has("conditioner.embedders.0.transformer."): return "sdxl"
  if has("conditioner.embedders."): raise CheckpointError("unsupported family: SDXL refiner (only an OpenCLIP text encoder)")
  if has("cond_stage_model.model."): return "sd2"
  if has("cond_stage_model.transformer."): return "sd1"
  raise CheckpointError("unsupported family: the file has a UNet but no known text encoder (cond_stage_model.* / conditioner.embedders.*)")

def _blocks(shapes:dict, pat:str) -> int: return len({m[1] for k in shapes if (m := re.match(pat, k))})

def _need(shapes:dict, k:str, what:str) -> tuple:
  if k not in shapes: raise CheckpointError(f"unknown {what} layout: expected key {k} is missing")
  return shapes[k]

def _infer_unet(s:dict, family:str, tpl:UNetConfig) -> UNetConfig:
  downs = sorted(int(m[1]) for k in s if (m := re.fullmatch(r"input_blocks\.(\d+)\.0\.op\.weight", k)))
  n_in, L = _blocks(s, r"input_blocks\.(\d+)\."), len(downs) + 1
  lpb = (n_in - 1 - len(downs)) // L
  if lpb < 1 or downs != [(l+1)*(lpb+1) for l in range(L-1)] or n_in != 1 + L*lpb + L-1:
    raise CheckpointError(f"unknown UNet layout ({n_in} input blocks, downsamplers at {downs})")
  first = [1 + l*(lpb+1) for l in range(L)]
  ch = tuple(_need(s, f"input_blocks.{i}.0.out_layers.3.weight", "UNet")[0] for i in first)
  attn = [f"input_blocks.{i}.1.proj_in.weight" in s for i in first]
  depth = tuple(_blocks(s, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.") or 1 for i in first)
  if (mid := _blocks(s, r"middle_block\.1\.transformer_blocks\.(\d+)\.")) != depth[-1]:
    raise CheckpointError(f"unsupported UNet: middle block has {mid} transformer layers, last level {depth[-1]}")
  proj = _need(s, "middle_block.1.proj_in.weight", "UNet")
  extra = {}
  if "label_emb.0.0.weight" in s:
    extra = dict(addition_embed_type="text_time", projection_class_embeddings_input_dim=s["label_emb.0.0.weight"][1])
  # heads are not in the weights: SD1 uses 8 heads per level, SD2/SDXL heads of dim 64
  heads = 8 if family == "sd1" else tuple(max(1, c // 64) for c in ch)
  return replace(tpl, in_channels=_need(s, "input_blocks.0.0.weight", "UNet")[1], out_channels=_need(s, "out.2.weight", "UNet")[0],
                 block_out_channels=ch, layers_per_block=lpb, down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
                 up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]),
                 transformer_layers_per_block=depth[0] if len(set(depth)) == 1 else depth, attention_head_dim=heads, num_attention_heads=None,
                 cross_attention_dim=_need(s, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", "UNet")[1],
                 use_linear_projection=len(proj) == 2, **extra)

def _infer_vae(s:dict, tpl:VAEConfig) -> VAEConfig:
  L, lpb = _blocks(s, r"encoder\.down\.(\d+)\."), _blocks(s, r"encoder\.down\.0\.block\.(\d+)\.")
  if L == 0 or lpb == 0: raise CheckpointError("unknown VAE layout (no first_stage_model.encoder.down.* keys)")
  return replace(tpl, in_channels=_need(s, "encoder.conv_in.weight", "VAE")[1], out_channels=_need(s, "decoder.conv_out.weight", "VAE")[0],
                 latent_channels=_need(s, "encoder.conv_out.weight", "VAE")[0] // 2, layers_per_block=lpb,
                 block_out_channels=tuple(_need(s, f"encoder.down.{i}.block.0.conv1.weight", "VAE")[0] for i in range(L)),
                 use_quant_conv="quant_conv.weight" in s, use_post_quant_conv="post_quant_conv.weight" in s,
                 mid_block_add_attention="encoder.mid.attn_1.q.weight" in s)

def _infer_clip(s:dict, kind:str, family:str, tpl:CLIPConfig) -> CLIPConfig:
  if kind == "hf":
    V, H = _need(s, "text_model.embeddings.token_embedding.weight", "CLIP")
    P, n = _need(s, "text_model.embeddings.position_embedding.weight", "CLIP")[0], _blocks(s, r"text_model\.encoder\.layers\.(\d+)\.")
    I, proj = _need(s, "text_model.encoder.layers.0.mlp.fc1.weight", "CLIP")[0], None
  else:
    V, H = _need(s, "token_embedding.weight", "OpenCLIP")
    P, n = _need(s, "positional_embedding", "OpenCLIP")[0], _blocks(s, r"transformer\.resblocks\.(\d+)\.")
    I = _need(s, "transformer.resblocks.0.mlp.c_fc.weight", "OpenCLIP")[0]
    if family == "sd2": n, proj = n - 1, None   # see _sd2_unused
    else: proj = _need(s, "text_projection", "OpenCLIP")[1]
  return replace(tpl, vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=n, num_attention_heads=max(1, H // 64),
                 max_position_embeddings=P, projection_dim=proj)

def infer_config(shapes:dict[str, tuple], family:str|None=None) -> ModelConfig:
  """ModelConfig of a CompVis single file from its key names and tensor shapes (heads and non-weight settings from the family)."""
  family = family or detect_family(shapes)
  tpl = TEMPLATES[family]
  sub = lambda p: {k[len(p):]: v for k, v in shapes.items() if k.startswith(p)}
  unet = _infer_unet(sub("model.diffusion_model."), family, tpl.unet)
  tes = tuple(_infer_clip(sub(p), kind, family, t) for (p, kind), t in zip(_te_layouts(family), tpl.text_encoders))
  if unet.addition_embed_type == "text_time":   # SDXL: pooled text embedding + 6 Fourier-embedded size/crop numbers
    unet = replace(unet, addition_time_embed_dim=(unet.projection_class_embeddings_input_dim - tes[-1].projection_dim) // 6)
  cfg = replace(tpl, text_encoders=tes, unet=unet, vae=_infer_vae(sub("first_stage_model."), tpl.vae))
  return _with_channels(cfg, unet.in_channels, "checkpoint")

# ---- low-level file reading ----

def _check_header(path:pathlib.Path, size:int) -> tuple[int, dict]:
  with open(path, "rb") as f: head = f.read(9)
  n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
  if len(head) < 9 or head[8:9] != b"{":
    raise CheckpointError(f"{path}: not a checkpoint (neither a safetensors file nor a PyTorch zip archive)")
  if n > size - 8: raise CheckpointError(f"{path}: truncated or corrupted safetensors file (header length {n} > file size {size})")
  with open(path, "rb") as f: f.seek(8); raw = f.read(n)
  try: header = json.loads(raw.decode("utf-8"))
  except (ValueError, RecursionError): raise CheckpointError(f"{path}: corrupted safetensors header (not valid JSON)") from None
  if not isinstance(header, dict): raise CheckpointError(f"{path}: corrupted safetensors header (not a JSON object)")
  data = size - 8 - n
  for k, v in header.items():
    if k == "__metadata__": continue
    isint = lambda x: isinstance(x, int) and not isinstance(x, bool)
    ok = isinstance(v, dict) and isinstance(v.get("dtype"), str) and v["dtype"] in SAFE_DTYPES and isinstance(shp := v.get("shape"), list) and \
         all(isint(x) and x >= 0 for x in shp) and isinstance(off := v.get("data_offsets"), list) and len(off) == 2 and \
         all(isint(x) for x in off) and 0 <= off[0] <= off[1]
    if not ok: raise CheckpointError(f"{path}: corrupted safetensors header (bad entry for {k!r})")
    if off[1] > data: raise CheckpointError(f"{path}: truncated safetensors file ({k} needs {off[1]} data bytes, the file has {data})")
    numel = 1
    for x in shp: numel *= x
    if off[1] - off[0] != numel * SAFE_DTYPES[v["dtype"]].itemsize:
      raise CheckpointError(f"{path}: corrupted safetensors header (size of {k} does not match its shape)")
  return n, header

def read_safetensors(path) -> tuple[dict[str, Tensor], dict]:
  """Lazy DISK tensors of a (validated) safetensors file, and its __metadata__. Nothing is read until a tensor is realised."""
  path = pathlib.Path(path)
  n, header = _check_header(path, os.path.getsize(path))
  data = Tensor(path)[8+n:]
  out = {k: data[v["data_offsets"][0]:v["data_offsets"][1]].bitcast(SAFE_DTYPES[v["dtype"]]).reshape(v["shape"])
         for k, v in header.items() if k != "__metadata__" and v["data_offsets"][1] > v["data_offsets"][0]}
  return out, meta if isinstance(meta := header.get("__metadata__"), dict) else {}

def read_tensors(path) -> tuple[dict[str, Tensor], dict]:
  """Any single weights file: safetensors, or a PyTorch zip (.ckpt/.pt/.bin) through the strict unpickler in ckpt_pickle."""
  path = pathlib.Path(path)
  if not path.is_file(): raise CheckpointError(f"{path}: no such file")
  with open(path, "rb") as f: head = f.read(9)
  if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") and head[8:9] != b"{":
    raise CheckpointError(f"{path}: legacy (pre-zip) PyTorch pickle; not supported, convert it to .safetensors")
  if head[:4] == b"PK\x03\x04":
    from tinysd.ckpt_pickle import load_torch_zip, PickleRefused
    try: return load_torch_zip(path), {}
    except PickleRefused as e: raise CheckpointError(f"{path}: {e}") from None
  return read_safetensors(path)

def _float_to_bf16_bits(t:Tensor) -> Tensor:
  # round to nearest even on the fp32 bit pattern (the CPU backend cannot cast to bf16 with every clang); NaN stays NaN
  u = t.cast(dtypes.float32).bitcast(dtypes.uint32)
  r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).cast(dtypes.uint16)
  return (t != t).where(Tensor(0x7FC0, dtype=dtypes.uint16, device=t.device), r)

def _cast(t:Tensor, dtype:DType|None, device:str) -> Tensor:
  """Lazy move + cast. bf16 is converted through its bit pattern (exact), which every backend can run."""
  if dtype is None or dtype == t.dtype:   # bf16 travels as uint16 bits: some clang builds cannot even load __bf16 in a copy/slice kernel
    return t.bitcast(dtypes.uint16).to(device).bitcast(dtypes.bfloat16) if t.dtype == dtypes.bfloat16 else t.to(device)
  if t.dtype == dtypes.bfloat16:
    t = (t.bitcast(dtypes.uint16).to(device).cast(dtypes.uint32) << 16).bitcast(dtypes.float32)
    return t if dtype == dtypes.float32 else _cast(t, dtype, device)
  if dtype == dtypes.bfloat16: return _float_to_bf16_bits(t.to(device)).bitcast(dtypes.bfloat16)
  return t.to(device).cast(dtype)

def _dtype(d) -> DType|None:
  if d is None or isinstance(d, DType): return d
  if str(d) not in DTYPE_NAMES: raise CheckpointError(f"unknown dtype {d!r}; choose float32, float16 or bfloat16")
  return DTYPE_NAMES[str(d)]

# ---- the checkpoint object ----

@dataclass
class Checkpoint:
  config: ModelConfig
  state_dicts: dict[str, dict[str, Tensor]]    # component -> {diffusers name: lazy Tensor}
  path: str
  layout: str                                  # "single-file" (CompVis) or "diffusers"
  stored_dtypes: dict[str, str]                # component -> dtype(s) as stored in the file
  tokenizer_dirs: list[str|None]|None = None   # per text encoder, diffusers folders only
  quant: dict[str, dict[str, dict]]|None = None  # tinysd quantised files: component -> layer -> ops.quant metadata

  def __getitem__(self, component:str) -> dict[str, Tensor]: return self.state_dicts[component]
  def describe(self) -> str:
    c = self.config
    lines = [f"path: {self.path}", f"layout: {_LAYOUT_NAMES[self.layout]}",
             f"family: {c.family} (prediction: {c.scheduler.prediction_type})"]
    for name, sd in self.state_dicts.items():
      n = sum(t.numel() for t in sd.values())
      lines.append(f"{name}: {n/1e6:.1f}M params, {len(sd)} tensors, stored {self.stored_dtypes.get(name, '?')}")
    for name, layers in (self.quant or {}).items():
      modes = sorted({m["mode"] for m in layers.values()})
      lines.append(f"{name}: {len(layers)} layers quantised ({'/'.join(modes)})")
    u = c.unet
    lines.append(f"unet: in_channels {u.in_channels}, channels {u.block_out_channels}, layers/block {u.layers_per_block}, "
                 f"transformer depth {u.depths()}, heads {u.heads()}, context {u.cross_attention_dim}")
    for n, t in zip(_te_names(c), c.text_encoders):
      lines.append(f"{n}: hidden {t.hidden_size}, layers {t.num_hidden_layers}, heads {t.num_attention_heads}")
    return "\n".join(lines)

_LAYOUT_NAMES = {"single-file": "CompVis single file", "diffusers": "diffusers folder", "quantized": "tinysd quantised single file"}

def _few(keys, n=3) -> str:
  keys = sorted(keys)
  return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")

def _validate(where:str, got:dict[str, tuple], want:dict[str, tuple], rename=lambda k: k):
  # got/want: name -> shape. One error naming a few missing/unexpected keys with counts, or the first shape mismatch.
  missing, unexpected = [k for k in want if k not in got], [k for k in got if k not in want]
  if missing or unexpected:
    parts = ([f"{len(missing)} missing keys ({_few(map(rename, missing))})"] if missing else []) + \
            ([f"{len(unexpected)} unexpected keys ({_few(unexpected)})"] if unexpected else [])
    raise CheckpointError(f"{where}: " + " and ".join(parts))
  bad = [k for k in want if tuple(got[k]) != tuple(want[k])]
  if bad:
    k = bad[0]
    raise CheckpointError(f"{where}: shape mismatch for {rename(k)}: checkpoint has {tuple(got[k])}, config expects {tuple(want[k])}"
                          + (f" ({len(bad)} mismatched tensors)" if len(bad) > 1 else ""))

def _stored(ts) -> str: return "/".join(sorted({_READABLE.get(t.dtype, t.dtype.name) for t in ts}))

# ---- CompVis single files ----

def _normalise_compvis(raw:dict) -> dict:
  # very old SD1 files have transformers' CLIPTextModel keys without the text_model. level
  out = {}
  for k, v in raw.items():
    for p in ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer."):
      if k.startswith(p) and not k.startswith(p + "text_model."): k = p + "text_model." + k[len(p):]
    out[k] = v
  return out

def _compvis_config(shapes:dict[str, tuple], meta:dict, path, config:ModelConfig|None) -> tuple[ModelConfig, str]:
  # (config, family) of a normalised CompVis file from its key names, shapes and metadata alone
  family = detect_family(shapes)
  if config is None and "tinysd_config" in meta:
    try: config = config_from_json(meta["tinysd_config"])
    except ConfigError as e: raise CheckpointError(f"{path}: bad tinysd_config metadata ({e})") from None
  if config is None: config = infer_config(shapes, family)
  try: check(config)
  except ConfigError as e: raise CheckpointError(f"{path}: {e}") from None
  if _base(config.family) != family: raise CheckpointError(f"{path}: the config is for {config.family} but the file is a {family} checkpoint")
  return config, family

def _read_compvis(raw:dict, meta:dict, path, dtype, device, config:ModelConfig|None) -> Checkpoint:
  raw = _normalise_compvis(raw)
  config, family = _compvis_config({k: tuple(v.shape) for k, v in raw.items()}, meta, path, config)
  layout, shapes = compvis_layout(config), component_shapes(config)
  want = {ldm: _ldm_shape(shapes[c][k], op) for c, m in layout.items() for k, (ldm, op) in m.items()}
  unused = _sd2_unused(config)
  got = {k: tuple(v.shape) for k, v in raw.items() if k in want or not (_IGNORED.search(k) or (unused and unused.match(k)))}
  for k, shp in want.items():   # VAE attention stored as Linear (2-d) by some converters instead of CompVis' 1x1 conv
    if len(shp) == 4 and shp[2:] == (1, 1) and got.get(k) == shp[:2]: got[k] = shp
  _validate(str(path), got, want)
  if bad := [k for k in want if not dtypes.is_float(raw[k].dtype)]: raise CheckpointError(f"{path}: {bad[0]} is not a float tensor")
  sds = {}
  for c, m in layout.items():
    sds[c] = {}
    for k, (ldm, op) in m.items():
      t = _cast(raw[ldm], dtype, device)
      if op == "T": t = t.T
      elif op == "conv": t = t.reshape(t.shape[:2])
      elif isinstance(op, int): t = t[op*t.shape[0]//3:(op+1)*t.shape[0]//3]
      sds[c][k] = t
  stored = {c: _stored(raw[ldm] for ldm, _ in m.values()) for c, m in layout.items()}
  return Checkpoint(config, sds, str(path), "single-file", stored)

# ---- tinysd quantised files ----

QUANT_FORMAT = "tinysd-quant-pipeline"

def _read_quantized(raw:dict, meta:dict, path, dtype, device, config:ModelConfig|None) -> Checkpoint:
  # keys "<component>.<diffusers name>", a quantised layer's weight as weight.q/.scale[/.outliers] or weight.idx/.lut (ops/quant.py)
  from tinysd_ops.quant import QuantWeight
  try:
    config, quant = config or config_from_json(meta.get("tinysd_config")), _loads(meta.get("tinysd.quant"), "tinysd.quant")
    if not isinstance(quant, dict) or not all(isinstance(v, dict) and all(isinstance(m, dict) for m in v.values()) for v in quant.values()):
      raise ConfigError("tinysd.quant must map component -> layer -> metadata object")
  except ConfigError as e: raise CheckpointError(f"{path}: bad tinysd quantised-file metadata ({e})") from None
  sds, stored = {}, {}
  for c, want in component_shapes(config).items():
    want = dict(want)
    for layer, m in quant.get(c, {}).items():
      if want.pop(f"{layer}.weight", None) != tuple(m.get("shape", ())): raise CheckpointError(f"{path}: {c}.{layer} does not fit the config")
      try: want |= {f"{layer}.weight.{k}": tuple(shp) for k, (shp, _) in QuantWeight.layout(m).items()}
      except (KeyError, ValueError, TypeError, IndexError) as e: raise CheckpointError(f"{path}: bad quantisation metadata for {c}.{layer} ({e})") from None
    got = {k[len(c)+1:]: v for k, v in raw.items() if k.startswith(c + ".")}
    _validate(f"{path} ({c})", {k: tuple(v.shape) for k, v in got.items()}, want)
    sds[c] = {k: _cast(t, dtype, device) if dtypes.is_float(t.dtype) else t.to(device) for k, t in got.items()}
    stored[c] = _stored(got.values())
  if extra := [k for k in raw if k.split(".")[0] not in sds]: raise CheckpointError(f"{path}: {len(extra)} unexpected keys ({_few(extra)})")
  return Checkpoint(config, sds, str(path), "quantized", stored, quant=quant)

def write_quantized(state_dicts:dict[str, dict[str, Tensor]], quant:dict[str, dict[str, dict]], config:ModelConfig, path):
  """A tinysd quantised single file: every component's state dict (quantised layers as ops/quant.py stores them, float side tensors and
  the other float weights as given) with the config and the per-layer quantisation metadata in __metadata__."""
  tensors = {f"{c}.{k}": v for c, sd in state_dicts.items() for k, v in sd.items()}
  write_safetensors(tensors, path, {"format": QUANT_FORMAT, "tinysd_config": config_to_json(config), "tinysd.quant": json.dumps(quant)})

# ---- diffusers folders ----

_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")

def _component_files(d:pathlib.Path, prefer_fp16:bool) -> list[pathlib.Path]:
  variants = (".fp16", "", ".bf16") if prefer_fp16 else ("", ".fp16", ".bf16")
  for ext in ("safetensors", "bin"):
    for var in variants:
      for stem in _WEIGHT_STEMS:
        if (f := d / f"{stem}{var}.{ext}").is_file(): return [f]
        if (idx := d / f"{stem}.{ext}.index{var}.json").is_file():
          shards = sorted(set((_json(idx).get("weight_map") or {}).values()))
          if not shards: raise CheckpointError(f"{idx}: empty weight_map")
          return [d / s for s in shards]
  raise CheckpointError(f"{d}: no weights found (diffusion_pytorch_model.safetensors, model.safetensors, a .fp16 variant or a sharded index)")

_OLD_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

def _normalise_folder(component:str, sd:dict) -> dict:
  out = {}
  for k, v in sd.items():
    if component.startswith("text_encoder"):
      if k.endswith("position_ids"): continue
      # the Hub stores CLIPTextModel with text_model.*; transformers 5 saves it without that level
      if not k.startswith(("text_model.", "text_projection")): k = "text_model." + k
    elif component == "vae":
      k = k.removeprefix("first_stage_model.")
      if m := re.fullmatch(r"(.*mid_block\.attentions\.0\.)(query|key|value|proj_attn)\.(weight|bias)", k): k = f"{m[1]}{_OLD_VAE_ATTN[m[2]]}.{m[3]}"
      if re.search(r"mid_block\.attentions\.0\.to_.*weight$", k) and v.ndim == 4: v = v.reshape(v.shape[:2])   # conv-style attention weights
    out[k] = v
  return out

def _read_folder(p:pathlib.Path, dtype, device, config:ModelConfig|None) -> Checkpoint:
  if not (p/"model_index.json").is_file() and not (p/"unet"/"config.json").is_file():
    raise CheckpointError(f"{p}: not a checkpoint (a folder without model_index.json or unet/config.json)")
  cfg = config or read_diffusers_config(p)
  shapes = component_shapes(cfg)
  raw = {}
  for c in shapes:
    if not (p/c).is_dir(): raise CheckpointError(f"{p}: missing component folder {c}/")
    sd = {}
    for f in _component_files(p/c, dtype == dtypes.float16): sd |= read_tensors(f)[0]
    raw[c] = _normalise_folder(c, sd)
    _validate(f"{p/c}", {k: tuple(v.shape) for k, v in raw[c].items()}, shapes[c])
    if bad := [k for k in shapes[c] if not dtypes.is_float(raw[c][k].dtype)]: raise CheckpointError(f"{p/c}: {bad[0]} is not a float tensor")
  sds = {c: {k: _cast(t, dtype, device) for k, t in sd.items()} for c, sd in raw.items()}
  return Checkpoint(cfg, sds, str(p), "diffusers", {c: _stored(sd.values()) for c, sd in raw.items()}, _tokenizer_dirs(p, cfg))

def _tokenizer_dirs(p:pathlib.Path, cfg:ModelConfig) -> list[str|None]:
  return [str(p/d) if (p/d).is_dir() else None for d in ("tokenizer", "tokenizer_2")[:len(cfg.text_encoders)]]

# ---- entry point ----

def read_checkpoint(path, dtype="float32", config=None, device:str|None=None) -> Checkpoint:
  """Read a CompVis/A1111 single file (.safetensors, or .ckpt through a strict unpickler) or a diffusers folder into diffusers-named,
  lazy state dicts. dtype: "float32"/"float16"/"bfloat16" or None to keep what is stored. config: ModelConfig or a diffusers folder
  whose config.json files override detection (heads cannot be read from single-file weights)."""
  p = pathlib.Path(path)
  if not p.exists(): raise CheckpointError(f"{path}: no such file or directory")
  dt, device = _dtype(dtype), device or Device.DEFAULT
  if config is not None and not isinstance(config, ModelConfig): config = read_diffusers_config(config)
  if p.is_dir(): return _read_folder(p, dt, device, config)
  raw, meta = read_tensors(p)
  if not raw: raise CheckpointError(f"{path}: not a checkpoint (no tensors)")
  if meta.get("format") == QUANT_FORMAT: return _read_quantized(raw, meta, p, dt, device, config)
  return _read_compvis(raw, meta, p, dt, device, config)

def read_config(path) -> ModelConfig:
  """The config read_checkpoint(path) uses, from the config.json files or the safetensors header alone (no tensor is built or read):
  what the command line checks its arguments against before loading."""
  p = pathlib.Path(path)
  if not p.exists(): raise CheckpointError(f"{path}: no such file or directory")
  if p.is_dir():
    if not (p/"model_index.json").is_file() and not (p/"unet"/"config.json").is_file():
      raise CheckpointError(f"{p}: not a checkpoint (a folder without model_index.json or unet/config.json)")
    return read_diffusers_config(p)
  if not p.is_file(): raise CheckpointError(f"{path}: no such file")
  with open(p, "rb") as f: head = f.read(9)
  if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
    raw, meta = read_tensors(p)
    shapes = {k: tuple(v.shape) for k, v in raw.items()}
  else:
    _, header = _check_header(p, os.path.getsize(p))
    meta = m if isinstance(m := header.get("__metadata__"), dict) else {}
    shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__" and v["data_offsets"][1] > v["data_offsets"][0]}
  if not shapes: raise CheckpointError(f"{path}: not a checkpoint (no tensors)")
  if meta.get("format") == QUANT_FORMAT:
    try: return config_from_json(meta.get("tinysd_config"))
    except ConfigError as e: raise CheckpointError(f"{path}: bad tinysd quantised-file metadata ({e})") from None
  return _compvis_config(_normalise_compvis(shapes), meta, p, None)[0]

def read_tokenizers(path, config:ModelConfig) -> list:
  """The tokenizers a diffusers folder comes with (None where the bundled CLIP vocabulary is used), checked against the text encoders
  they feed: every id they can produce must index the token embedding, every sequence fit the position embedding."""
  from tinysd.tokenizer import CLIPTokenizer
  p = pathlib.Path(path)
  dirs = _tokenizer_dirs(p, config) if p.is_dir() else [None] * len(config.text_encoders)
  toks = [CLIPTokenizer.from_folder(d) if d is not None else None for d in dirs]
  for d, tok, te in zip(dirs, toks, config.text_encoders):
    if tok is None: continue
    if (top := max(tok.encoder.values())) >= te.vocab_size:
      raise CheckpointError(f"{d}: token id {top} does not fit the text encoder's {te.vocab_size} embeddings")
    if tok.max_length > te.max_position_embeddings:
      raise CheckpointError(f"{d}: model_max_length {tok.max_length} is longer than the text encoder's {te.max_position_embeddings} positions")
  return toks

# ---- export ----

def _storable(t:Tensor, dtype:DType) -> Tensor:
  # what goes to disk, as a computable tensor: bf16 as its uint16 bit pattern
  if dtype == dtypes.bfloat16:
    t = t.bitcast(dtypes.uint16).to(Device.DEFAULT) if t.dtype == dtypes.bfloat16 else _float_to_bf16_bits(_cast(t, dtypes.float32, Device.DEFAULT))
  else: t = _cast(t, dtype, Device.DEFAULT)
  return t.contiguous()

def write_safetensors(tensors:dict[str, Tensor], path, metadata:dict[str, str]|None=None, dtype=None, batch_bytes:int=1<<28):
  """Write tensors (lazy or not) into a safetensors file, atomically (temp file + rename, tinysd/outputs.py: mode from the umask),
  realising ~batch_bytes at a time so memory stays bounded. dtype casts float tensors."""
  path, dt = pathlib.Path(path), _dtype(dtype)
  items = sorted(tensors.items())
  out_dt = {k: dt if dt is not None and dtypes.is_float(t.dtype) else t.dtype for k, t in items}
  header, off = ({"__metadata__": metadata} if metadata else {}), 0
  for k, t in items:
    n = t.numel() * out_dt[k].itemsize
    header[k] = {"dtype": SAFE_NAMES[out_dt[k]], "shape": list(t.shape), "data_offsets": [off, off + n]}
    off += n
  hb = json.dumps(header, separators=(",", ":")).encode()
  hb += b" " * (-len(hb) % 8)
  def write(f, _):
    f.write(len(hb).to_bytes(8, "little") + hb)
    batch, size = [], 0
    for i, (k, t) in enumerate(items):
      if t.numel(): batch.append(_storable(t, out_dt[k])); size += t.numel() * out_dt[k].itemsize
      if batch and (size >= batch_bytes or i == len(items) - 1):
        Tensor.realize(*batch)   # one schedule per batch: a realize per tensor rescans every live tensor (quadratic in tinygrad)
        for r in batch: f.write(r.numpy().tobytes())
        batch, size = [], 0
  write_files([path], write)

def _check_state_dicts(state_dicts:dict, cfg:ModelConfig):
  shapes = component_shapes(cfg)
  if missing := [c for c in shapes if c not in state_dicts]: raise CheckpointError(f"state dicts lack components: {', '.join(missing)}")
  for c, want in shapes.items(): _validate(c, {k: tuple(v.shape) for k, v in state_dicts[c].items()}, want)

def to_compvis(state_dicts:dict[str, dict[str, Tensor]], cfg:ModelConfig) -> dict[str, Tensor]:
  """Diffusers-named state dicts -> one CompVis-layout dict (lazy)."""
  _check_state_dicts(state_dicts, cfg)
  out, packed = {}, {}
  for c, m in compvis_layout(cfg).items():
    for k, (ldm, op) in m.items():
      t = state_dicts[c][k]
      if isinstance(op, int): packed.setdefault(ldm, [None]*3)[op] = t
      else: out[ldm] = t.T if op == "T" else t.reshape(*t.shape, 1, 1) if op == "conv" else t
  out |= {k: v[0].cat(*v[1:]) for k, v in packed.items()}
  if _base(cfg.family) == "sd2":
    # A1111/ComfyUI take SD2's penultimate OpenCLIP block by counting from the end: add a zero (= identity) last block, identity projection
    L, p = cfg.text_encoders[0].num_hidden_layers, "cond_stage_model.model."
    for k in [k for k in out if k.startswith(f"{p}transformer.resblocks.{L-1}.")]:
      out[k.replace(f"resblocks.{L-1}.", f"resblocks.{L}.")] = _cast(Tensor.zeros(*out[k].shape), out[k].dtype, Device.DEFAULT)
    out[p + "text_projection"] = _cast(Tensor.eye(cfg.text_encoders[0].hidden_size), out[p + "positional_embedding"].dtype, Device.DEFAULT)
  return out

def write_single_file(state_dicts:dict[str, dict[str, Tensor]], config:ModelConfig, path, dtype=None):
  """Write a CompVis/A1111-layout .safetensors (what A1111, ComfyUI and diffusers' from_single_file read); the full tinysd config goes
  into __metadata__ so our own files read back with exactly this config."""
  write_safetensors(to_compvis(state_dicts, config), path, {"format": "pt", "tinysd_config": config_to_json(config)}, dtype)

_PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
              "sd1-inpaint": "StableDiffusionInpaintPipeline", "sd2-inpaint": "StableDiffusionInpaintPipeline",
              "sdxl-inpaint": "StableDiffusionXLInpaintPipeline"}
_SCHEDULERS = {"sd1": ("PNDMScheduler", {"skip_prk_steps": True}), "sd2": ("DDIMScheduler", {}),
               "sdxl": ("EulerDiscreteScheduler", {"interpolation_type": "linear"})}   # what the Hub's SD1.5 / SD2.1 / SDXL folders ship

def diffusers_configs(cfg:ModelConfig) -> dict[str, dict]:
  """config.json contents of each component folder (+ "model_index" and "scheduler") as diffusers/transformers write them."""
  L = len(cfg.vae.block_out_channels)
  out = {"unet": {"_class_name": "UNet2DConditionModel", **asdict(cfg.unet)},
         "vae": {"_class_name": "AutoencoderKL", **asdict(cfg.vae), "down_block_types": ["DownEncoderBlock2D"]*L,
                 "up_block_types": ["UpDecoderBlock2D"]*L}}
  idx = {"_class_name": _PIPELINES[cfg.family], "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
  for i, (n, t) in enumerate(zip(_te_names(cfg), cfg.text_encoders)):
    arch = "CLIPTextModelWithProjection" if t.projection_dim else "CLIPTextModel"
    out[n] = {"architectures": [arch], "model_type": "clip_text_model", "bos_token_id": 0, "pad_token_id": 1,
              **{k: v for k, v in asdict(t).items() if v is not None}}
    idx[n], idx["tokenizer" + n[len("text_encoder"):]] = ["transformers", arch], ["transformers", "CLIPTokenizer"]
  sched, extra = _SCHEDULERS[_base(cfg.family)]
  out["scheduler"] = {"_class_name": sched, **asdict(cfg.scheduler), **extra}
  idx["scheduler"] = ["diffusers", sched]
  if _base(cfg.family) == "sdxl": idx["force_zeros_for_empty_prompt"] = True
  else: idx |= {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
  return out | {"model_index": idx}

def write_diffusers_folder(state_dicts:dict[str, dict[str, Tensor]], config:ModelConfig, path, dtype=None, tokenizer_dirs=None,
                           index:dict|None=None, readme:str|None=None):
  """Write a diffusers pipeline folder (what from_pretrained reads). The folder must not exist yet; it appears only when complete.
  index: extra model_index.json entries (diffusers ignores keys starting with "_"); readme: a README.md for the folder."""
  from tinysd.tokenizer import CLIPTokenizer
  path = pathlib.Path(path)
  if path.exists() and (not path.is_dir() or any(path.iterdir())): raise CheckpointError(f"{path}: already exists and is not an empty folder")
  _check_state_dicts(state_dicts, config)
  cfgs = diffusers_configs(config)
  tmp = temp_dir(path)   # not mkdtemp: its 0700 would stay on the finished folder
  try:
    (tmp/"model_index.json").write_text(json.dumps(cfgs.pop("model_index") | (index or {}), indent=2))
    if readme is not None: (tmp/"README.md").write_text(readme, encoding="utf-8")
    (tmp/"scheduler").mkdir(); (tmp/"scheduler"/"scheduler_config.json").write_text(json.dumps(cfgs.pop("scheduler"), indent=2))
    for c, cj in cfgs.items():
      (tmp/c).mkdir()
      (tmp/c/"config.json").write_text(json.dumps(cj, indent=2))
      fn = "model.safetensors" if c.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
      write_safetensors(state_dicts[c], tmp/c/fn, {"format": "pt"}, dtype)
    for i, pad in enumerate(config.pad_token_ids):
      dst, src = tmp/("tokenizer" if i == 0 else f"tokenizer_{i+1}"), (tokenizer_dirs or [None]*len(config.pad_token_ids))[i]
      if src is not None: shutil.copytree(src, dst)
      else: CLIPTokenizer(pad_token_id=pad).save_folder(dst)   # the bundled CLIP vocabulary
    if path.exists(): path.rmdir()
    commit([(tmp, path)])
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise

def convert(src, dst, dtype=None, config=None):
  """Diffusers folder <-> single file (dst ending in .safetensors) conversion; dtype None keeps the stored dtypes."""
  if pathlib.Path(src).resolve() == pathlib.Path(dst).resolve(): raise CheckpointError("convert: source and destination are the same path")
  ck = read_checkpoint(src, dtype=None, config=config)
  if str(dst).endswith(".safetensors"): write_single_file(ck.state_dicts, ck.config, dst, dtype)
  else: write_diffusers_folder(ck.state_dicts, ck.config, dst, dtype, ck.tokenizer_dirs)
