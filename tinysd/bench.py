# Benchmark on random weights at real sizes (speed and memory do not depend on weight values). Prints figures; asserts nothing.
# The weights are written to a checkpoint by a child process first and loaded the way a user's run loads them (memory-mapped, lazily),
# so the measuring process's memory peak is a real run's, not the artefact of building random weights.
from __future__ import annotations
import argparse, os, platform, resource, statistics, subprocess, sys, tempfile, time
import numpy as np
from tinygrad import GlobalCounters, Device
from tinysd_ops.quant import MODES
from tinysd_ops.tg import kernel_timer, PeakMemory
from tinysd import configs

# "tiny": an SD1-shaped model a few MB big (the test fixtures' sizes) for smoke runs of the bench itself; its figures mean nothing
TINY = configs.ModelConfig("sd1", (configs.CLIPConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2),),
  configs.UNetConfig(block_out_channels=(32, 64, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",)*2 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",)*2, cross_attention_dim=128, sample_size=8),
  configs.VAEConfig(block_out_channels=(32, 64), layers_per_block=1, sample_size=64))
MODELS = {"sd15": configs.SD15, "sd2": configs.SD2, "sdxl": configs.SDXL, "tiny": TINY}

# *** the machine ***

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512fp16", "amx_bf16", "amx_tile")   # what decides which GEMM rates are reachable

def cpu_info() -> dict:
  """{"model": name, "cores": logical cores, "flags": {flag: bool}} for CPU_FLAGS, from the first processor in /proc/cpuinfo (Linux).
  Elsewhere the platform's processor name, and flags None (unknown). The family/model numbers tell apart CPUs sold under one name."""
  from tinysd_ops.cpu import cpuinfo
  info = cpuinfo()
  model = info.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
  if "cpu family" in info: model += f" ({info.get('vendor_id', '?')} family {info['cpu family']} model {info.get('model', '?')})"
  flags = set(info["flags"].split()) if "flags" in info else None
  return {"model": model, "cores": os.cpu_count(), "flags": {f: (f in flags) if flags is not None else None for f in CPU_FLAGS}}

def cpu_line(c:dict|None=None) -> str:
  c = c or cpu_info()
  has, lacks = [f for f, v in c["flags"].items() if v], [f for f, v in c["flags"].items() if v is False]
  load = f"; load average {os.getloadavg()[0]:.1f} (other work on the cores skews every figure)" if hasattr(os, "getloadavg") else ""
  return f"cpu: {c['model']}, {c['cores']} logical cores; " + (f"has {' '.join(has) or '-'}, lacks {' '.join(lacks) or '-'}" if has or lacks
                                                              else "flags unknown") + load

def _status(field:str) -> float|None:
  try:
    with open("/proc/self/status") as f: return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) / 2**20
  except (OSError, StopIteration): return None

def rss_gib() -> float:
  """Peak RSS since the last reset_rss_peak() (Linux VmHWM), else since process start."""
  hwm = _status("VmHWM")
  return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux (bytes on macOS)

def reset_rss_peak() -> float:
  """Returns the peak RSS so far and starts a new window (Linux: writing 5 to clear_refs resets VmHWM to the current RSS)."""
  peak = rss_gib()
  try:
    with open("/proc/self/clear_refs", "w") as f: f.write("5")
  except OSError: pass
  return peak

def _sync(): Device[Device.DEFAULT].synchronize()

def timed(fn):
  GlobalCounters.reset()
  t0 = time.perf_counter(); out = fn(); _sync()
  return out, time.perf_counter() - t0, GlobalCounters.global_ops, GlobalCounters.kernel_count

# *** per-kernel profile ***

