# AUTOMATIC1111's vocabulary: sampler names, the `info` JSON and infotext of its API, base64 images, the "Approx cheap" preview.
# Pure functions (no web framework): the API, the job runner and the worker processes all use them.
from __future__ import annotations
import base64, binascii, hashlib, io, json, re, time
from pathlib import Path
import numpy as np
from PIL import Image, UnidentifiedImageError
from tinysd.pipeline import InputError

# (A1111 name, tinysd sampler, aliases A1111 lists); before 1.9 Karras was part of the name, since then it can be `scheduler: "Karras"`
SAMPLERS = [("DPM++ 2M Karras", "dpm++2m_karras", ["k_dpmpp_2m_ka"]), ("DPM++ 2M", "dpm++2m", ["k_dpmpp_2m"]),
            ("Euler a", "euler_a", ["k_euler_a", "k_euler_ancestral"]), ("Euler", "euler", ["k_euler"]), ("DDIM", "ddim", ["ddim"]),
            ("PLMS", "plms", ["plms"])]
LABEL = {ours: name for name, ours, _ in SAMPLERS}
_BY_NAME = {k.lower(): ours for name, ours, aliases in SAMPLERS for k in (name, ours, *aliases)}

def resolve_sampler(name:str|None, scheduler:str|None=None) -> str:
  """An A1111 sampler name (or alias, or tinysd's own name) + optional scheduler -> tinysd's sampler."""
  ours = _BY_NAME.get((name or "Euler").strip().lower())
  if ours is None: raise InputError(f"sampler '{name}' not found; choose from: {', '.join(n for n, _, _ in SAMPLERS)}")
  sched = (scheduler or "automatic").strip().lower()
  if sched == "automatic": return ours
  if sched == "karras" and ours.startswith("dpm++2m"): return "dpm++2m_karras"
  raise InputError(f"scheduler '{scheduler}' is not supported with sampler '{name}' (Automatic, or Karras with DPM++ 2M)")

def samplers_list() -> list[dict]:
  return [{"name": name, "aliases": aliases, "options": {}} for name, _, aliases in SAMPLERS]

MAX_PIXELS = 4096 * 4096   # decoded images (init images, masks) above this are refused before decoding, as tinysd/images.py does

def decode_image(data, what:str) -> Image.Image:
  """A base64 string (optionally a data: URL, as browsers make them) -> a loaded PIL image; anything else is a 422 naming `what`."""
  if not isinstance(data, str) or not data: raise InputError(f"{what} must be a base64-encoded image")
  if data.startswith("data:"): data = data.partition(",")[2]
  try:
    im = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    if im.width * im.height > MAX_PIXELS: raise InputError(f"{what} is {im.width}x{im.height}: over {MAX_PIXELS / 1e6:.1f} MP")   # before decoding
    im.load()
  except (binascii.Error, UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError):
    raise InputError(f"{what} is not a base64-encoded image") from None
  except InputError: raise
  except ValueError: raise InputError(f"{what} is not a base64-encoded image") from None
  return im

def png_b64(image:Image.Image, parameters:str|None=None) -> str:
  from PIL.PngImagePlugin import PngInfo
  info = None
  if parameters is not None: info = PngInfo(); info.add_text("parameters", parameters)
  buf = io.BytesIO()
  image.save(buf, format="PNG", pnginfo=info)
  return base64.b64encode(buf.getvalue()).decode()

# A1111's "Approx cheap" live preview: a fixed linear map from the 4 latent channels to RGB (no VAE)
_CHEAP = {"sd": np.array([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]], np.float32),
          "sdxl": np.array([[0.3448, 0.4168, 0.4395], [-0.1953, -0.0290, 0.0250], [0.1074, 0.0886, -0.0163], [-0.3730, -0.2499, -0.2088]], np.float32)}

