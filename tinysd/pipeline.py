# txt2img / img2img / inpaint on top of the tokenizer, models, samplers and checkpoint reader. CFG and per-shape JIT live here.
from __future__ import annotations
from contextlib import contextmanager
import numpy as np
from PIL import Image
from tinygrad import Tensor, TinyJit, Device, dtypes
from tinygrad.helpers import tqdm
from tinysd import prompt as prompt_syntax, samplers
from tinysd_ops.tg import capture_jit, free_jit_memory, lazy_graph, restore_lazy, free_cached_memory, placeholder_init, random_init
from tinysd.configs import ModelConfig
from tinysd.tokenizer import CLIPTokenizer
from tinysd.models.clip import CLIPTextModel
from tinysd.models.unet import UNet2DConditionModel
from tinysd.models.vae import AutoencoderKL

LOWMEM_VAE_TILE = 32   # latent pixels (256 image px): a 512x512 decode in 9 overlapping tiles
MAX_SIDE = 4096   # pixels; beyond this the activations alone exceed any machine we target

class InputError(ValueError):
  """Bad user input (sizes, steps, guidance, images): the CLI prints it as one line and exits 2."""

def check_generation_args(width:int, height:int, steps:int, guidance_scale:float, sampler:str, batch_size:int=1, train_timesteps:int|None=None):
  """InputError for arguments no run can use; train_timesteps (the scheduler's num_train_timesteps) bounds steps, as diffusers does."""
  for name, v in (("width", width), ("height", height)):
    if v % 8 != 0 or v <= 0: raise InputError(f"{name} must be a positive multiple of 8, got {v}")
    if v > MAX_SIDE: raise InputError(f"{name} {v} is too large (max {MAX_SIDE})")
  if steps < 1: raise InputError(f"steps must be >= 1, got {steps}")
  if train_timesteps is not None and steps > train_timesteps:   # more would repeat timesteps (spacing rounds them together)
    raise InputError(f"steps must be <= {train_timesteps}, the model's training timesteps, got {steps}")
  if not 0 <= guidance_scale < float("inf"): raise InputError(f"guidance scale must be finite and >= 0, got {guidance_scale}")
  if batch_size < 1: raise InputError(f"batch size must be >= 1, got {batch_size}")
  if sampler not in samplers.SAMPLERS: raise InputError(f"unknown sampler '{sampler}'; choose from: {', '.join(samplers.SAMPLERS)}")

def _trim_heap():
  # scheduling a model leaves tens of MB of freed Python/C heap behind; hand it back before the next model comes in (glibc only)
  import gc, ctypes
  gc.collect()
  try: ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError): pass

def te_name(i:int) -> str: return "text_encoder" if i == 0 else f"text_encoder_{i+1}"   # diffusers' component names

def check_strength(strength:float):
  if not 0 <= strength <= 1: raise InputError(f"strength must be in [0, 1], got {strength}")

def seeded_noise(seed:int, n:int, shape:tuple[int, ...]) -> np.ndarray:
  # one generator per image (seed+i) so image i of a batch can be reproduced alone, on any backend
  return np.stack([np.random.default_rng(seed + i).standard_normal(shape, dtype=np.float32) for i in range(n)])

def to_pil(images:np.ndarray) -> list[Image.Image]:
  return [Image.fromarray((np.clip(im, 0, 1) * 255).round().astype(np.uint8)) for im in images]