def profile_call(fn, top:int=15) -> dict:
  """Runs fn once with every kernel timed; the kernels aggregated by name, the `top` slowest first, and the totals."""
  GlobalCounters.reset()
  with kernel_timer() as rec:
    t0 = time.perf_counter(); fn(); _sync()
    wall = time.perf_counter() - t0
  agg: dict[str, list] = {}
  for name, t, ops, mem, n in rec:
    a = agg.setdefault(name, [0.0, 0, 0, 0])
    a[0] += t; a[1] += ops; a[2] += mem; a[3] += n
  ksum = sum(a[0] for a in agg.values())
  def row(name, t, ops, mem, n):
    return {"name": name, "ms": t * 1e3, "share": 100 * t / ksum if ksum else float("nan"), "gflops": ops / 1e9 / t if t else float("nan"),
            "gbs": mem / 1e9 / t if t else float("nan"), "count": n}
  rows = sorted(agg.items(), key=lambda kv: -kv[1][0])
  rest = [sum(a[i] for _, a in rows[top:]) for i in range(4)]
  return {"wall_s": wall, "kernel_s": ksum, "kernels": sum(a[3] for a in agg.values()), "kernel_count": GlobalCounters.kernel_count,
          "distinct": len(agg), "gflop": sum(a[1] for a in agg.values()) / 1e9, "top": [row(k, *a) for k, a in rows[:top]],
          "rest": row(f"(the other {len(rows) - top} kernel names)", *rest) if rows[top:] else None}

def profile_report(title:str, p:dict) -> str:
  lines = [f"{title}: {p['kernels']} kernels ({p['distinct']} names), kernel time {p['kernel_s']*1e3:.1f} ms of {p['wall_s']*1e3:.1f} ms wall "
           f"({100*p['kernel_s']/p['wall_s']:.0f}%), {p['gflop']:.2f} GFLOP = {p['gflop']/p['kernel_s'] if p['kernel_s'] else float('nan'):.1f} "
           f"GFLOP/s over kernel time", f"  {'ms':>9s} {'%':>6s} {'GFLOP/s':>8s} {'GB/s':>7s} {'n':>5s}  kernel"]
  for x in p["top"] + ([p["rest"]] if p["rest"] else []):
    lines.append(f"  {x['ms']:9.2f} {x['share']:6.1f} {x['gflops']:8.1f} {x['gbs']:7.1f} {x['count']:5d}  {x['name']}")
  return "\n".join(lines)

def write_weights(path:str, model:str, dtype:str, quant:str|None=None, seed:int=0):
  """Random real-size weights -> a checkpoint file: CompVis single file, or a tinysd quantised file when quant is given."""
  from tinysd.pipeline import random_pipeline, components
  from tinysd.checkpoint import write_single_file, write_quantized
  from tinygrad.nn.state import get_state_dict
  pipe = random_pipeline(MODELS[model], dtype, seed=seed, compute_dtype=dtype)   # weights as stored, not as computed
  if quant:
    from tinysd.pipeline import quantize_pipeline
    from tinysd.quantize import quant_meta
    quantize_pipeline(pipe, quant)
    write_quantized(*quant_meta(components(pipe)), pipe.config, path)
  else: write_single_file({n: get_state_dict(m) for n, m in components(pipe).items()}, pipe.config, path)

def weights_file(model:str, dtype:str, quant:str|None, path:str|None, log=print) -> tuple[str, bool]:
  """(path, temporary?) of a weights file for this model/dtype/quant, written by a child process when it does not exist yet."""
  if path and os.path.exists(path): return path, False
  tmp = path is None
  if tmp: path = os.path.join(tempfile.mkdtemp(prefix="tinysd-bench-"), "weights.safetensors")
  t0 = time.perf_counter()
  cmd = [sys.executable, "-m", "tinysd.bench", "--write-weights", path, "--model", model, "--dtype", dtype] + (["--quant", quant] if quant else [])
  subprocess.run(cmd, check=True)
  log(f"random weights written to {path} ({os.path.getsize(path)/2**30:.2f} GiB) in {time.perf_counter()-t0:.1f} s")
  return path, tmp

