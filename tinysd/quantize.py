# Quantised pipelines (ops/quant.py does the maths): UNet and text-encoder Linear/Conv2d weights as int8 (+ fp16 outlier columns) or
# k-means palettized (8/6/4 bits), dequantised inside the consuming kernels. Either quantised at load time from a float checkpoint, one
# layer read from the memory-mapped file at a time, or stored once in a tinysd quantised .safetensors (`tinysd convert --quant`), which
# loads without any k-means work and is the form `lowmem` can stream from disk.
from __future__ import annotations
import json
from ops.quant import MODES, quantize_model, state_dict as quant_state_dict, swap_layers, _quant_layers
from ops.tg import drop_file_pages
from tinysd.pipeline import StableDiffusion, components, load, parse_dtype

QUANTIZED = ("unet", "text_encoder", "text_encoder_2")   # the VAE stays float: 84M weights, and its decoder is the fp16-fragile part

def check_mode(mode:str):
  if mode not in MODES: raise ValueError(f"unknown quantisation '{mode}'; choose from: {', '.join(MODES)}")

def quantize_pipeline(pipe:StableDiffusion, mode:str, group_size:int|None=None) -> dict[str, dict]:
  """In place: every large Linear/Conv2d of the UNet and text encoders becomes its quantised drop-in (ops.quant.DEFAULT_SKIP stay float).
  Each float weight is read (from the lazy checkpoint, in the pipeline dtype), quantised in numpy and dropped before the next, so the
  float model never exists in full. Returns ops.quant's report per component."""
  check_mode(mode)
  reports = {}
  for name, model in components(pipe).items():
    if name not in QUANTIZED: continue
    reports[name] = quantize_model(model, mode, group_size=group_size)
    for layer in _quant_layers(model).values(): layer.weight.dtype = pipe.compute_dtype   # side tensors are cast when presented
    drop_file_pages()
  pipe._jits.clear()
  return reports

def apply_layout(pipe:StableDiffusion, quant:dict[str, dict[str, dict]]):
  """Swaps in empty quantised layers as described by a quantised file's metadata, before its state dicts are loaded."""
  comps = components(pipe)
  for name, meta in quant.items():
    if name not in comps: raise ValueError(f"quantised file names an unknown component {name}")
    swap_layers(comps[name], meta, pipe.compute_dtype)

def quant_meta(pipe:StableDiffusion) -> tuple[dict[str, dict], dict[str, dict[str, dict]]]:
  """(state dicts, per-component layer metadata) of a (partly) quantised pipeline, as write_quantized stores them."""
  sds, quant = {}, {}
  for name, model in components(pipe).items():   # a model without quantised layers gets its plain state dict
    sds[name], meta = quant_state_dict(model)
    if layers := json.loads(meta["tinysd.quant"]): quant[name] = layers
  return sds, quant

def convert_quantized(src, dst, mode:str, dtype="float16", config=None, group_size:int|None=None) -> dict[str, dict]:
  """Float checkpoint (any layout tinysd reads) -> tinysd quantised .safetensors; float tensors stored in dtype (fp16 by default)."""
  from tinysd.checkpoint import write_quantized, CheckpointError
  check_mode(mode)
  if not str(dst).endswith(".safetensors"): raise CheckpointError(f"{dst}: a quantised checkpoint is one .safetensors file")
  pipe = load(src, parse_dtype(dtype), config=config, lowmem=True)   # lowmem: every weight stays a lazy read of the source file
  if pipe._quant: raise CheckpointError(f"{src} is already quantised")
  reports = quantize_pipeline(pipe, mode, group_size)
  sds, quant = quant_meta(pipe)
  write_quantized(sds, quant, pipe.config, dst)
  return reports
