# Samplers: plain numpy generators over a raw UNet callable, k-diffusion style (one function per method, same signature).
# Each reproduces the matching diffusers scheduler: `schedule` is its set_timesteps (timesteps bit-exact, same dtype; alphas_cumprod
# bit-exact; sigmas to ~1 ulp) and each sampler keeps x in the space that scheduler keeps it in (VE x0+σn for Euler, VP otherwise),
# so trajectories can be compared step by step. Per-step coefficients stay Python floats, out of the model's kernels.
from __future__ import annotations
import math
from dataclasses import dataclass
from typing import Callable, Iterator
import numpy as np
from tinysd.configs import SchedulerConfig

Model = Callable[[np.ndarray, float], np.ndarray]   # (scaled model input (B,C,H,W) float32, timestep) -> raw UNet output (eps or v)
Noise = Callable[[tuple], np.ndarray]                # shape -> standard normal float32

@dataclass(frozen=True, eq=False)
class Schedule:
  sampler: str
  timesteps: np.ndarray          # one per model call: diffusers' scheduler.timesteps (int64, float32 for Euler); PLMS repeats the 2nd
  sigmas: np.ndarray | None      # float32 k-diffusion sigmas sqrt((1-ᾱ)/ᾱ), len(timesteps)+1, ending in 0 (euler*, dpm*); None for ddim/plms
  alphas_cumprod: np.ndarray     # float32 ᾱ of the training schedule
  final_alpha_cumprod: float     # ᾱ one step past t=0 (ddim/plms): 1 with set_alpha_to_one, else ᾱ_0
  step_ratio: int                # num_train_timesteps // steps: ddim/plms always step back by this, whatever the spacing (as diffusers)
  init_noise_sigma: float
  prediction_type: str
  ve: bool                       # x is x0 + σ·n (Euler samplers) rather than sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·n
  clip_sample: bool = False      # DDIM only

def _alphas_cumprod(cfg:SchedulerConfig) -> np.ndarray:
  n = cfg.num_train_timesteps
  def linspace(a, b):   # torch.linspace in float32: float32 step, evaluated in double from the nearer end
    a, b, i = np.float32(a), np.float32(b), np.arange(n)
    step = np.float64((b - a) / np.float32(n - 1))
    return np.where(i < n // 2, np.float64(a) + step * i, np.float64(b) - step * (n - 1 - i)).astype(np.float32)
  if cfg.beta_schedule == "linear": betas = linspace(cfg.beta_start, cfg.beta_end)
  elif cfg.beta_schedule == "scaled_linear": betas = linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5) ** 2
  else: raise ValueError(f"unsupported beta_schedule {cfg.beta_schedule!r}; choose from: linear, scaled_linear")
  return np.cumprod((np.float32(1) - betas).astype(np.float64)).astype(np.float32)   # torch's cumprod accumulates in double