def run(model="sd15", size=512, steps=2, dtype="float32", guidance=7.5, batch=1, attention_chunk=1024, compress_shortcuts=None,
        lowmem=False, quant=None, vae_tile=None, weights=None, decode_runs=1, compute_dtype=None, text_encoder_runs=1, profile=False,
        profile_top=15, log=print) -> dict:
  import tinysd
  cfg = MODELS[model]
  r: dict = {"model": model, "size": size, "dtype": dtype, "batch": batch, "guidance": guidance, "device": Device.DEFAULT, "attention_chunk": attention_chunk,
             "compress_shortcuts": compress_shortcuts, "lowmem": lowmem, "quant": quant, "vae_tile": vae_tile, "phase_rss": {}, "phase_tg": {},
             "cpu": cpu_info(), "profile": {}}
  path, tmp = weights_file(model, dtype, quant, weights, log)
  r["file_gib"] = os.path.getsize(path) / 2**30
  mem = PeakMemory().__enter__()   # tinygrad's allocated bytes, per phase: reset() gives each phase's absolute peak
  r["baseline_rss_gib"] = _status("VmRSS") or float("nan")
  reset_rss_peak()
  def phase(name):
    r["phase_rss"][name], r["phase_tg"][name] = reset_rss_peak(), mem.reset() / 2**30
  try:
    t0 = time.perf_counter()
    pipe = tinysd.load(path, dtype=dtype, lowmem=lowmem, compute_dtype=compute_dtype)
    r["load_s"] = time.perf_counter() - t0
    r["compute_dtype"] = pipe.compute_dtype.name
    from tinysd_ops import cpu
    r["kernels"] = dict(cpu._state) if cpu.enabled() and str(pipe.device).split(":")[0] == "CPU" else {}
    r["gemm_precision"] = pipe.gemm_precision
    pipe.attention_chunk = attention_chunk or None
    pipe.compress_shortcuts = compress_shortcuts
    if vae_tile is not None: pipe.vae_tile = vae_tile or None   # None keeps the pipeline's default (tiled with lowmem)
    r["vae_tile"] = pipe.vae_tile
    r["resident_gib"] = GlobalCounters.mem_used / 2**30
    phase("load")
    prompts = [""] * batch + ["a photograph of an astronaut riding a horse"] * batch
    r["text_encoder_runs_s"] = []
    for i in range(max(text_encoder_runs, 1)):   # call 1 compiles, call 2 captures the JIT, later calls replay it
      (ctx, pooled), t, te_ops, _ = timed(lambda: pipe._encode(prompts))
      r["text_encoder_runs_s"].append(t)
      log(f"text encoder: {t:.2f} s")
    r["text_encoder_s"], r["text_encoder_gflop"] = r["text_encoder_runs_s"][0], te_ops / 1e9
    if profile:
      for _ in range(2 - len(r["text_encoder_runs_s"])): pipe._encode(prompts)   # up to a TinyJit replay
      r["profile"]["text_encoder"] = profile_call(lambda: pipe._encode(prompts), profile_top)
    phase("text encoder")
    lat = size // 8
    time_ids = None
    if pooled is not None:
      from tinygrad import Tensor
      time_ids = Tensor([[size, size, 0, 0, size, size]] * pooled.shape[0]).cast(pipe.dtype).realize()
    model_fn = pipe.denoiser(ctx, guidance, text_embeds=pooled, time_ids=time_ids)
    x = np.random.default_rng(0).standard_normal((batch, cfg.unet.out_channels, lat, lat), dtype=np.float32)
    times, ops, kernels = [], [], []
    with pipe.resident("unet"):
      r["unet_weights_gib"] = GlobalCounters.mem_used / 2**30
      for i in range(max(steps, 1) + 2):   # call 1 runs eagerly and compiles, call 2 captures the JIT, later calls replay it
        _, t, o, k = timed(lambda: model_fn(x, 999.0 - i))
        times.append(t); ops.append(o); kernels.append(k)
        log(f"unet step {i+1}: {t:.2f} s ({k} kernels)")
      if profile: r["profile"]["unet"] = profile_call(lambda: model_fn(x, 500.0), profile_top)   # call 3 onwards replays the JIT
    phase("unet")
    r["first_step_s"], r["step_s"], r["unet_kernels"] = times[0], statistics.median(times[2:]), kernels[0]
    r["step_gflop"] = ops[0] / 1e9
    r["step_gflops"] = ops[0] / 1e9 / r["step_s"] if ops[0] else float("nan")
    r["vae_decode_s"] = []
    for _ in range(max(decode_runs, 1)):
      _, t, vae_ops, r["vae_kernels"] = timed(lambda: pipe.decode(x))
      r["vae_decode_s"].append(t)
      log(f"vae decode: {t:.2f} s")
    r["vae_gflop"], r["vae_gflops"] = vae_ops / 1e9, vae_ops / 1e9 / t if vae_ops else float("nan")
    if profile: r["profile"]["vae"] = profile_call(lambda: pipe.decode(x), profile_top)
    phase("vae decode")
    r["peak_rss_gib"], r["peak_tinygrad_gib"] = max(r["phase_rss"].values()), max(r["phase_tg"].values())
  finally:
    mem.__exit__()
    if tmp:
      os.unlink(path)
      os.rmdir(os.path.dirname(path))
  return r

