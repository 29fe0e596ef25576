# Tiny randomly initialised diffusers/transformers pipelines saved the way real checkpoints are: a diffusers folder
# (StableDiffusion[XL][Inpaint]Pipeline.save_pretrained) or a CompVis/A1111 single .safetensors file with the quirks real files carry.
# The CompVis layout is written here independently of tinysd.checkpoint and checked against diffusers' own single-file converters.
import copy, functools, pathlib, re
import torch

# Tiny configs. Head counts follow the conventions tinysd uses when a single file has no config (heads cannot be read from weights):
# SD1 UNet 8 heads per level, SD2/SDXL UNet head dim 64, CLIP head dim 64 -- so single files load with the very same config.
CLIP = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1, layer_norm_eps=1e-5)
TINY = {
  "sd1": dict(
    unet=dict(block_out_channels=(32, 64, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",)*2 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",)*2, cross_attention_dim=128, attention_head_dim=8),
    vae=dict(block_out_channels=(32, 64), layers_per_block=1, scaling_factor=0.18215),
    text_encoder=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, hidden_act="quick_gelu"),
    scheduler=("PNDMScheduler", dict(skip_prk_steps=True))),
  "sd2": dict(
    unet=dict(block_out_channels=(64, 128), layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",)*2,
              up_block_types=("CrossAttnUpBlock2D",)*2, cross_attention_dim=128, attention_head_dim=(1, 2), use_linear_projection=True),
    vae=dict(block_out_channels=(32, 64), layers_per_block=2, scaling_factor=0.18215),
    text_encoder=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2, hidden_act="gelu"),
    scheduler=("DDIMScheduler", dict(prediction_type="v_prediction"))),
  "sdxl": dict(
    unet=dict(block_out_channels=(32, 64, 128), layers_per_block=1, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",)*2,
              up_block_types=("CrossAttnUpBlock2D",)*2 + ("UpBlock2D",), transformer_layers_per_block=(1, 1, 2), attention_head_dim=(1, 1, 2),
              cross_attention_dim=64+128, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
              projection_class_embeddings_input_dim=6*8+96),
    vae=dict(block_out_channels=(32, 32, 64), layers_per_block=1, scaling_factor=0.13025),
    text_encoder=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, hidden_act="quick_gelu"),
    text_encoder_2=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu", projection_dim=96),
    scheduler=("EulerDiscreteScheduler", dict(interpolation_type="linear"))),
}
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                 set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading")
PAD = {"sd1": (49407,), "sd2": (0,), "sdxl": (49407, 0)}   # tokenizer pad ids: "<|endoftext|>" for OpenAI CLIP, "!" for OpenCLIP

@functools.cache
def _hf_tokenizer(pad_token_id:int):
  import tempfile, transformers
  from tinysd.tokenizer import CLIPTokenizer
  with tempfile.TemporaryDirectory() as d:
    CLIPTokenizer(pad_token_id=pad_token_id).save_folder(d)   # bundled CLIP vocab (tinysd/data) as vocab.json + merges.txt
    return transformers.CLIPTokenizer.from_pretrained(d)

def _rerandomise(model:torch.nn.Module):
  # torch/transformers init norms to 1/0 and (some) biases to 0: perturb every 1-d parameter so a swapped or dropped one shows in parity tests
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim <= 1: p.add_(0.1 * torch.randn_like(p))
      elif p.std() == 0: p.normal_(0, 0.02)
  return model.eval()

