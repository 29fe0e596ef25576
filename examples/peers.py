# Other engines timed on tinysd bench's shapes, in the same process, one after the other (examples/bench.py --vs). Each peer builds the same
# random-weight diffusers/transformers models (seed 0) from tinysd's config, fresh, so no peer sees another's cast or conversion:
#   diffusers   diffusers + torch eager in tinysd's dtype, on CUDA when torch sees a GPU, else the CPU
#   torch-bf16  the same models .to(torch.bfloat16), bf16 inputs, CPU
#   openvino    the same models through openvino.convert_model, compiled for "CPU" with the default config (OpenVINO picks bf16 by itself
#               on CPUs that have it). A bench-only dependency, never tinysd's: pip install openvino. Conversion is reported apart.
# Shapes: UNet at the CFG batch (2 x --batch), VAE decode at --batch, text encoder at the CFG batch, 77 tokens.
from __future__ import annotations
import argparse, statistics, time, warnings
from dataclasses import asdict

PEERS = ("diffusers", "torch-bf16", "openvino")

def parse_peers(s:str) -> list[str]:
  """'diffusers,torch-bf16' -> ['diffusers', 'torch-bf16'] (argparse type: a bad name is a usage error, exit 2)."""
  names = [x.strip() for x in s.split(",") if x.strip()]
  if not names or (bad:=[x for x in names if x not in PEERS]):
    raise argparse.ArgumentTypeError(f"unknown peer {', '.join(map(repr, bad)) if names else repr(s)} (a comma list of: {', '.join(PEERS)})")
  return list(dict.fromkeys(names))

def check(model:str, names:list[str]):
  """Fails before the (long) tinysd run rather than after it."""
  from tinysd import bench
  if bench.MODELS[model].family != "sd1": raise SystemExit(f"--vs is wired for SD1-family models (sd15, tiny), not {model}")
  if "openvino" in names:
    try: import openvino  # noqa: F401
    except ImportError: raise SystemExit("--vs openvino needs OpenVINO, a bench-only dependency: pip install openvino") from None

def torch_models(model:str):
  """(UNet, VAE, CLIP text encoder) as diffusers/transformers modules for tinysd's config: random weights from seed 0, fp32, eval."""
  import torch
  from diffusers import UNet2DConditionModel, AutoencoderKL
  from transformers import CLIPTextConfig, CLIPTextModel
  from diffusers.utils import logging as dlog
  from transformers.utils import logging as tlog
  from tinysd import bench
  dlog.set_verbosity_error(); tlog.set_verbosity_error()   # the casts below and the random configs are meant: no advice wanted
  cfg = bench.MODELS[model]
  torch.manual_seed(0)
  n = len(cfg.vae.block_out_channels)
  unet = UNet2DConditionModel(**asdict(cfg.unet)).eval()
  vae = AutoencoderKL(**{k: v for k, v in asdict(cfg.vae).items() if k != "sample_size"},
                      down_block_types=["DownEncoderBlock2D"]*n, up_block_types=["UpDecoderBlock2D"]*n).eval()
  te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in asdict(cfg.text_encoders[0]).items() if k != "projection_dim"})).eval()
  return unet, vae, te

def _shapes(model:str, size:int, batch:int, guidance:float) -> tuple[int, int, int, int, int]:
  # (UNet batch, text encoder batch, latent size, latent channels, context width) as tinysd's bench runs them: the bench always encodes
  # 2 x batch prompts, and batches the UNet for CFG unless guidance is 1
  from tinysd import bench
  cfg = bench.MODELS[model]
  return (2 * batch if guidance != 1 else batch), 2 * batch, size // 8, cfg.unet.in_channels, cfg.unet.cross_attention_dim

def _clock(fn, sync=lambda: None) -> float:
  sync(); t0 = time.perf_counter(); fn(); sync()
  return time.perf_counter() - t0

def _timings(te, unet, vae, steps:int, decode_runs:int, sync=lambda: None) -> dict:
  # te(), unet(i), vae() run one forward each. Text encoder: one warm-up call, then one timed; UNet: steps+1 calls, the first a warm-up;
  # VAE: decode_runs calls, the last (warmest) is the figure, as tinysd's
  te()
  r = {"text_encoder_s": _clock(te, sync)}
  times = [_clock(lambda: unet(i), sync) for i in range(steps + 1)]
  r["first_step_s"], r["step_s"] = times[0], statistics.median(times[1:])
  r["vae_decode_runs_s"] = [_clock(vae, sync) for _ in range(max(decode_runs, 1))]
  r["vae_decode_s"] = r["vae_decode_runs_s"][-1]
  return r