def options(r:dict) -> str:
  k = r.get("kernels") or {}
  attn = "fused C attention" if k.get("isa") else f"split attention {r['attention_chunk']}" if r["attention_chunk"] else "plain attention"
  parts = [f"{r['dtype']} weights, {r['compute_dtype']} compute", attn,
           f"CPU kernels {k['isa']} x{k['threads']} threads, GEMMs {r.get('gemm_precision', 'f32')}" if k.get("isa") else "tinygrad's kernels"]
  if r["compress_shortcuts"]: parts.append(f"shortcuts {r['compress_shortcuts']}")
  if r["lowmem"]: parts.append("lowmem")
  if r["quant"]: parts.append(f"weights {r['quant']}")
  if r["vae_tile"]: parts.append(f"VAE tiles {r['vae_tile']}")
  return ", ".join(parts)

def report(r:dict) -> str:
  dec = ", ".join(f"{t:.2f}" for t in r["vae_decode_s"])
  lines = [
    f"tinysd {r['model']} {r['size']}x{r['size']} batch {r['batch']} on {r['device']}: {options(r)}",
    f"  weights file          {r['file_gib']:8.2f} GiB",
    f"  load                  {r['load_s']:8.2f} s  ({r['resident_gib']:.2f} GiB resident after load)",
    f"  text encoder          {', '.join(f'{t:.2f}' for t in r['text_encoder_runs_s']):>8s} s  (batch {2*r['batch']}; the first compiles)",
    f"  first UNet step       {r['first_step_s']:8.2f} s  (incl. scheduling + compile, {r['unet_kernels']} kernels)",
    f"  steady UNet step      {r['step_s']:8.2f} s  (CFG batch {2*r['batch']}, {r['step_gflops']:.1f} GFLOP/s)",
    f"  VAE decode            {dec:>8s} s  ({r['vae_kernels']} kernels)",
    f"  UNet weights          {r['unet_weights_gib']:8.2f} GiB",
    f"  peak tinygrad memory  {r['peak_tinygrad_gib']:8.2f} GiB",
    f"  peak process RSS      {r['peak_rss_gib']:8.2f} GiB  (python + libraries at start: {r['baseline_rss_gib']:.2f} GiB)",
    "  per phase (peak RSS / peak tinygrad GiB): " + ", ".join(f"{k} {r['phase_rss'][k]:.2f}/{r['phase_tg'][k]:.2f}" for k in r["phase_rss"])]
  titles = {"unet": "profile: one steady UNet step (TinyJit replay)", "vae": "profile: one VAE decode (warm)",
            "text_encoder": "profile: one text encoder call (TinyJit replay)"}
  lines += [profile_report(t, r["profile"][k]) for k, t in titles.items() if k in r.get("profile", {})]
  return "\n".join(lines)

