# What the command line (tinysd/cli.py) and the server (tinysd/server/) share, below both so neither imports the other: the usage error,
# the default model and how a --model is found (a local path, or a Hugging Face Hub download), and AUTOMATIC1111's `parameters` text.
# Light on purpose (no tinygrad): `tinysd --help` and every argument check run before anything heavy is imported.
from __future__ import annotations
import os
from pathlib import Path

SAMPLER_LABELS = {"plms": "PLMS", "ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "dpm++2m": "DPM++ 2M", "dpm++2m_karras": "DPM++ 2M Karras"}
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

class UsageError(ValueError):
  """Bad arguments (the command line's or the server's): one line on stderr, exit 2."""

def a1111_parameters(prompt:str, negative:str, steps:int, sampler:str, guidance:float, seed:int, width:int, height:int, model:str, **extra) -> str:
  """The `parameters` text chunk AUTOMATIC1111 writes, which image browsers parse."""
  head = prompt + (f"\nNegative prompt: {negative}" if negative else "")
  stem = Path(str(model)).stem.encode("utf-8", "replace").decode()   # a path's undecodable bytes cannot go into a PNG text chunk
  fields = {"Steps": steps, "Sampler": SAMPLER_LABELS.get(sampler, sampler), "CFG scale": guidance, "Seed": seed, "Size": f"{width}x{height}",
            "Model": stem, **extra}
  return head + "\n" + ", ".join(f"{k}: {v}" for k, v in fields.items())

def resolve_model(model:str) -> str:
  """A local file/folder, or a Hugging Face repo id fetched into the standard HF cache when huggingface_hub is installed."""
  if os.path.exists(model): return model
  looks_like_repo = model.count("/") == 1 and not model.endswith((".safetensors", ".ckpt")) and not model.startswith((".", "/", "~"))
  if not looks_like_repo: raise UsageError(f"model path '{model}' does not exist")
  try:
    from huggingface_hub import snapshot_download
  except ImportError:
    raise UsageError(f"'{model}' is not a local path and huggingface_hub is not installed; pass --model /path/to/model.safetensors "
                     f"(or a diffusers folder), or `pip install huggingface_hub` to download it") from None
  patterns = ["model_index.json", "*/config.json", "*/*.json", "*/*.txt", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
              "text_encoder*/model.safetensors"]
  try:
    return snapshot_download(model, allow_patterns=patterns)
  except Exception as e:   # huggingface_hub's own reason (offline, no such repo, gated, ...) on the one line
    why = next((l.strip() for l in str(e).splitlines() if l.strip()), "")
    why = why if len(why) <= 200 else why[:199] + "…"
    raise UsageError(f"could not fetch '{model}' from the Hugging Face Hub ({type(e).__name__}{': ' + why if why else ''}); pass --model "
                     f"with a local .safetensors file or diffusers folder") from None
