# Quantised pipelines (ops/quant.py does the maths): UNet and text-encoder Linear/Conv2d weights as int8 (+ fp16 outlier columns) or
# k-means palettized (8/6/4 bits), dequantised inside the consuming kernels. Either quantised at load time from a float checkpoint, one
# layer read from the memory-mapped file at a time, or stored once in a tinysd quantised .safetensors (`tinysd convert --quant`), which
# loads without any k-means work and is the form `lowmem` can stream from disk.
# This module works on a pipeline's models ({component name: model}, tinysd.pipeline.components) and never imports tinysd.pipeline: the
# pipeline's load() uses it (pipeline.quantize_pipeline and pipeline.convert_quantized are the whole-pipeline calls).
from __future__ import annotations
import json
from tinysd_ops.quant import MODES, quantize_model, state_dict as quant_state_dict, swap_layers, _quant_layers
from tinysd_ops.tg import drop_file_pages

QUANTIZED = ("unet", "text_encoder", "text_encoder_2")   # the VAE stays float: 84M weights, and its decoder is the fp16-fragile part

def check_mode(mode:str):
  if mode not in MODES: raise ValueError(f"unknown quantisation '{mode}'; choose from: {', '.join(MODES)}")

def quantize_models(models:dict, mode:str, compute_dtype, group_size:int|None=None) -> dict[str, dict]:
  """In place: every large Linear/Conv2d of the UNet and text encoders becomes its quantised drop-in (ops.quant.DEFAULT_SKIP stay float).
  Each float weight is read (from the lazy checkpoint, in the pipeline dtype), quantised in numpy and dropped before the next, so the
  float model never exists in full. Returns ops.quant's report per component."""
  check_mode(mode)
  reports = {}
  for name, model in models.items():
    if name not in QUANTIZED: continue
    reports[name] = quantize_model(model, mode, group_size=group_size)
    for layer in _quant_layers(model).values(): layer.weight.dtype = compute_dtype   # side tensors are cast when presented
    drop_file_pages()
  return reports

def apply_layout(models:dict, quant:dict[str, dict[str, dict]], compute_dtype):
  """Swaps in empty quantised layers as described by a quantised file's metadata, before its state dicts are loaded."""
  for name, meta in quant.items():
    if name not in models: raise ValueError(f"quantised file names an unknown component {name}")
    swap_layers(models[name], meta, compute_dtype)

def quant_meta(models:dict) -> tuple[dict[str, dict], dict[str, dict[str, dict]]]:
  """(state dicts, per-component layer metadata) of (partly) quantised models, as write_quantized stores them."""
  sds, quant = {}, {}
  for name, model in models.items():   # a model without quantised layers gets its plain state dict
    sds[name], meta = quant_state_dict(model)
    if layers := json.loads(meta["tinysd.quant"]): quant[name] = layers
  return sds, quant