def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="tinysd bench", description="SD text encoder + UNet steps + VAE decode on random weights at real sizes")
  p.add_argument("--random-weights", action="store_true", help="accepted for compatibility: the bench always uses random weights")
  p.add_argument("--model", default="sd15", choices=list(MODELS), help="tiny: an SD1-shaped model of a few MB, for smoke runs of the bench")
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--steps", type=int, default=2, help="timed steady-state UNet steps (after the compile and JIT-capture calls)")
  p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
  p.add_argument("--compute-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                 help="default: --dtype, except fp16/bf16 weights compute in fp32 on the CPU")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--guidance", type=float, default=7.5)
  p.add_argument("--split-attention", action=argparse.BooleanOptionalAction, default=True, help="online-softmax tiled attention (ops/attention.py)")
  p.add_argument("--attention-chunk", type=int, default=1024, help="split attention tile (tokens)")
  p.add_argument("--compress-shortcuts", default=None, choices=["fp16", "int8"], help="hold the UNet skip tensors compressed (ops/shortcuts.py)")
  p.add_argument("--lowmem", action="store_true", help="each model read from the checkpoint just for its use")
  p.add_argument("--quant", default=None, choices=list(MODES), help="UNet + text encoder weights quantised (loaded from a quantised file)")
  p.add_argument("--vae-tile", type=int, default=None, help="tiled VAE decode, tile in latent pixels (ops/tiling.py); default 32 with --lowmem, 0 = off")
  p.add_argument("--weights", default=None, help="reuse (or write, then keep) the random-weights file at this path")
  p.add_argument("--decode-runs", type=int, default=1, help="VAE decodes to time (the first includes compiling)")
  p.add_argument("--text-encoder-runs", type=int, default=1, help="text encoder calls to time (1: compiles, 2: captures the JIT, 3..: replay)")
  p.add_argument("--profile", action="store_true", help="print the slowest kernels of one steady UNet step, one VAE decode and one text encoder "
                 "call (every kernel synchronised and timed: wall times of the profiled calls are not the bench's figures)")
  p.add_argument("--profile-top", type=int, default=15, metavar="N", help="kernel names listed per component with --profile")
  p.add_argument("--json", default=None, help="also write the figures to this JSON file")
  p.add_argument("--write-weights", default=None, help=argparse.SUPPRESS)
  return p

def main(argv=None) -> int:
  a = parser().parse_args(argv)
  if a.write_weights: write_weights(a.write_weights, a.model, a.dtype, a.quant); return 0
  if a.size % 8: print("tinysd: error: --size must be a multiple of 8", file=sys.stderr); return 2
  print(cpu_line(), flush=True)
  r = run(**kwargs(a))
  print(report(r))
  if a.json:
    import json
    with open(a.json, "w") as f: json.dump(r, f, indent=1)
  return 0

def kwargs(a) -> dict:
  return dict(model=a.model, size=a.size, steps=a.steps, dtype=a.dtype, guidance=a.guidance, batch=a.batch,
              attention_chunk=a.attention_chunk if a.split_attention else 0, compress_shortcuts=a.compress_shortcuts, lowmem=a.lowmem,
              quant=a.quant, vae_tile=a.vae_tile, weights=a.weights, decode_runs=a.decode_runs,
              compute_dtype=a.compute_dtype, text_encoder_runs=a.text_encoder_runs, profile=a.profile, profile_top=a.profile_top)

if __name__ == "__main__": sys.exit(main())