def time_torch(model:str, size:int, steps:int, batch:int, guidance:float, dtype:str="float32", device:str|None=None, decode_runs:int=1) -> dict:
  import torch
  dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
  dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
  unet, vae, te = (m.to(dev, dt) for m in torch_models(model))
  b, bt, lat, ch, _ = _shapes(model, size, batch, guidance)
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  r = {"engine": f"torch {torch.__version__.split('+')[0]}", "device": torch.cuda.get_device_name() if dev == "cuda" else "CPU",
       "threads": torch.get_num_threads(), "precision": dtype}
  with torch.no_grad():
    ids = torch.randint(0, 49407, (bt, 77), device=dev)
    ctx = te(ids).last_hidden_state[:b]
    x, z = torch.randn(b, ch, lat, lat, device=dev, dtype=dt), torch.randn(batch, 4, lat, lat, device=dev, dtype=dt)
    if dev == "cuda": vae.decode(z)   # warm-up: cuDNN picks its algorithms on the first call
    r |= _timings(lambda: te(ids), lambda i: unet(x, 999 - i, ctx), lambda: vae.decode(z), steps, decode_runs, sync)
  return r

def time_openvino(model:str, size:int, steps:int, batch:int, guidance:float, decode_runs:int=1, log=print) -> dict:
  import numpy as np, torch, openvino as ov
  class UNet(torch.nn.Module):   # forward(sample, timestep, encoder_hidden_states) -> sample: what convert_model traces
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, sample, timestep, encoder_hidden_states): return self.m(sample, timestep, encoder_hidden_states, return_dict=False)[0]
  class Decoder(torch.nn.Module):
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, z): return self.m.decode(z, return_dict=False)[0]
  class TextEncoder(torch.nn.Module):
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, ids): return self.m(ids, return_dict=False)[0]
  unet, vae, te = torch_models(model)
  b, bt, lat, ch, dim = _shapes(model, size, batch, guidance)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 49407, (bt, 77), dtype=np.int64)
  x, ctx = rng.standard_normal((b, ch, lat, lat), dtype=np.float32), rng.standard_normal((b, 77, dim), dtype=np.float32)
  z = rng.standard_normal((batch, 4, lat, lat), dtype=np.float32)
  core = ov.Core()
  r = {"engine": f"openvino {ov.__version__.split('-')[0]}", "device": "CPU", "precision": {}, "convert_s": {}, "compile_s": {}}
  def build(name:str, module, *example):
    t0 = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
      warnings.simplefilter("ignore")   # the tracer's warnings about python control flow on shapes: the shapes here are fixed
      m = ov.convert_model(module, example_input=tuple(torch.from_numpy(e) for e in example))
    t1 = time.perf_counter()
    c = core.compile_model(m, "CPU")
    r["convert_s"][name], r["compile_s"][name] = t1 - t0, time.perf_counter() - t1
    r["precision"][name], r["threads"] = c.get_property("INFERENCE_PRECISION_HINT").get_type_name(), c.get_property("INFERENCE_NUM_THREADS")
    log(f"openvino: {name} converted in {t1-t0:.1f} s, compiled in {r['compile_s'][name]:.1f} s ({r['precision'][name]})")
    return c.create_infer_request()
  t = np.array([999.0], dtype=np.float32)
  req_te, req_unet, req_vae = build("text_encoder", TextEncoder(te), ids), build("unet", UNet(unet), x, t, ctx), build("vae", Decoder(vae), z)
  del unet, vae, te   # the compiled models hold their own weights
  r |= _timings(lambda: req_te.infer([ids]), lambda i: req_unet.infer([x, np.array([999.0 - i], dtype=np.float32), ctx]),
                lambda: req_vae.infer([z]), steps, decode_runs)
  return r

def gemm_peak(n:int=4096, runs:int=3) -> dict:
  """The machine's practical GEMM rates in GFLOP/s: numpy float32 and torch bfloat16 n x n matmuls, median of `runs` after a warm-up."""
  import numpy as np
  a, b = (np.random.default_rng(i).standard_normal((n, n), dtype=np.float32) for i in (0, 1))
  def rate(f) -> float:
    f()
    return 2 * n**3 / statistics.median(_clock(f) for _ in range(runs)) / 1e9
  r: dict = {"n": n, "numpy_f32_gflops": rate(lambda: a @ b), "torch_bf16_gflops": None}
  try:
    import torch
    ta, tb = (torch.from_numpy(x).to(torch.bfloat16) for x in (a, b))
    r["torch_bf16_gflops"], r["torch_threads"] = rate(lambda: ta @ tb), torch.get_num_threads()
  except ImportError: pass
  return r

