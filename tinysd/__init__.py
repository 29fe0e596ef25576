# tinysd: Stable Diffusion inference on tinygrad.
__version__ = "0.1.0"

def load(path, dtype="float32", device=None, config=None, lowmem=False):
  """Load a single-file .safetensors (CompVis/A1111 keys) or a diffusers folder into a StableDiffusion pipeline.
  lowmem=True keeps weights in the memory-mapped file and brings each model in just for its use."""
  from tinysd.pipeline import load as _load
  return _load(path, dtype=dtype, device=device, config=config, lowmem=lowmem)