def make_tiny_pipeline(family="sd1", inpaint=False, seed=0):
  """A diffusers pipeline (torch, fp32, eval) with tiny random weights; `family` in sd1/sd2/sdxl."""
  import diffusers, transformers
  t = TINY[family]
  with torch.random.fork_rng():
    torch.manual_seed(seed)
    unet = _rerandomise(diffusers.UNet2DConditionModel(sample_size=8, in_channels=9 if inpaint else 4, out_channels=4, **t["unet"]))
    L = len(t["vae"]["block_out_channels"])
    vae = _rerandomise(diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",)*L, up_block_types=("UpDecoderBlock2D",)*L,
                                               latent_channels=4, sample_size=8*2**(L-1), **t["vae"]))
    tes = [_rerandomise(cls(transformers.CLIPTextConfig(**CLIP, **t[name])))
           for name, cls in (("text_encoder", transformers.CLIPTextModel), ("text_encoder_2", transformers.CLIPTextModelWithProjection)) if name in t]
  sched_cls, sched_kw = t["scheduler"]
  scheduler = getattr(diffusers, sched_cls).from_config({**SCHEDULER, **sched_kw})
  toks = [_hf_tokenizer(p) for p in PAD[family]]
  if family == "sdxl":
    cls = diffusers.StableDiffusionXLInpaintPipeline if inpaint else diffusers.StableDiffusionXLPipeline
    extra = {"requires_aesthetics_score": False} if inpaint else {}
    return cls(vae=vae, text_encoder=tes[0], text_encoder_2=tes[1], tokenizer=toks[0], tokenizer_2=toks[1], unet=unet, scheduler=scheduler, **extra)
  cls = diffusers.StableDiffusionInpaintPipeline if inpaint else diffusers.StableDiffusionPipeline
  return cls(vae=vae, text_encoder=tes[0], tokenizer=toks[0], unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
             requires_safety_checker=False)

def make_tiny_pipeline_folder(path, family="sd1", inpaint=False, seed=0, dtype=None, variant=None, max_shard_size=None,
                              pipeline=None) -> pathlib.Path:
  """Write a tiny pipeline as save_pretrained does (model_index.json, unet/, vae/, text_encoder[_2]/, tokenizer[_2]/, scheduler/).
  dtype: torch dtype of the stored weights; variant: e.g. "fp16" -> *.fp16.safetensors; max_shard_size: e.g. "100KB" -> sharded + index;
  pipeline: save this (make_tiny_pipeline's) pipeline instead of building one."""
  pipe = pipeline if pipeline is not None else make_tiny_pipeline(family, inpaint, seed)
  if dtype is not None: pipe = copy.deepcopy(pipe).to(dtype)
  kw = {"variant": variant} | ({"max_shard_size": max_shard_size} if max_shard_size else {})
  pipe.save_pretrained(path, safe_serialization=True, **kw)
  return pathlib.Path(path)

# ---- CompVis / A1111 single-file layout, written from the torch modules' structure ----

