# Samplers vs the diffusers schedulers they reproduce, driven the way StableDiffusion(Img2Img)Pipeline drives them, with the same fake UNet
# and the same torch generator for ancestral noise. Whole trajectories (every step's latents) and the timesteps the model saw must match.
from types import SimpleNamespace
import numpy as np, pytest, torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, PNDMScheduler,
                       StableDiffusionImg2ImgPipeline)
from tinysd.configs import SchedulerConfig
from tinysd.samplers import SAMPLERS, add_noise, sample, schedule, start_for_strength

NAMES = list(SAMPLERS)
PREDS = ("epsilon", "v_prediction")
SHAPE = (2, 4, 8, 8)
# Max abs difference per step, relative to that step's latent scale (max |x| of the reference). Both sides run in float32 (eps 1.2e-7),
# but we fold the per-step scalars in double and in another order than torch, and torch's float32 sqrt is ~1 ulp off, so every step
# differs by a few ulp; over <= 21 steps of a well-conditioned update that stays <= ~2e-6 (measured). A real slip (a coefficient,
# an off-by-one sigma or timestep, a wrong warm-up) moves the trajectory by >= 1e-3.
TOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")   # inside diffusers, numpy 2

def reference(name:str, cfg:SchedulerConfig):
  # SD1.5's scheduler_config.json plus our config's fields; from_config drops what a class does not take, as pipelines do
  d = dict(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end, beta_schedule=cfg.beta_schedule,
           steps_offset=cfg.steps_offset, skip_prk_steps=True, set_alpha_to_one=cfg.set_alpha_to_one, clip_sample=cfg.clip_sample,
           prediction_type=cfg.prediction_type, timestep_spacing=cfg.timestep_spacing)
  if name == "plms": return PNDMScheduler.from_config(d)
  if name == "ddim": return DDIMScheduler.from_config(d)
  if name == "euler": return EulerDiscreteScheduler.from_config(d)
  if name == "euler_a": return EulerAncestralDiscreteScheduler.from_config(d)
  return DPMSolverMultistepScheduler.from_config(d, solver_order=2, algorithm_type="dpmsolver++", use_karras_sigmas=name == "dpm++2m_karras")

class FakeUNet:
  # deterministic, not trivial: mixes channels and neighbouring pixels linearly and adds a t-dependent pattern; records its timesteps
  def __init__(self):
    rng = np.random.default_rng(1)
    self.w, self.phase, self.calls = (rng.standard_normal((4, 4)) / 2).astype(np.float32), rng.uniform(0, 2 * np.pi, SHAPE[1:]), []
  def __call__(self, x:np.ndarray, t:float) -> np.ndarray:
    self.calls.append(float(t))
    return (np.einsum("oc,bchw->bohw", self.w, x) + 0.3 * np.roll(x, 1, -1) + 0.5 * np.cos(t / 150 + self.phase)).astype(np.float32)

def inputs(seed=2):
  rng = np.random.default_rng(seed)
  return rng.standard_normal(SHAPE, dtype=np.float32), (rng.uniform(-1, 1, SHAPE) * 2).astype(np.float32)   # x_T / noise, clean latent

def run_reference(name, cfg, steps, x, *, strength=None, x0=None, **kw):
  s, gen, model, traj = reference(name, cfg), torch.Generator().manual_seed(0), FakeUNet(), []
  s.set_timesteps(steps)
  if strength is None: ts, lat = s.timesteps, torch.from_numpy(x) * s.init_noise_sigma   # StableDiffusionPipeline.prepare_latents
  else:   # StableDiffusionImg2ImgPipeline: its own get_timesteps (slices timesteps, set_begin_index), then add_noise at ts[0]
    ts, _ = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=s), steps, strength, "cpu")
    lat = s.add_noise(torch.from_numpy(x0), torch.from_numpy(x), ts[:1])
  lat0 = lat.numpy().copy()
  for t in ts:
    out = torch.from_numpy(model(s.scale_model_input(lat, t).numpy(), float(t)))
    extra = {"generator": gen} if name == "euler_a" else {"generator": gen, **kw} if name == "ddim" else {}
    lat = s.step(out, t, lat, **extra).prev_sample
    traj.append(lat.numpy().copy())
  return lat0, traj, model.calls

def run_ours(name, cfg, steps, x, *, strength=None, x0=None, **kw):
  sched, gen, model = schedule(name, steps, cfg), torch.Generator().manual_seed(0), FakeUNet()
  start = 0 if strength is None else start_for_strength(steps, strength)
  if strength is not None: x = add_noise(x0, x, sched, start)
  traj = list(SAMPLERS[name](model, x, sched, noise=lambda shape: torch.randn(shape, generator=gen).numpy(), start=start, **kw))
  return x, traj, model.calls

def assert_close_traj(ours, ref):
  assert len(ours) == len(ref) > 0
  for i, (a, b) in enumerate(zip(ours, ref)):
    assert a.dtype == np.float32 and a.shape == b.shape
    err = np.abs(a - b).max() / np.abs(b).max()
    assert err <= TOL, f"step {i}: max abs diff {err:.2e} of the latent scale"

