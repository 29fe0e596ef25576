# tinysd: Stable Diffusion inference on tinygrad.
__version__ = "0.1.0"

def load(path, dtype="float32", device=None, config=None, lowmem=False, quant=None, compute_dtype=None):
  """Load a single-file .safetensors (CompVis/A1111 keys, or a tinysd quantised file) or a diffusers folder into a StableDiffusion
  pipeline. lowmem=True keeps weights in the memory-mapped file and brings each model in just for its use; quant="int8"/"pal8"/"pal6"/
  "pal4" quantises the UNet and text encoders while loading. compute_dtype: default dtype, but fp16/bf16 weights compute in fp32 on the CPU."""
  from tinysd.pipeline import load as _load
  return _load(path, dtype=dtype, device=device, config=config, lowmem=lowmem, quant=quant, compute_dtype=compute_dtype)
