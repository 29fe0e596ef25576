# End-to-end txt2img parity with diffusers' StableDiffusionPipeline: same tiny random weights, same x_T, same ancestral noise.
import numpy as np, pytest, torch
from fixtures import make_tiny_pipeline_folder
import tinysd

STEPS, SIZE = 5, 64
SCHEDULERS = {  # tinysd sampler -> (diffusers scheduler class name, extra config)
  "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
  "ddim": ("DDIMScheduler", {}),
  "euler": ("EulerDiscreteScheduler", {}),
  "euler_a": ("EulerAncestralDiscreteScheduler", {}),
  "dpm++2m": ("DPMSolverMultistepScheduler", {}),
  "dpm++2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return make_tiny_pipeline_folder(tmp_path_factory.mktemp("sd1"), family="sd1")

@pytest.fixture(scope="module")
def pipes(folder):
  import diffusers
  ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False, local_files_only=True)
  ref.set_progress_bar_config(disable=True)
  return ref, tinysd.load(folder)

def reference(ref, sampler, x_T, prompt, negative, guidance, seed):
  import diffusers
  cls, extra = SCHEDULERS[sampler]
  ref.scheduler = getattr(diffusers, cls).from_config(ref.scheduler.config, **extra)
  g = torch.Generator().manual_seed(seed)
  return ref(prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=guidance, height=SIZE, width=SIZE,
             latents=torch.from_numpy(x_T), generator=g, output_type="np").images

@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_txt2img_matches_diffusers(pipes, sampler):
  ref, pipe = pipes
  lat = SIZE // pipe.vae_scale
  x_T = np.random.default_rng(1).standard_normal((2, 4, lat, lat), dtype=np.float32)
  prompts, negative, guidance = ["a photo of a cat", "a red lighthouse at dusk, oil painting"], "blurry", 7.5
  want = reference(ref, sampler, x_T, prompts, [negative] * 2, guidance, seed=3)
  # chaotic random-weight models: measure how far the reference itself moves for a 1e-6 relative change of x_T
  moved = np.abs(reference(ref, sampler, x_T * (1 + 1e-6), prompts, [negative] * 2, guidance, seed=3) - want).max()
  bound = 2e-3 if moved <= 4e-4 else 5 * moved
  g = torch.Generator().manual_seed(3)   # the same draws diffusers' scheduler makes for ancestral steps
  got = pipe.txt2img(prompts, negative_prompt=negative, steps=STEPS, guidance_scale=guidance, width=SIZE, height=SIZE, sampler=sampler,
                     latents=x_T, output_type="np", ancestral_noise=lambda shape: torch.randn(shape, generator=g).numpy())
  assert got.shape == want.shape == (2, SIZE, SIZE, 3)
  err = np.abs(got - want).max()
  assert err <= bound, f"{sampler}: max abs {err:.2e} > bound {bound:.2e} (reference moved {moved:.2e})"

def test_no_cfg_and_seed_reproducible(pipes):
  _, pipe = pipes
  a = pipe.txt2img("a cat", steps=2, guidance_scale=1.0, width=SIZE, height=SIZE, seed=7, sampler="euler_a", output_type="np")
  b = pipe.txt2img("a cat", steps=2, guidance_scale=1.0, width=SIZE, height=SIZE, seed=7, sampler="euler_a", output_type="np")
  c = pipe.txt2img("a cat", steps=2, guidance_scale=1.0, width=SIZE, height=SIZE, seed=8, sampler="euler_a", output_type="np")
  assert np.array_equal(a, b) and not np.array_equal(a, c)
  assert a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1

def test_guidance_one_matches_diffusers(pipes):
  ref, pipe = pipes
  lat = SIZE // pipe.vae_scale
  x_T = np.random.default_rng(2).standard_normal((1, 4, lat, lat), dtype=np.float32)
  want = reference(ref, "ddim", x_T, ["a cat"], "", 1.0, seed=0)
  got = pipe.txt2img("a cat", steps=STEPS, guidance_scale=1.0, width=SIZE, height=SIZE, sampler="ddim", latents=x_T, output_type="np")
  assert np.abs(got - want).max() <= 2e-3

def test_pil_output_and_bad_sizes(pipes):
  _, pipe = pipes
  ims = pipe.txt2img("a cat", steps=1, width=SIZE, height=SIZE + 8, batch_size=2, seed=1)
  assert len(ims) == 2 and ims[0].size == (SIZE, SIZE + 8) and ims[0].mode == "RGB"
  with pytest.raises(ValueError, match="multiple of 8"): pipe.txt2img("a cat", steps=1, width=60, height=64)
  with pytest.raises(ValueError, match="unknown sampler"): pipe.txt2img("a cat", steps=1, width=64, height=64, sampler="heun++")

def test_lowmem_residency_matches_and_releases(folder, pipes):
  _, pipe = pipes
  lean = tinysd.load(folder, lowmem=True)
  lat = SIZE // pipe.vae_scale
  x_T = np.random.default_rng(6).standard_normal((1, 4, lat, lat), dtype=np.float32)
  kw = dict(steps=2, guidance_scale=7.5, width=SIZE, height=SIZE, sampler="ddim", latents=x_T, output_type="np")
  assert np.array_equal(lean.txt2img("a cat", **kw), pipe.txt2img("a cat", **kw))
  # after the call no model holds a realised weight buffer: each is a lazy read of the checkpoint again
  assert not lean.unet.conv_in.weight.uop.is_realized and not lean.vae.decoder.conv_in.weight.uop.is_realized
  assert not any(k[0] == "unet" for k in lean._jits)