def _resnet_ldm(k:str) -> str:
  for a, b in (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"), ("norm2", "out_layers.0"),
               ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")): k = re.sub(rf"^{a}\.", b + ".", k)
  return k

def _ldm_unet(unet) -> dict:
  sd, out, lpb = unet.state_dict(), {}, unet.config.layers_per_block
  def put(dst, src, rename=lambda k: k):
    ks = [k for k in sd if k.startswith(src + ".")]
    assert ks, src
    for k in ks: out[dst + "." + rename(k[len(src)+1:])] = sd.pop(k)
  for dst, src in (("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"), ("input_blocks.0.0", "conv_in"),
                   ("out.0", "conv_norm_out"), ("out.2", "conv_out")): put(dst, src)
  if unet.config.addition_embed_type == "text_time": put("label_emb.0.0", "add_embedding.linear_1"); put("label_emb.0.2", "add_embedding.linear_2")
  for l, blk in enumerate(unet.down_blocks):
    for j in range(len(blk.resnets)):
      put(f"input_blocks.{1 + l*(lpb+1) + j}.0", f"down_blocks.{l}.resnets.{j}", _resnet_ldm)
      if getattr(blk, "attentions", None): put(f"input_blocks.{1 + l*(lpb+1) + j}.1", f"down_blocks.{l}.attentions.{j}")
    if blk.downsamplers: put(f"input_blocks.{(l+1)*(lpb+1)}.0.op", f"down_blocks.{l}.downsamplers.0.conv")
  put("middle_block.0", "mid_block.resnets.0", _resnet_ldm); put("middle_block.1", "mid_block.attentions.0")
  put("middle_block.2", "mid_block.resnets.1", _resnet_ldm)
  for u, blk in enumerate(unet.up_blocks):
    has_attn = bool(getattr(blk, "attentions", None))
    for j in range(len(blk.resnets)):
      put(f"output_blocks.{u*(lpb+1) + j}.0", f"up_blocks.{u}.resnets.{j}", _resnet_ldm)
      if has_attn: put(f"output_blocks.{u*(lpb+1) + j}.1", f"up_blocks.{u}.attentions.{j}")
    if blk.upsamplers: put(f"output_blocks.{u*(lpb+1) + lpb}.{2 if has_attn else 1}.conv", f"up_blocks.{u}.upsamplers.0.conv")
  assert not sd, f"unmapped UNet keys {list(sd)[:5]}"
  return out

def _ldm_vae(vae) -> dict:
  sd, out = vae.state_dict(), {}
  L = len(vae.config.block_out_channels)
  def put(dst, src):
    for k in [k for k in sd if k.startswith(src + ".")]:
      v, rest = sd.pop(k), k[len(src)+1:].replace("conv_shortcut", "nin_shortcut")
      m = re.fullmatch(r"(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", rest)
      if m: rest = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[m[1]] + "." + m[2]
      out[dst + "." + rest] = v[:, :, None, None] if m and m[1] != "group_norm" and m[2] == "weight" else v   # CompVis: 1x1 convs
  for x in ("encoder", "decoder"):
    for n in ("conv_in", "conv_out"): put(f"{x}.{n}", f"{x}.{n}")
    put(f"{x}.norm_out", f"{x}.conv_norm_out")
    put(f"{x}.mid.block_1", f"{x}.mid_block.resnets.0"); put(f"{x}.mid.attn_1", f"{x}.mid_block.attentions.0")
    put(f"{x}.mid.block_2", f"{x}.mid_block.resnets.1")
  for i, blk in enumerate(vae.encoder.down_blocks):
    for j in range(len(blk.resnets)): put(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
    if blk.downsamplers: put(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
  for i, blk in enumerate(vae.decoder.up_blocks):   # CompVis numbers decoder levels from the output side
    for j in range(len(blk.resnets)): put(f"decoder.up.{L-1-i}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}")
    if blk.upsamplers: put(f"decoder.up.{L-1-i}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
  put("quant_conv", "quant_conv"); put("post_quant_conv", "post_quant_conv")
  assert not sd, f"unmapped VAE keys {list(sd)[:5]}"
  return out

def _hf_clip(te) -> dict:
  # transformers 5 saves CLIPTextModel without the text_model. prefix that CompVis files (and the Hub) carry
  return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in te.state_dict().items()}

def _open_clip(te, extra_block:bool) -> dict:
  sd, out, H = _hf_clip(te), {}, te.config.hidden_size
  for k, v in sd.items():
    if m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", k):
      i, rest = m.groups()
      if re.fullmatch(r"self_attn\.[qkv]_proj\.(weight|bias)", rest): continue   # packed below
      rest = (rest.replace("self_attn.out_proj", "attn.out_proj").replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2")
                  .replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
      out[f"transformer.resblocks.{i}.{rest}"] = v
    else:
      out[{"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
           "text_model.embeddings.position_embedding.weight": "positional_embedding", "text_model.final_layer_norm.weight": "ln_final.weight",
           "text_model.final_layer_norm.bias": "ln_final.bias", "text_projection.weight": "text_projection"}[k]] = \
        v.T.contiguous() if k == "text_projection.weight" else v
  for i in range(te.config.num_hidden_layers):
    for w in ("weight", "bias"):
      out[f"transformer.resblocks.{i}.attn.in_proj_{w}"] = torch.cat([sd[f"text_model.encoder.layers.{i}.self_attn.{p}_proj.{w}"] for p in "qkv"])
  out["logit_scale"] = torch.tensor(4.6052)
  if extra_block:   # SD2 files hold all 24 OpenCLIP-H blocks (+ its projection); diffusers' 23-layer encoder stops at the penultimate one
    L = te.config.num_hidden_layers
    for k in [k for k in out if k.startswith(f"transformer.resblocks.{L-1}.")]:
      out[k.replace(f"resblocks.{L-1}.", f"resblocks.{L}.")] = torch.randn_like(out[k])
    out["text_projection"] = torch.randn(H, H)
  return out

def compvis_state_dict(pipe, family:str, extras=True) -> dict:
  """The pipeline's weights in the CompVis layout of an A1111 single file (+ EMA/training/buffer keys real files have if extras)."""
  sd = {"model.diffusion_model." + k: v for k, v in _ldm_unet(pipe.unet).items()}
  sd |= {"first_stage_model." + k: v for k, v in _ldm_vae(pipe.vae).items()}
  if family == "sd1": sd |= {"cond_stage_model.transformer." + k: v for k, v in _hf_clip(pipe.text_encoder).items()}
  elif family == "sd2": sd |= {"cond_stage_model.model." + k: v for k, v in _open_clip(pipe.text_encoder, extra_block=True).items()}
  else:
    sd |= {"conditioner.embedders.0.transformer." + k: v for k, v in _hf_clip(pipe.text_encoder).items()}
    sd |= {"conditioner.embedders.1.model." + k: v for k, v in _open_clip(pipe.text_encoder_2, extra_block=False).items()}
  _check_with_diffusers(sd, pipe, family)
  if extras:
    te = "conditioner.embedders.0.transformer." if family == "sdxl" else "cond_stage_model.transformer."
    if family != "sd2": sd[te + "text_model.embeddings.position_ids"] = torch.arange(77)[None]   # int64 buffer, as in real files
    if family != "sdxl":
      betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64)**2
      ac = torch.cumprod(1 - betas, 0)
      sd |= {"betas": betas.float(), "alphas_cumprod": ac.float(), "alphas_cumprod_prev": torch.cat([torch.ones(1), ac[:-1].float()]),
             "sqrt_alphas_cumprod": ac.sqrt().float(), "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt().float(),
             "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32)}
      # EMA copies: flattened names, different values (a loader must take model.diffusion_model.*, not these)
      sd |= {"model_ema." + k[len("model."):].replace(".", ""): v + 1 for k, v in sd.items() if k.startswith("model.diffusion_model.")}
  return sd

def _check_with_diffusers(sd:dict, pipe, family:str):
  # diffusers' own single-file converters (CompVis -> diffusers) must give back every tensor of the pipeline exactly
  from diffusers.loaders import single_file_utils as sfu
  def same(got:dict, want:dict, what:str, ignore=()):
    got = {k: v for k, v in got.items() if not any(re.match(p, k) for p in ignore)}
    assert got.keys() == want.keys(), (what, sorted(got.keys() ^ want.keys())[:8])
    for k in want: assert got[k].shape == want[k].shape and torch.equal(got[k], want[k]), (what, k)
  same(sfu.convert_ldm_unet_checkpoint(sd, dict(pipe.unet.config)), pipe.unet.state_dict(), "unet")
  same(sfu.convert_ldm_vae_checkpoint(sd, dict(pipe.vae.config)), pipe.vae.state_dict(), "vae")
  if family == "sd1": same(sfu.convert_ldm_clip_checkpoint(sd), _hf_clip(pipe.text_encoder), "text_encoder")
  elif family == "sd2":
    L = pipe.text_encoder.config.num_hidden_layers   # the extra (unused) last block and projection have nowhere to go in diffusers' model
    same(sfu.convert_open_clip_checkpoint(pipe.text_encoder, sd, prefix="cond_stage_model.model."), _hf_clip(pipe.text_encoder), "text_encoder",
         ignore=(rf"text_model\.encoder\.layers\.{L}\.", r"text_projection\.weight$"))
  else:
    same(sfu.convert_ldm_clip_checkpoint(sd), _hf_clip(pipe.text_encoder), "text_encoder")
    same(sfu.convert_open_clip_checkpoint(pipe.text_encoder_2, sd, prefix="conditioner.embedders.1.model."), _hf_clip(pipe.text_encoder_2),
         "text_encoder_2")

def family_of(pipe) -> str:
  return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd2" if pipe.text_encoder.config.hidden_act == "gelu" else "sd1"

def make_tiny_single_file(path, family="sd1", inpaint=False, seed=0, dtype=None, extras=True, return_pipeline=False, pipeline=None):
  """Write a tiny pipeline as a CompVis-layout single .safetensors file (the A1111/civitai format). dtype: torch dtype of float tensors;
  pipeline: write this one (its family and inpainting-ness win) instead of building one.
  Returns the path, or (path, diffusers pipeline holding the same weights) if return_pipeline."""
  from safetensors.torch import save_file
  pipe = pipeline if pipeline is not None else make_tiny_pipeline(family, inpaint, seed)
  family = family_of(pipe)
  sd = compvis_state_dict(pipe, family, extras)
  if dtype is not None: sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
  save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
  return (pathlib.Path(path), pipe) if return_pipeline else pathlib.Path(path)