class StableDiffusion:
  def __init__(self, config:ModelConfig, tokenizers:list[CLIPTokenizer], text_encoders:list[CLIPTextModel], unet:UNet2DConditionModel,
               vae:AutoencoderKL, dtype=dtypes.float32, device:str|None=None, compute_dtype=None):
    self.config, self.tokenizers, self.text_encoders, self.unet, self.vae = config, tokenizers, text_encoders, unet, vae
    self.dtype, self.device = dtype, device or Device.DEFAULT   # dtype: how weights are held in memory
    self.compute_dtype = compute_dtype or dtype                  # what the models compute in (weights are cast inside the kernels)
    self.gemm_precision = "f32"   # CPU fast path: "bf16" = GEMM operands rounded to bf16, fp32 accumulate (ops/cpu.py precision)
    if self.compute_dtype == dtypes.bfloat16 and self.device.split(":")[0] == "CPU":
      # tinygrad cannot compute in bf16 on the CPU (clang 14 has no __bf16 on x86): bf16 compute there means fp32 tensors whose GEMMs
      # and convs run on AVX512-BF16 products
      from tinysd_ops import cpu
      if not cpu.bf16_available(): raise InputError("bfloat16 compute on the CPU needs AVX512-BF16 and the CPU fast path (TINYSD_KERNELS not generic)")
      self.compute_dtype, self.gemm_precision = dtypes.float32, "bf16"
    self.clip_skip = 1   # A1111's CLIP skip: 1 = last layer, 2 = penultimate, ... (see _encoder_fn)
    self.force_zeros_for_empty_prompt = config.family.startswith("sdxl")   # diffusers' SDXL default; load() reads model_index.json
    self._jits: dict[tuple, TinyJit] = {}
    self._sources: dict[str, list[tuple[Tensor, object]]] | None = None   # lowmem: component -> (parameter, its lazy file-read graph)
    self._quant: dict[str, str] = {}   # component -> quantisation mode(s), for quantised pipelines
    self.attention_chunk: int | None = 1024   # split attention (ops/attention.py), tiles of this many queries x keys (less memory, and faster on CPU); None = plain SDPA
    self.compress_shortcuts: str | None = None   # "fp16" / "int8": UNet skip tensors held compressed between down and up path (ops/shortcuts.py)
    self.vae_tile: int | None = None   # tiled VAE decode/encode (ops/tiling.py), tiles of this many latent pixels overlapping by a quarter

  @contextmanager
  def resident(self, name:str):
    """Just-in-time residency (Apple's reduceMemory): in lowmem mode a model's weights are read from the memory-mapped checkpoint right
    before use and released right after, so the text encoder, UNet and VAE are never in memory together. A no-op otherwise."""
    from tinysd_ops.cpu import precision
    if self._sources is None or name not in self._sources:
      with precision(self.gemm_precision): yield
      return
    realize_weights([p for p, _ in self._sources[name]])
    present([p for p, _ in self._sources[name]], self.compute_dtype)
    try:
      with precision(self.gemm_precision): yield
    finally:
      for p, lazy in self._sources[name]: restore_lazy(p, lazy)           # the realised buffer loses its last reference
      self._jits = {k: v for k, v in self._jits.items() if k[0] != name}  # captured JITs hold the weight buffers too
      free_cached_memory(self.device)                                     # tinygrad keeps freed blocks for reuse
      _trim_heap()

  @property
  def tokenizer(self) -> CLIPTokenizer: return self.tokenizers[0]
  @property
  def text_encoder(self) -> CLIPTextModel: return self.text_encoders[0]

  # ** conditioning

  def encode_prompt(self, prompts:list[str]|str) -> Tensor:
    return self._encode(prompts)[0]

  def _encode(self, prompts:list[str]|str) -> tuple[Tensor, Tensor|None]:
    """(context (B, 77·K, D), pooled text embeds for SDXL or None), prompts in A1111's syntax (tinysd/prompt.py): each prompt in K chunks
    of 75 tokens (K the most any prompt needs; shorter prompts padded with empty chunks, as A1111 pads the negative prompt), every chunk
    encoded alone, emphasis applied per chunk, outputs concatenated along the sequence; SDXL's pooled embeds come from the first chunk.
    A prompt without syntax of at most 75 tokens is one chunk holding exactly the ids the tokenizer gives."""
    if isinstance(prompts, str): prompts = [prompts]
    layers = min(c.num_hidden_layers for c in self.config.text_encoders)
    if not isinstance(self.clip_skip, int) or not 1 <= self.clip_skip <= layers:
      raise InputError(f"clip skip must be an integer in [1, {layers}], got {self.clip_skip}")
    parsed = [prompt_syntax.parse(p) for p in prompts]
    per_te = [[prompt_syntax.chunks(p, tok) for p in parsed] for tok in self.tokenizers]   # per tokenizer: SDXL's 2nd splits "!" off
    k = max(len(c) for rows in per_te for c in rows)
    ctxs, pooled = [], None
    for i, (tok, te, penultimate, rows) in enumerate(zip(self.tokenizers, self.text_encoders, self.config.clip_skip_penultimate, per_te)):
      framed = [prompt_syntax.frame(tok, ids, ws) for row in rows for ids, ws in row + [([], [])] * (k - len(row))]   # prompt-major
      ids, weights = [f[0] for f in framed], [f[1] for f in framed]
      name = te_name(i)
      if (jit := self._jits.get(key := (name, len(ids), self.clip_skip))) is None:
        jit = self._jits[key] = capture_jit(self._encoder_fn(te, penultimate, self.clip_skip))
      with self.resident(name): ctx, *proj = (t.clone().realize() for t in jit(Tensor(np.array(ids, dtype=np.int32), device=self.device).realize()))
      # copies above: a replayed TinyJit writes its outputs into the same buffers every call
      if any(w != 1 for ws in weights for w in ws):   # no syntax, no change: not even the (exactly 1) mean ratio is applied
        ctx = prompt_syntax.emphasis(ctx.float(), Tensor(np.array(weights, dtype=np.float32), device=self.device)).cast(ctx.dtype)
      ctxs.append(ctx.reshape(len(prompts), k * ctx.shape[1], ctx.shape[2]))
      if proj: pooled = proj[0].reshape(len(prompts), k, -1)[:, 0]
    ctx = ctxs[0] if len(ctxs) == 1 else Tensor.cat(*ctxs, dim=-1)
    return ctx.cast(self.compute_dtype).realize(), None if pooled is None else pooled.cast(self.compute_dtype).realize()

  @staticmethod
  def _encoder_fn(te:CLIPTextModel, penultimate:bool, clip_skip:int=1):
    # clip_skip n conditions on transformers' hidden_states[-n] through the final layer norm, as A1111 does for SD1 (A1111 ignores it on
    # SD2; tinysd applies it there too). Penultimate encoders (SDXL) already take hidden_states[-2], without the norm: n <= 2 is that,
    # a larger n goes deeper the same way.
    def encode(ids:Tensor) -> list[Tensor]:
      out = te(ids)
      if clip_skip > (2 if penultimate else 1):
        hidden = te.hidden_state(ids, clip_skip)
        if not penultimate: hidden = te.text_model.final_layer_norm(hidden)
      else: hidden = out.penultimate_hidden_state if penultimate else out.last_hidden_state
      outs = [hidden] if out.text_embeds is None else [hidden, out.text_embeds]
      return [_cpu_attention(t).contiguous().realize() for t in outs]
    return encode

  # ** denoising

  def _step_fn(self, cfg:bool):
    def step(x:Tensor, t:Tensor, ctx:Tensor, g:Tensor, extra:Tensor|None, text_embeds:Tensor|None, time_ids:Tensor|None) -> Tensor:
      from tinysd_ops.shortcuts import install
      install(self.unet, self.compress_shortcuts)   # read while the graph is traced (JIT calls 1 and 2); the JIT key holds the mode
      inp = x if extra is None else x.cat(extra, dim=1)   # 9-channel inpainting UNets take [latents, mask, masked-image latents]
      kw = {} if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
      out = self.unet((inp.cat(inp) if cfg else inp).cast(self.compute_dtype), t, ctx, **kw).float()
      if cfg:
        uncond, cond = out.chunk(2)
        out = uncond + g * (cond - uncond)
      return self._rewrite(out).realize()
    return step

  def _rewrite(self, out:Tensor) -> Tensor:
    """The graph rewrites from ops/ that are switched on, applied to a lazy output right before it is realised."""
    out = _cpu_attention(out)
    if self.attention_chunk:
      from tinysd_ops.attention import install
      out = install(out, q_chunk=self.attention_chunk, k_chunk=self.attention_chunk)
    return out

  def denoiser(self, ctx:Tensor, guidance_scale:float, extra:np.ndarray|None=None, text_embeds:Tensor|None=None, time_ids:Tensor|None=None):
    """model(x, t) for the samplers: numpy in, numpy out; CFG batched as [uncond, cond], and none at guidance <= 1 (see _conditioning)."""
    cfg = guidance_scale > 1
    g = Tensor([guidance_scale], dtype=dtypes.float32, device=self.device).realize()
    ex = None if extra is None else Tensor(extra.astype(np.float32), device=self.device).realize()
    def model(x:np.ndarray, t:float) -> np.ndarray:
      key = ("unet", x.shape, cfg, ctx.shape, None if ex is None else ex.shape, text_embeds is not None, self.attention_chunk, self.compress_shortcuts)
      if (jit := self._jits.get(key)) is None: jit = self._jits[key] = capture_jit(self._step_fn(cfg))
      xt = Tensor(x.astype(np.float32), device=self.device).realize()
      tt = Tensor([float(t)], dtype=dtypes.float32, device=self.device).realize()
      return jit(xt, tt, ctx, g, ex, text_embeds, time_ids).numpy()
    return model

  def _conditioning(self, prompt, negative_prompt, batch_size:int, guidance_scale:float, width:int, height:int):
    prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
    negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    # diffusers' do_classifier_free_guidance: at guidance <= 1 (0 for Turbo models) the prompt alone conditions, unguided, and the
    # negative prompt is not used; a guidance in (0, 1) is not applied either
    cfg = guidance_scale > 1
    # SDXL's force_zeros_for_empty_prompt (diffusers' negative_prompt=None; A1111 on SDXL): no negative prompt = zero uncond embeddings
    zeros = cfg and self.force_zeros_for_empty_prompt and all(n == "" for n in negs)
    ctx, pooled = self._encode(negs + prompts if cfg and not zeros else prompts)
    if zeros: ctx, pooled = ctx.zeros_like().cat(ctx).realize(), None if pooled is None else pooled.zeros_like().cat(pooled).realize()
    time_ids = None
    if pooled is not None:   # SDXL micro-conditioning: original size, crop top-left, target size
      time_ids = Tensor([[height, width, 0, 0, height, width]] * pooled.shape[0], dtype=dtypes.float32, device=self.device).cast(self.compute_dtype).realize()
    return prompts, ctx, pooled, time_ids

  def _run(self, model, x:np.ndarray, steps:int, sampler:str, seed:int, start:int=0, progress:bool=False, blend=None, ancestral_noise=None,
           sched=None, callback=None) -> np.ndarray:
    """callback(step, total, latents) after every model call (step 1..total); returning False stops sampling there (the latents so far
    are the result); an exception it raises propagates (how a server drops a job whose client went away)."""
    if ancestral_noise is None:
      rng = np.random.default_rng(seed + 1_000_003)   # ancestral noise stream, separate from x_T's
      ancestral_noise = lambda shape: rng.standard_normal(shape, dtype=np.float32)
    sched = sched or samplers.schedule(sampler, steps, self.config.scheduler)
    calls = len(sched.timesteps) - start               # PLMS makes one more model call than steps
    bar = tqdm(total=calls, desc="sampling", disable=not progress, unit="it")
    with self.resident("unet"):
      gen, k = samplers.SAMPLERS[sampler](model, x, sched, noise=ancestral_noise, start=start), start
      x = next(gen)
      while True:
        k += 1
        bar.update(1)
        if blend is not None: x = blend(k, x)
        if callback is not None and callback(k - start, calls, x) is False: break
        try: x = gen.send(x)   # the (blended) latents go back into the sampler: its next step starts from them
        except StopIteration: break
    return x

  def decode(self, latents:np.ndarray) -> np.ndarray:
    """Scaled latents -> (B,H,W,3) in [0,1]. The SD VAE decoder can overflow in fp16 on real images: on a non-finite result the VAE is
    upcast to fp32 (losslessly, and for good) and the decode repeated, so fp16 never returns a black or NaN image."""
    z = Tensor(latents.astype(np.float32), device=self.device) / self.vae.scaling_factor
    with self.resident("vae"):
      img = self._decode(z.cast(self.vae_dtype))
      if not np.isfinite(img).all() and self.vae_dtype != dtypes.float32:
        self.upcast_vae()
        img = self._decode(z)
    return np.clip((img + 1) / 2, 0, 1).transpose(0, 2, 3, 1)

  def _decode(self, z:Tensor) -> np.ndarray:
    if not self.vae_tile or (z.shape[2] <= self.vae_tile and z.shape[3] <= self.vae_tile): return self._decode_once(z)
    from tinysd_ops.tiling import decode_tiled
    return decode_tiled(self.vae, z, self.vae_tile, self.vae_tile // 4, rewrite=self._rewrite, decode=self._decode_once).float().numpy()

  def _decode_once(self, z:Tensor) -> np.ndarray:
    # through a JIT per latent shape that captures at once: its memory plan covers every buffer (an eager realize of a 512-px decode
    # on the CPU kernels would hold all activations at once); the planned arena is dropped after each decode (one decode per image)
    key = ("vae", "decode", z.shape, self.vae_dtype, self.attention_chunk)
    if (jit := self._jits.get(key)) is None: jit = self._jits[key] = capture_jit(lambda z: self._rewrite(self.vae.decode(z).float()).realize())
    try: return jit(z.contiguous().realize()).numpy()
    finally: free_jit_memory(jit)

  @property
  def vae_dtype(self): return self.vae.decoder.conv_in.weight.dtype

  def upcast_vae(self):
    from tinygrad.nn.state import get_parameters
    if self._sources is not None and "vae" in self._sources:
      self._sources["vae"] = [(p, lazy.cast(dtypes.float32) if dtypes.is_float(lazy.dtype) else lazy) for p, lazy in self._sources["vae"]]
    params = get_parameters(self.vae)
    self._jits = {k: v for k, v in self._jits.items() if k[0] != "vae"}   # captured with the fp16 weight buffers
    for p in params: p.replace(p.cast(dtypes.float32))
    Tensor.realize(*params)

  def txt2img(self, prompt, negative_prompt="", steps=20, guidance_scale=7.5, width=512, height=512, seed=0, sampler="plms", batch_size=1,
              latents=None, output_type="pil", progress=False, ancestral_noise=None, callback=None):
    """`latents`: unit-variance x_T (B,4,H/8,W/8) as diffusers' `latents=`; `ancestral_noise(shape)`: replaces the seeded noise of stochastic samplers."""
    check_generation_args(width, height, steps, guidance_scale, sampler, batch_size, train_timesteps=self.config.scheduler.num_train_timesteps)
    prompts, ctx, pooled, time_ids = self._conditioning(prompt, negative_prompt, batch_size, guidance_scale, width, height)
    shape = (self.config.unet.out_channels, height // self.vae_scale, width // self.vae_scale)
    x = np.asarray(latents, dtype=np.float32) if latents is not None else seeded_noise(seed, len(prompts), shape)
    if x.shape != (len(prompts),) + shape: raise InputError(f"latents must have shape {(len(prompts),) + shape}, got {x.shape}")
    model = self.denoiser(ctx, guidance_scale, text_embeds=pooled, time_ids=time_ids)
    x = self._run(model, x, steps, sampler, seed, progress=progress, ancestral_noise=ancestral_noise, callback=callback)
    return self._output(x, output_type)

  def _output(self, latents:np.ndarray, output_type:str):
    if output_type == "latent": return latents   # final scaled latents (B,4,H/8,W/8), undecoded
    images = self.decode(latents)
    return images if output_type == "np" else to_pil(images)

  def encode_image(self, images:np.ndarray, sample_noise:np.ndarray|None=None) -> np.ndarray:
    """(B,H,W,3) in [0,1] -> scaled latents: the VAE posterior mean, or a posterior sample when `sample_noise` (latent-shaped) is given."""
    x = Tensor(images.transpose(0, 3, 1, 2).astype(np.float32) * 2 - 1, device=self.device)
    with self.resident("vae"):
      if self.vae_tile:
        from tinysd_ops.tiling import encode_tiled
        post = encode_tiled(self.vae, x.cast(self.vae_dtype), self.vae_tile * self.vae_scale, self.vae_tile // 4 * self.vae_scale)
      else: post = self.vae.encode(x.cast(self.vae_dtype))
      z = post.mean if sample_noise is None else post.sample(Tensor(sample_noise.astype(np.float32), device=self.device).cast(self.vae_dtype))
      return (z.float() * self.vae.scaling_factor).numpy()

  def img2img(self, prompt, image, strength=0.75, negative_prompt="", steps=20, guidance_scale=7.5, sampler="ddim", seed=0, noise=None,
              batch_size=1, output_type="pil", progress=False, ancestral_noise=None, sample_posterior=False, callback=None):
    """diffusers' strength semantics: skip the first (1-strength) of the schedule and noise the encoded image to that level. The init image
    is encoded to the VAE posterior mean (sample_posterior=True draws from the posterior with the seed instead)."""
    return self._edit(prompt, image, None, strength, negative_prompt, steps, guidance_scale, sampler, seed, noise, batch_size, output_type,
                      progress, ancestral_noise, sample_posterior, callback=callback)

  def inpaint(self, prompt, image, mask=None, strength=1.0, negative_prompt="", steps=20, guidance_scale=7.5, sampler="ddim", seed=0, noise=None,
              batch_size=1, output_type="pil", progress=False, ancestral_noise=None, sample_posterior=False, callback=None):
    """Repaint where mask is 1 (white). 9-channel inpainting UNets get [latents, mask, masked-image latents]; ordinary UNets keep the
    unmasked region by blending the noised init latents back in after every step (the CompVis/A1111 method). `mask`: PIL image, path or
    (H,W) array; None takes the image's alpha channel or its pure green pixels."""
    return self._edit(prompt, image, mask if mask is not None else image, strength, negative_prompt, steps, guidance_scale, sampler, seed, noise,
                      batch_size, output_type, progress, ancestral_noise, sample_posterior, inpaint=True, explicit_mask=mask is not None,
                      callback=callback)

  def _edit(self, prompt, image, mask, strength, negative_prompt, steps, guidance_scale, sampler, seed, noise, batch_size, output_type, progress,
            ancestral_noise, sample_posterior, inpaint=False, explicit_mask=True, callback=None):
    from tinysd.images import load_image, inpaint_mask
    check_strength(strength)
    init = image if isinstance(image, np.ndarray) and image.ndim == 3 and image.dtype == np.float32 else load_image(image)
    h, w = init.shape[:2]
    check_generation_args(w, h, steps, guidance_scale, sampler, batch_size, train_timesteps=self.config.scheduler.num_train_timesteps)
    m = inpaint_mask(image, mask if explicit_mask else None, (w, h)) if inpaint else None
    prompts, ctx, pooled, time_ids = self._conditioning(prompt, negative_prompt, batch_size, guidance_scale, w, h)
    n, s = len(prompts), self.vae_scale
    lat_shape = (self.config.unet.out_channels, h // s, w // s)
    noise = np.asarray(noise, dtype=np.float32) if noise is not None else seeded_noise(seed, n, lat_shape)
    if noise.shape != (n,) + lat_shape: raise InputError(f"noise must have shape {(n,) + lat_shape}, got {noise.shape}")
    post_noise = seeded_noise(seed + 2_000_003, n, lat_shape) if sample_posterior else None
    sched = samplers.schedule(sampler, steps, self.config.scheduler)
    start = samplers.start_for_strength(steps, strength)
    nine = self.config.unet.in_channels == 9
    x0 = None
    if not (inpaint and nine and start == 0):   # a 9-channel UNet at full strength starts from pure noise and needs no image latents
      x0 = np.repeat(self.encode_image(init[None], None if post_noise is None else post_noise[:1]), n, axis=0)
    if start >= len(sched.timesteps):            # strength 0: nothing to denoise
      return self._output(x0, output_type)
    x = noise if start == 0 else samplers.add_noise(x0, noise, sched, start)
    extra, blend = None, None
    if inpaint:
      m_lat = np.broadcast_to(m[::s, ::s][None, None], (n, 1) + lat_shape[1:]).astype(np.float32)   # nearest, as diffusers' interpolate
      if nine:
        masked = np.where((m < 0.5)[..., None], init, 0.5)   # the repaint area becomes 0 in [-1,1] pixel space, as diffusers does
        mz = self.encode_image(masked[None], None if post_noise is None else post_noise[:1])
        extra = np.concatenate([m_lat, np.repeat(mz, n, axis=0)], axis=1)
      else:
        def blend(k, x):   # keep the known region on the noise level of the next step; the exact init latents after the last one
          known = samplers.add_noise(x0, noise, sched, k) if k < len(sched.timesteps) else x0
          return (1 - m_lat) * known + m_lat * x
    model = self.denoiser(ctx, guidance_scale, extra=extra, text_embeds=pooled, time_ids=time_ids)
    x = self._run(model, x, steps, sampler, seed, start=start, progress=progress, blend=blend, ancestral_noise=ancestral_noise, sched=sched,
                  callback=callback)
    return self._output(x, output_type)

  @property
  def vae_scale(self) -> int: return 2 ** (len(self.config.vae.block_out_channels) - 1)   # 8 for every real SD VAE

# ** construction

DTYPES = {"float32": dtypes.float32, "float16": dtypes.float16, "bfloat16": dtypes.bfloat16}

def parse_dtype(dtype) -> "dtypes.DType":
  if not isinstance(dtype, str): return dtype
  if dtype not in DTYPES: raise InputError(f"unknown dtype '{dtype}'; choose from: {', '.join(DTYPES)}")
  return DTYPES[dtype]

def default_compute_dtype(dtype, device:str|None=None):
  """fp16/bf16 weights compute in fp32 on the CPU: tinygrad's clang kernels convert every half value on its own there (measured: a fp16
  3x3 conv 9.6x, a fp16 linear 12x slower than fp32), while fp16 weights read by fp32 kernels cost about nothing (the conversion fuses
  into the load). Memory then halves for the weights, not for the activations. Elsewhere the compute dtype is the weights' dtype."""
  dtype = parse_dtype(dtype)
  return dtypes.float32 if dtype in (dtypes.float16, dtypes.bfloat16) and (device or Device.DEFAULT).split(":")[0] == "CPU" else dtype

def _cpu_attention(out:Tensor) -> Tensor:
  # on the CPU fast path every attention runs as one fused C kernel (ops/cpu_attention.py): fast, and it never stores the score matrix
  from tinysd_ops import cpu
  if not cpu.enabled(): return out
  from tinysd_ops.cpu_attention import install
  return install(out)

def present(params:list[Tensor], compute_dtype):
  """Realised float weights held in another dtype than the compute dtype are presented to the models as a lazy cast of their buffer:
  the models see (and compute in) compute_dtype, the cast fuses into each consuming kernel, and only the stored form is in memory."""
  for p in params:
    if dtypes.is_float(p.dtype) and p.dtype != compute_dtype: p.replace(p.cast(compute_dtype))

def build(config:ModelConfig, dtype="float32", device:str|None=None, tokenizers:list[CLIPTokenizer]|None=None,
          compute_dtype=None) -> tuple[StableDiffusion, list[Tensor]]:
  """Models whose random-init weights are empty placeholders (returned too): load() or random_pipeline() fills every one before use.
  compute_dtype None: default_compute_dtype(dtype, device)."""
  toks = tokenizers or [CLIPTokenizer(pad_token_id=p) for p in config.pad_token_ids]
  with placeholder_init() as made:   # the layers' random init, thrown away by loading, made empty placeholders (ops/tg.py)
    pipe = StableDiffusion(config, toks, [CLIPTextModel(c) for c in config.text_encoders], UNet2DConditionModel(config.unet),
                           AutoencoderKL(config.vae), parse_dtype(dtype), device,
                           parse_dtype(compute_dtype) if compute_dtype is not None else default_compute_dtype(dtype, device))
  return pipe, made

def components(pipe:StableDiffusion) -> dict:
  return {"unet": pipe.unet, "vae": pipe.vae, **{te_name(i): te for i, te in enumerate(pipe.text_encoders)}}

def place(pipe:StableDiffusion) -> list[Tensor]:
  """Cast every float parameter to the pipeline dtype and move it to its device, lazily; returns the parameters to realise."""
  from tinygrad.nn.state import get_parameters
  params = get_parameters(components(pipe))
  for p in params:
    if dtypes.is_float(p.dtype) and p.dtype != pipe.dtype: p.replace(p.cast(pipe.dtype))
    if p.device != pipe.device: p.replace(p.to(pipe.device))
  return params

def realize_weights(params:list[Tensor], batch_bytes:int=1 << 26):
  """Realises lazy weights ~64 MB at a time, unmapping the checkpoint pages read after each batch: reading a whole model at once would
  count it twice in RSS at the peak (the mapped file pages + the device copy)."""
  from tinysd_ops.tg import drop_file_pages
  batch, n = [], 0
  for i, p in enumerate(params):
    batch.append(p); n += p.nbytes()
    if n >= batch_bytes or i == len(params) - 1:
      Tensor.realize(*batch)   # one schedule per batch: a realize per tensor rescans every live tensor (quadratic in tinygrad)
      drop_file_pages()
      batch, n = [], 0

def random_pipeline(config:ModelConfig, dtype="float32", device:str|None=None, seed:int=0, compute_dtype=None) -> StableDiffusion:
  """Real-size models with random weights (ops/tg.py random_init), for benchmarks and demo models: speed and memory do not depend on values."""
  pipe, _ = build(config, dtype, device, compute_dtype=compute_dtype)
  rng = np.random.default_rng(seed)
  for model in components(pipe).values(): random_init(model, rng, pipe.dtype)
  params = place(pipe)
  Tensor.realize(*params)
  present(params, pipe.compute_dtype)
  return pipe

def _force_zeros(path, cfg:ModelConfig) -> bool:
  # a diffusers folder's model_index.json may turn SDXL's force_zeros_for_empty_prompt off (some fine-tunes do); SD1/SD2 have no such option
  import json, pathlib
  idx = pathlib.Path(path) / "model_index.json"
  if not cfg.family.startswith("sdxl") or not idx.is_file(): return cfg.family.startswith("sdxl")
  try: return json.loads(idx.read_text(encoding="utf-8")).get("force_zeros_for_empty_prompt", True) is not False
  except (OSError, ValueError, AttributeError): return True

def load(path, dtype="float32", device:str|None=None, config=None, lowmem:bool=False, quant:str|None=None, compute_dtype=None) -> StableDiffusion:
  """A pipeline from a single-file .safetensors (CompVis/A1111 layout, or a tinysd quantised file), or a diffusers folder, in the given
  dtype. Weights are read lazily from the memory-mapped file: all at once here, or with lowmem=True each model just in time for its use
  (see StableDiffusion.resident). quant="int8"/"pal8"/"pal6"/"pal4" quantises the UNet and text encoders while loading (see
  tinysd/quantize.py; those weights then stay resident even with lowmem: write a quantised file with `tinysd convert --quant` to stream them).
  compute_dtype: what the models compute in (default: dtype, except fp16/bf16 weights on the CPU compute in fp32; see default_compute_dtype)."""
  from tinygrad.nn.state import load_state_dict, get_parameters
  from tinysd.checkpoint import read_checkpoint, CheckpointError
  ck = read_checkpoint(path, dtype=str(parse_dtype(dtype).name) if not isinstance(dtype, str) else dtype, config=config)
  if quant is not None and ck.quant: raise CheckpointError(f"{path} is already quantised; load it without quant=")
  toks = [CLIPTokenizer.from_folder(d) if d is not None else CLIPTokenizer(pad_token_id=p)
          for d, p in zip(ck.tokenizer_dirs, ck.config.pad_token_ids)] if ck.tokenizer_dirs else None
  pipe, _ = build(ck.config, dtype, device, toks, compute_dtype)
  pipe.force_zeros_for_empty_prompt = _force_zeros(path, ck.config)
  if ck.quant:
    from tinysd.quantize import apply_layout
    try: apply_layout(components(pipe), ck.quant, pipe.compute_dtype)
    except ValueError as e: raise CheckpointError(f"{path}: {e}") from None
    pipe._quant = {c: "/".join(sorted({m["mode"] for m in layers.values()})) for c, layers in ck.quant.items()}
  for name, model in components(pipe).items():
    try: load_state_dict(model, ck.state_dicts[name], strict=True, verbose=False, realize=False)
    except (KeyError, ValueError) as e: raise CheckpointError(f"{name}: {e}") from None
  params = place(pipe)
  if quant is not None:
    pipe._quant = {c: quant for c in quantize_pipeline(pipe, quant)}
    params = get_parameters(components(pipe))
  if lowmem:
    pipe._sources = {name: [(p, lazy_graph(p)) for p in get_parameters(m)] for name, m in components(pipe).items()}
    pipe.vae_tile = LOWMEM_VAE_TILE   # the untiled decode would set the memory peak; tiles change the image slightly (ops/tiling.py)
  else:
    realize_weights(params)
    present(params, pipe.compute_dtype)
  return pipe

def quantize_pipeline(pipe:StableDiffusion, mode:str, group_size:int|None=None) -> dict[str, dict]:
  """In place: the UNet's and text encoders' large layers quantised (tinysd/quantize.py); returns the per-component reports."""
  from tinysd.quantize import quantize_models
  reports = quantize_models(components(pipe), mode, pipe.compute_dtype, group_size)
  pipe._jits.clear()   # captured JITs hold the float weights
  return reports

def convert_quantized(src, dst, mode:str, dtype="float16", config=None, group_size:int|None=None) -> dict[str, dict]:
  """Float checkpoint (any layout tinysd reads) -> tinysd quantised .safetensors; float tensors stored in dtype (fp16 by default)."""
  from tinysd.checkpoint import write_quantized, CheckpointError
  from tinysd.quantize import check_mode, quant_meta
  check_mode(mode)
  if not str(dst).endswith(".safetensors"): raise CheckpointError(f"{dst}: a quantised checkpoint is one .safetensors file")
  pipe = load(src, parse_dtype(dtype), config=config, lowmem=True)   # lowmem: every weight stays a lazy read of the source file
  if pipe._quant: raise CheckpointError(f"{src} is already quantised")
  reports = quantize_pipeline(pipe, mode, group_size)
  write_quantized(*quant_meta(components(pipe)), pipe.config, dst)
  return reports