def test_fp16_vae_overflow_falls_back_to_fp32(folder):
  from tinygrad import dtypes
  from tinygrad.nn.state import get_parameters
  pipe = tinysd.load(folder, dtype="float16", compute_dtype="float16")   # on the CPU fp16 weights compute in fp32 by default
  # blow up one decoder conv so its activations overflow fp16 (max 65504) but stay finite in fp32
  w = pipe.vae.decoder.conv_in.weight
  w.replace((w.float() * 3e4).cast(dtypes.float16)).realize()
  lat = SIZE // pipe.vae_scale
  z = np.random.default_rng(7).standard_normal((1, 4, lat, lat), dtype=np.float32)
  from tinygrad import Tensor
  raw16 = pipe.vae.decode(Tensor(z / pipe.vae.scaling_factor).cast(dtypes.float16)).float().numpy()
  assert not np.isfinite(raw16).all()   # the setup really overflows in fp16
  img = pipe.decode(z)
  assert np.isfinite(img).all() and pipe.vae_dtype == dtypes.float32
  want = ((pipe.vae.decode(Tensor(z / pipe.vae.scaling_factor)).float().numpy() + 1) / 2).clip(0, 1).transpose(0, 2, 3, 1)
  assert np.abs(img - want).max() < 1e-5
  assert all(p.dtype == dtypes.float32 for p in get_parameters(pipe.vae))

def test_fp16_weights_fp32_compute(folder, tmp_path):
  # fp16 storage + fp32 compute (the CPU default for fp16) computes exactly what fp32 computes on the fp16-rounded weights, while only the
  # fp16 form is held in memory
  from tinygrad import dtypes
  from tinysd.checkpoint import read_checkpoint, write_single_file
  f16 = tmp_path / "f16.safetensors"
  ck = read_checkpoint(folder, dtype="float16")
  write_single_file(ck.state_dicts, ck.config, f16)
  mixed, full = tinysd.load(f16, dtype="float16", compute_dtype="float32"), tinysd.load(f16, dtype="float32")
  assert mixed.compute_dtype == dtypes.float32 and mixed.unet.conv_in.weight.dtype == dtypes.float32
  assert mixed.unet.conv_in.weight.uop.src[0].dtype == dtypes.float16   # a lazy cast of the stored fp16 buffer
  x = np.random.default_rng(8).standard_normal((1, 4, SIZE // 2, SIZE // 2), dtype=np.float32)
  kw = dict(steps=2, guidance_scale=7.5, width=SIZE, height=SIZE, sampler="euler", latents=x, output_type="np")
  assert np.abs(mixed.txt2img("a cat", **kw) - full.txt2img("a cat", **kw)).max() < 1e-5

def test_bf16_compute_error(folder, pipes):
  # --compute-dtype bfloat16 on the CPU: fp32 tensors, GEMM/conv operands rounded to bf16 (ops/cpu.py precision). Its image error against
  # diffusers fp32 is bounded by what torch's own bf16 pipeline (the model cast to bf16, as CPU users run it) gives on the same weights and
  # x_T, measured here, with a cap; and it must be an actual change (nonzero), else the mode did not switch.
  from tinysd_ops import cpu
  if not cpu.enabled() or not cpu.bf16_available(): pytest.skip("no AVX512-BF16 fast path")
  ref, pipe = pipes
  lat = SIZE // pipe.vae_scale
  x_T = np.random.default_rng(3).standard_normal((1, 4, lat, lat), dtype=np.float32)
  kw = dict(steps=STEPS, guidance_scale=7.5, width=SIZE, height=SIZE, seed=0, sampler="euler", output_type="np")
  ours32 = pipe.txt2img("a photo of a cat", latents=x_T, **kw)
  ours16 = tinysd.load(folder, compute_dtype="bfloat16").txt2img("a photo of a cat", latents=x_T, **kw)
  import diffusers
  def run_ref(dtype):   # Euler from a clean config: the sampler tests above leave use_karras_sigmas in ref.scheduler.config
    ref.to(dtype)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config, use_karras_sigmas=False)
    try:
      return np.asarray(ref("a photo of a cat", negative_prompt="", num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                            latents=torch.from_numpy(x_T).to(dtype), generator=torch.Generator().manual_seed(0), output_type="np").images, np.float32)
    finally: ref.to(torch.float32)
  want = run_ref(torch.float32)
  torch_bf16 = run_ref(torch.bfloat16)
  e_ours, e_torch = np.abs(ours16 - want).max(), np.abs(torch_bf16 - want).max()
  assert np.abs(ours32 - want).max() < 2e-3
  print(f"bf16 image error: tinysd {e_ours:.2e}, torch {e_torch:.2e}")
  assert 0 < e_ours <= min(max(e_torch, 1e-3), 5e-2), (e_ours, e_torch)