def _spaced(steps:int, cfg:SchedulerConfig, dpm=False) -> np.ndarray:
  # diffusers' timestep_spacing (Lin et al. 2023, table 2), descending; DPM-Solver spaces steps+1 points and drops the last (t=0)
  n, m, sp = cfg.num_train_timesteps, steps + dpm, cfg.timestep_spacing
  if sp == "linspace": return np.linspace(0, n - 1, m)[::-1][:steps]
  if sp == "leading": return (np.arange(m) * (n // m))[::-1][:steps] + cfg.steps_offset
  if sp == "trailing": return np.round(np.arange(n, 0, -n / steps)) - 1
  raise ValueError(f"unsupported timestep_spacing {sp!r}; choose from: leading, trailing, linspace")

def _sigma_to_t(sigmas:np.ndarray, log_sigmas:np.ndarray) -> np.ndarray:
  # fractional timestep whose sigma is `sigma`, linear in log sigma between training timesteps
  ls = np.log(np.maximum(sigmas, 1e-10))
  lo = np.clip(np.searchsorted(log_sigmas, ls, side="right") - 1, 0, len(log_sigmas) - 2)
  w = np.clip((log_sigmas[lo] - ls) / (log_sigmas[lo] - log_sigmas[lo + 1]), 0, 1)
  return (1 - w) * lo + w * (lo + 1)

def schedule(sampler:str, steps:int, cfg:SchedulerConfig) -> Schedule:
  """Timesteps and noise levels for `sampler`, as the matching diffusers scheduler's set_timesteps(steps) makes them."""
  if sampler not in SAMPLERS: raise ValueError(f"unknown sampler {sampler!r}; choose from: {', '.join(SAMPLERS)}")
  ac = _alphas_cumprod(cfg)
  sig_train = np.sqrt((np.float32(1) - ac) / ac)
  final = 1.0 if cfg.set_alpha_to_one else float(ac[0])
  ts, sigmas, init, ve = None, None, 1.0, False
  if sampler in ("ddim", "plms"):
    ts = _spaced(steps, cfg).round().astype(np.int64)
    if sampler == "plms": ts = np.concatenate([ts[:2], ts[1:]])   # PNDM skip_prk_steps: the first step takes two model calls
  elif sampler in ("euler", "euler_a"):
    ts, ve = _spaced(steps, cfg).astype(np.float32), True
    sigmas = np.concatenate([np.interp(ts, np.arange(len(sig_train)), sig_train), [0.0]]).astype(np.float32)
    init = np.float32(sigmas.max())
    if cfg.timestep_spacing == "leading": init = np.sqrt(init * init + np.float32(1))   # diffusers' quirk: only for leading
  elif sampler == "dpm++2m_karras":   # Karras et al. 2022 eq. 5, rho=7, between the training schedule's extreme sigmas
    lo, hi = float(sig_train[0]) ** (1 / 7), float(sig_train[-1]) ** (1 / 7)
    sigmas = (hi + np.linspace(0, 1, steps) * (lo - hi)) ** 7
    ts = _sigma_to_t(sigmas, np.log(sig_train)).round().astype(np.int64)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
  else:
    ts = _spaced(steps, cfg, dpm=True).round().astype(np.int64)
    sigmas = np.concatenate([np.interp(ts, np.arange(len(sig_train)), sig_train), [0.0]]).astype(np.float32)
  return Schedule(sampler, ts, sigmas, ac, final, cfg.num_train_timesteps // steps, float(init), cfg.prediction_type, ve, cfg.clip_sample)

def start_for_strength(steps:int, strength:float) -> int:
  """img2img: index of the first step run at `strength` (diffusers' t_start)."""
  return max(steps - min(int(steps * strength), steps), 0)

def add_noise(x0:np.ndarray, noise:np.ndarray, sched:Schedule, start:int) -> np.ndarray:
  """Noise a clean latent to the level of step `start` (img2img), as the diffusers scheduler's add_noise does."""
  if sched.sigmas is None: ab = float(sched.alphas_cumprod[int(sched.timesteps[start])]); a, s = ab ** 0.5, (1 - ab) ** 0.5
  elif sched.ve: a, s = 1.0, float(sched.sigmas[start])
  else: sig = float(sched.sigmas[start]); a = 1 / math.sqrt(sig * sig + 1); s = sig * a
  return (a * np.asarray(x0, np.float32) + s * np.asarray(noise, np.float32)).astype(np.float32)

# *** helpers shared by the samplers

def _convert(out:np.ndarray, x:np.ndarray, a:float, s:float, pred:str) -> tuple[np.ndarray, np.ndarray]:
  # the one denoiser adapter: raw UNet output at VP input x = a·x0 + s·eps -> (x0, eps)
  if pred == "epsilon": return (x - s * out) / a, out
  if pred == "v_prediction": return a * x - s * out, a * out + s * x   # v = a·eps - s·x0 (Salimans & Ho 2022)
  raise ValueError(f"unsupported prediction_type {pred!r}; choose from: epsilon, v_prediction")

def _denoise_ve(model:Model, x:np.ndarray, sched:Schedule, i:int) -> np.ndarray:
  # k-diffusion denoiser D(x, σ) for VE x: the UNet sees x/sqrt(σ²+1) (diffusers' scale_model_input)
  sig = float(sched.sigmas[i]); c = math.sqrt(sig * sig + 1)
  x_in = x / np.float32(c)
  return _convert(model(x_in, float(sched.timesteps[i])), x_in, 1 / c, sig / c, sched.prediction_type)[0]

def _init(x:np.ndarray, sched:Schedule, start:int) -> np.ndarray:
  # start 0: x is unit-variance x_T (txt2img); start > 0: x comes from add_noise(x0, noise, sched, start) and is used as is
  # (so img2img at strength 1.0, start 0, starts from pure noise; diffusers' img2img would still add x0 weighted by sqrt(ᾱ_T) or 1)
  x = np.asarray(x, np.float32)
  return x * np.float32(sched.init_noise_sigma) if start == 0 else x

def _noise(noise:Noise | None) -> Noise:
  if noise is not None: return lambda shape: np.asarray(noise(shape), np.float32)
  rng = np.random.default_rng(0)
  return lambda shape: rng.standard_normal(shape, dtype=np.float32)

def _fed_back(sent, x:np.ndarray) -> np.ndarray:
  # a caller may send() a modified x back into the generator (inpainting's masked blend); a plain for-loop sends None
  return x if sent is None else np.asarray(sent, np.float32)

# *** samplers: generators yielding x after every model call (send() replaces it). `start` > 0 runs img2img from an add_noise output.

def sample_euler(model:Model, x:np.ndarray, sched:Schedule, *, noise:Noise | None=None, start:int=0) -> Iterator[np.ndarray]:
  """Euler method on the probability-flow ODE (Karras et al. 2022, alg. 2 without churn)."""
  x = _init(x, sched, start)
  for i in range(start, len(sched.timesteps)):
    x0, sig, sig_next = _denoise_ve(model, x, sched, i), float(sched.sigmas[i]), float(sched.sigmas[i + 1])
    x = x + (x - x0) / np.float32(sig) * np.float32(sig_next - sig)
    x = _fed_back((yield x), x)

def sample_euler_ancestral(model:Model, x:np.ndarray, sched:Schedule, *, noise:Noise | None=None, start:int=0) -> Iterator[np.ndarray]:
  """Euler ancestral: Euler step down to σ_down, then fresh noise up to σ_next (k-diffusion sample_euler_ancestral, eta=1)."""
  x, noise = _init(x, sched, start), _noise(noise)
  for i in range(start, len(sched.timesteps)):
    x0, sig, sig_next = _denoise_ve(model, x, sched, i), float(sched.sigmas[i]), float(sched.sigmas[i + 1])
    up = math.sqrt(sig_next ** 2 * (sig ** 2 - sig_next ** 2) / sig ** 2)
    down = math.sqrt(sig_next ** 2 - up ** 2)
    # noise is drawn on every step, even the last (up = 0), so a shared generator stays in step with diffusers
    x = x + (x - x0) / np.float32(sig) * np.float32(down - sig) + noise(x.shape) * np.float32(up)
    x = _fed_back((yield x), x)

def sample_ddim(model:Model, x:np.ndarray, sched:Schedule, *, noise:Noise | None=None, start:int=0, eta:float=0.0) -> Iterator[np.ndarray]:
  """DDIM (Song et al. 2020, eq. 12); eta=0 is deterministic, eta=1 is DDPM-like."""
  x, noise = _init(x, sched, start), _noise(noise)
  ab_of = lambda t: float(sched.alphas_cumprod[t]) if t >= 0 else sched.final_alpha_cumprod
  for t in sched.timesteps[start:]:
    ab, ab_prev = ab_of(int(t)), ab_of(int(t) - sched.step_ratio)
    x0, eps = _convert(model(x, float(t)), x, ab ** 0.5, (1 - ab) ** 0.5, sched.prediction_type)
    if sched.clip_sample: x0 = np.clip(x0, -1, 1)
    std = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) ** 0.5
    x = ab_prev ** 0.5 * x0 + (1 - ab_prev - std ** 2) ** 0.5 * eps
    if eta > 0: x = x + np.float32(std) * noise(x.shape)
    x = _fed_back((yield x), x)

def sample_plms(model:Model, x:np.ndarray, sched:Schedule, *, noise:Noise | None=None, start:int=0) -> Iterator[np.ndarray]:
  """PLMS: pseudo linear multi-step (Liu et al. 2022, PNDM eq. 12) with CompVis' Heun-like warm-up, 4th-order Adams-Bashforth after."""
  x, outs = _init(x, sched, start), []
  ab_of = lambda t: float(sched.alphas_cumprod[t]) if t >= 0 else sched.final_alpha_cumprod
  for k, t in enumerate(sched.timesteps[start:]):
    out, t = model(x, float(t)), int(t)
    if k == 1:   # 2nd call (at the 1st step's target) redoes the 1st step from x_T with the mean slope; it is not kept in the history
      # diffusers' PNDM takes the 1st step's start as t + step_ratio, which is only the true start for "leading" spacing
      out, x, t_prev, t = (out + outs[-1]) / 2, x_first, t, t + sched.step_ratio
    else:
      if k == 0: x_first = x
      outs, t_prev = outs[-3:] + [out], t - sched.step_ratio
      e = outs[::-1]
      out = (e[0] if len(e) == 1 else (3 * e[0] - e[1]) / 2 if len(e) == 2 else (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12 if len(e) == 3 else
             (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3]) / 24)
    ab, ab_prev = ab_of(t), ab_of(t_prev)
    # raw outputs are combined before conversion, as diffusers does; for v-prediction that converts with the current x and ᾱ
    eps = _convert(out, x, ab ** 0.5, (1 - ab) ** 0.5, sched.prediction_type)[1]
    x = (ab_prev / ab) ** 0.5 * x - (ab_prev - ab) / (ab * (1 - ab_prev) ** 0.5 + (ab * (1 - ab) * ab_prev) ** 0.5) * eps
    x = _fed_back((yield x), x)

def sample_dpmpp_2m(model:Model, x:np.ndarray, sched:Schedule, *, noise:Noise | None=None, start:int=0) -> Iterator[np.ndarray]:
  """DPM-Solver++(2M) (Lu et al. 2022, alg. 2), data prediction, first order on the first and last step."""
  x, x0_prev, h_prev = _init(x, sched, start), None, 0.0
  for i in range(start, len(sched.timesteps)):
    sig, sig_next = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
    a = 1 / math.sqrt(sig * sig + 1)   # x here is VP: x = a·x0 + sig·a·eps, and is what the UNet sees
    x0 = _convert(model(x, float(sched.timesteps[i])), x, a, sig * a, sched.prediction_type)[0]
    if sig_next == 0: x, h = x0, math.inf   # λ_next = inf: the update is exactly the denoised estimate
    else:
      a_next, h = 1 / math.sqrt(sig_next * sig_next + 1), math.log(sig / sig_next)   # h = λ_next - λ, λ = log(a/σ_vp) = -log(sig)
      d = x0 if x0_prev is None else x0 + np.float32(h / (2 * h_prev)) * (x0 - x0_prev)
      x = np.float32(sig_next * a_next / (sig * a)) * x - np.float32(a_next * math.expm1(-h)) * d
    x0_prev, h_prev = x0, h
    x = _fed_back((yield x), x)

SAMPLERS: dict[str, Callable[..., Iterator[np.ndarray]]] = {
  "plms": sample_plms, "ddim": sample_ddim, "euler": sample_euler, "euler_a": sample_euler_ancestral,
  "dpm++2m": sample_dpmpp_2m, "dpm++2m_karras": sample_dpmpp_2m}

def sample(name:str, model:Model, x:np.ndarray, steps:int, cfg:SchedulerConfig, **kw) -> Iterator[np.ndarray]:
  """Run sampler `name` for `steps` steps: a generator of latents after each model call (the last one is the result)."""
  if name not in SAMPLERS: raise ValueError(f"unknown sampler {name!r}; choose from: {', '.join(SAMPLERS)}")
  return SAMPLERS[name](model, x, schedule(name, steps, cfg), **kw)