def compare(name, cfg, steps, **kw):
  x, x0 = inputs()
  r0, ref, ref_calls = run_reference(name, cfg, steps, x, x0=x0, **kw)
  o0, ours, our_calls = run_ours(name, cfg, steps, x, x0=x0, **kw)
  assert our_calls == ref_calls
  if "strength" in kw: assert_close_traj([o0], [r0])   # add_noise
  assert_close_traj(ours, ref)
  return ours

@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
@pytest.mark.parametrize("name", NAMES)
def test_schedule(name, beta_schedule, spacing):
  cfg = SchedulerConfig(beta_schedule=beta_schedule, timestep_spacing=spacing)
  for steps in (1, 2, 3, 7, 20, 50, 150):
    s, ours = reference(name, cfg), schedule(name, steps, cfg)
    s.set_timesteps(steps)
    ts = s.timesteps.numpy()
    assert ours.timesteps.dtype == ts.dtype and np.array_equal(ours.timesteps, ts), (steps, ours.timesteps, ts)
    assert np.array_equal(ours.alphas_cumprod, s.alphas_cumprod.numpy())
    if name in ("plms", "ddim"): assert ours.sigmas is None
    else:   # torch's float32 sqrt is not correctly rounded: allow 3 ulp
      np.testing.assert_allclose(ours.sigmas, s.sigmas.numpy(), rtol=3.6e-7, atol=0)
      assert ours.sigmas.dtype == np.float32 and ours.sigmas[-1] == 0
    np.testing.assert_allclose(ours.init_noise_sigma, float(s.init_noise_sigma), rtol=3.6e-7)

@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("name", NAMES)
def test_txt2img(name, pred, spacing):
  for steps in (1, 2, 7, 20):
    compare(name, SchedulerConfig(prediction_type=pred, timestep_spacing=spacing), steps)

@pytest.mark.parametrize("strength", [0.5, 0.75])
@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("name", NAMES)
def test_img2img(name, pred, strength):
  for steps in (7, 20):
    ours = compare(name, SchedulerConfig(prediction_type=pred), steps, strength=strength)
    assert len(ours) == len(schedule(name, steps, SchedulerConfig()).timesteps) - start_for_strength(steps, strength)

def test_start_for_strength():
  s = reference("ddim", SchedulerConfig())
  for steps in (1, 7, 20, 50):
    s.set_timesteps(steps)
    for strength in (0.0, 0.3, 0.5, 0.75, 0.99, 1.0):
      ts, n = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=s), steps, strength, "cpu")
      assert start_for_strength(steps, strength) == steps - n == steps - len(ts)

@pytest.mark.parametrize("name", ["ddim", "plms"])
def test_set_alpha_to_one(name):
  for pred in PREDS:
    on = compare(name, SchedulerConfig(prediction_type=pred, set_alpha_to_one=True), 7)
    off = compare(name, SchedulerConfig(prediction_type=pred), 7)
    assert np.abs(on[-1] - off[-1]).max() > 1e-3   # the flag reaches the last step

@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta(eta):
  for pred in PREDS:
    noisy = compare("ddim", SchedulerConfig(prediction_type=pred), 7, eta=eta)
    assert np.abs(noisy[-1] - compare("ddim", SchedulerConfig(prediction_type=pred), 7)[-1]).max() > 1e-2

def test_ddim_clip_sample():
  clipped = compare("ddim", SchedulerConfig(clip_sample=True), 7)
  assert np.abs(clipped[-1] - compare("ddim", SchedulerConfig(), 7)[-1]).max() > 1e-2

def test_dispatch_and_noise():
  cfg, (x, _) = SchedulerConfig(), inputs()
  model = FakeUNet()
  gen = sample("euler_a", model, x, 7, cfg)
  assert model.calls == []   # a lazy generator: the caller drives it
  a, b = list(gen), list(sample("euler_a", FakeUNet(), x, 7, cfg))
  assert len(a) == 7 and all(np.array_equal(p, q) for p, q in zip(a, b))   # default noise is seeded
  c = list(sample("euler_a", FakeUNet(), x, 7, cfg, noise=lambda shape: np.random.default_rng(5).standard_normal(shape)))
  assert np.abs(c[-1] - a[-1]).max() > 1e-2
  assert len(list(sample("plms", FakeUNet(), x, 7, cfg))) == 8   # PLMS' first step takes two model calls

def test_unknown_sampler():
  msg = "unknown sampler 'foo'; choose from: plms, ddim, euler, euler_a, dpm\\+\\+2m, dpm\\+\\+2m_karras"
  with pytest.raises(ValueError, match=msg): sample("foo", FakeUNet(), inputs()[0], 7, SchedulerConfig())
  with pytest.raises(ValueError, match=msg): schedule("foo", 7, SchedulerConfig())