def run(name:str, a, log=print) -> dict:
  """One peer on examples/bench.py's arguments a."""
  log(f"timing {name} ...")
  if name == "diffusers": return time_torch(a.model, a.size, a.steps, a.batch, a.guidance, a.dtype, decode_runs=a.decode_runs)
  if name == "torch-bf16": return time_torch(a.model, a.size, a.steps, a.batch, a.guidance, "bfloat16", "cpu", a.decode_runs)
  if name == "openvino": return time_openvino(a.model, a.size, a.steps, a.batch, a.guidance, a.decode_runs, log)
  raise ValueError(name)

# *** the side-by-side table ***

def _precision(p) -> str:   # a peer's (UNet's) precision, short
  p = p.get("unet", "?") if isinstance(p, dict) else p
  return {"float32": "f32", "float": "f32", "bfloat16": "bf16", "float16": "f16", "half": "f16"}.get(p, p)

def table(r:dict) -> str:
  peak, b, bt = r.get("peak") or {}, (2 * r["batch"] if r.get("guidance", 7.5) != 1 else r["batch"]), 2 * r["batch"]
  def pct(gflops:float, prec:str) -> str:
    ref = peak.get("torch_bf16_gflops") if prec == "bf16" else peak.get("numpy_f32_gflops")
    return f"{100*gflops/ref:5.0f}% of {'bf16' if prec == 'bf16' else 'f32'}" if ref else ""
  te_runs = r["text_encoder_runs_s"]
  mine = {"step_s": r["step_s"], "vae_decode_s": r["vae_decode_s"][-1], "text_encoder_s": te_runs[-1]}
  first = ": tinysd's only call, compiling included"
  rows = [("step_s", f"steady UNet step (batch {b})", r["step_gflop"]),
          ("vae_decode_s", f"VAE decode (batch {r['batch']})" + (first + " (--decode-runs 2)" if len(r["vae_decode_s"]) == 1 else ""), r["vae_gflop"]),
          ("text_encoder_s", f"text encoder (batch {bt})" + (first if len(te_runs) == 1 else ""), r["text_encoder_gflop"])]
  prec = _precision(r['compute_dtype']) if r.get('gemm_precision', 'f32') == 'f32' else f"{_precision(r['compute_dtype'])} + bf16 GEMMs"
  engines = [("tinysd", f"tinysd ({r['device']} {prec})", mine, _precision(r["compute_dtype"]) if prec == _precision(r['compute_dtype']) else "bf16")]
  for name, p in r["peers"].items():
    threads = f", {p['threads']} threads" if p.get("threads") else ""
    engines.append((name, f"{name} ({p['engine']}, {p['device']} {_precision(p['precision'])}{threads})", p, _precision(p["precision"])))
  w = max(len(e[1]) for e in engines) + 2
  lines = [f"side by side, same shapes, same process (GFLOP/s from tinysd's FLOP counts; % of this machine's measured matmul peak):",
           f"  {'':{w}s} {'s':>9s} {'GFLOP/s':>8s} {'of peak':>12s} {'tinysd/peer':>12s}"]
  for key, label, gflop in rows:
    lines.append(f"  {label}")
    for name, desc, fig, prec in engines:
      t = fig[key]
      gf = gflop / t if t and gflop else float("nan")
      lines.append(f"    {desc:{w-2}s} {t:9.3f} {gf:8.1f} {pct(gf, prec):>12s} {'' if name == 'tinysd' else f'{mine[key]/t:11.2f}x':>12s}")
  for name, p in r["peers"].items():
    if "convert_s" in p:
      lines.append(f"  {name} model conversion (not in the times above): " +
                   ", ".join(f"{k} {p['convert_s'][k]:.1f} s + compile {p['compile_s'][k]:.1f} s ({p['precision'][k]})" for k in p["convert_s"]))
  return "\n".join(lines)

def peak_line(peak:dict) -> str:
  bf = f", torch bf16 {peak['torch_bf16_gflops']:.1f} GFLOP/s ({peak['torch_threads']} threads)" if peak.get("torch_bf16_gflops") else ""
  return f"machine matmul peak ({peak['n']}x{peak['n']}, median of 3): numpy f32 {peak['numpy_f32_gflops']:.1f} GFLOP/s{bf}"