def cheap_preview(latents:np.ndarray, sdxl:bool=False) -> str:
  """First image of a (B,4,h,w) latent batch as a base64 PNG at latent resolution."""
  x = latents[0].astype(np.float32)
  x = x / max(1.0, float(x.std()))   # noisy early latents (σ-scaled for the Euler samplers) would be all saturated
  rgb = np.einsum("chw,cr->hwr", x, _CHEAP["sdxl" if sdxl else "sd"])
  return png_b64(Image.fromarray((np.clip((rgb + 1) / 2, 0, 1) * 255).astype(np.uint8)))

def infotext(prompt:str, negative:str, steps:int, sampler:str, cfg:float, seed:int, width:int, height:int, model:str, **extra) -> str:
  from tinysd.frontend import a1111_parameters
  return a1111_parameters(prompt, negative, steps, sampler, cfg, seed, width, height, model, **extra)

_PARAM = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')

def parse_infotext(text:str) -> dict:
  """An infotext -> {"Prompt", "Negative prompt", field: value (strings), "Size-1", "Size-2"}, as A1111's png-info returns it."""
  lines = text.strip().split("\n")
  last = lines[-1] if len(_PARAM.findall(lines[-1])) >= 3 else ""
  if last: lines = lines[:-1]
  prompt, neg, in_neg = [], [], False
  for line in lines:
    if line.startswith("Negative prompt:"): in_neg, line = True, line[len("Negative prompt:"):].strip()
    (neg if in_neg else prompt).append(line)
  res = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(neg)}
  for k, v in _PARAM.findall(last):
    v = v.strip()
    if v.startswith('"') and v.endswith('"') and len(v) > 1: v = json.loads(v)
    if m := re.fullmatch(r"(\d+)x(\d+)", v): res[f"{k}-1"], res[f"{k}-2"] = m[1], m[2]
    else: res[k] = v
  return res

def model_entry(path:str) -> dict:
  """/sdapi/v1/sd-models row. The hash is A1111's legacy kind (sha256 of 64 KiB at 1 MiB), cheap for multi-GB files; a diffusers folder
  hashes its UNet file."""
  p = Path(path)
  f = p if p.is_file() else next(iter(sorted(p.glob("unet/*.safetensors"))), None)
  h = None
  if f is not None:
    with open(f, "rb") as fh: fh.seek(0x100000); h = hashlib.sha256(fh.read(0x10000)).hexdigest()[:10]
  name = p.name
  return {"title": f"{name} [{h}]" if h else name, "model_name": p.stem if p.is_file() else name, "hash": h, "sha256": None,
          "filename": str(p.resolve()), "config": None}

def info_json(req:dict, *, seeds:list[int], sampler:str, infotexts:list[str], model:dict, strength:float|None, inpainting:bool,
              extra:dict, clip_skip:int=1) -> str:
  """The `info` string of A1111's txt2img/img2img responses: Processed.js() keys."""
  n = len(seeds)
  return json.dumps({
    "prompt": req["prompt"], "all_prompts": [req["prompt"]] * n, "negative_prompt": req["negative_prompt"],
    "all_negative_prompts": [req["negative_prompt"]] * n, "seed": seeds[0], "all_seeds": seeds, "subseed": req.get("subseed", -1),
    "all_subseeds": [req.get("subseed", -1)] * n, "subseed_strength": req.get("subseed_strength", 0), "width": req["width"], "height": req["height"],
    "sampler_name": LABEL[sampler], "cfg_scale": req["cfg_scale"], "steps": req["steps"], "batch_size": req["batch_size"],
    "restore_faces": req.get("restore_faces"), "face_restoration_model": None, "sd_model_name": model["model_name"], "sd_model_hash": model["hash"],
    "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": req.get("seed_resize_from_w", -1),
    "seed_resize_from_h": req.get("seed_resize_from_h", -1), "denoising_strength": strength, "extra_generation_params": extra,
    "index_of_first_image": 0, "infotexts": infotexts, "styles": req.get("styles") or [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
    "clip_skip": clip_skip, "is_using_inpainting_conditioning": inpainting})
