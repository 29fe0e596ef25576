# img2img and inpainting parity with diffusers (same tiny random weights, same noise), and the masked-blend method on ordinary UNets.
import numpy as np, pytest, torch
from PIL import Image
from fixtures import make_tiny_pipeline_folder
import tinysd
from tinysd.images import load_mask, alpha_mask, green_mask, inpaint_mask, load_image, ImageError

SIZE = 64
ABS = 2e-3   # issue bar for decoded images in [0,1]

@pytest.fixture(autouse=True)
def posterior_mean(monkeypatch):
  # tinysd encodes init images to the posterior mean; make diffusers do the same so both see identical image latents
  from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
  monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)

def smooth_image(seed=0) -> Image.Image:
  rng = np.random.default_rng(seed)
  small = rng.random((8, 8, 3))
  return Image.fromarray((small * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BICUBIC)

@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
  folder = make_tiny_pipeline_folder(tmp_path_factory.mktemp("sd1"), family="sd1")
  return folder, tinysd.load(folder)

@pytest.fixture(scope="module")
def sd1_inpaint(tmp_path_factory):
  folder = make_tiny_pipeline_folder(tmp_path_factory.mktemp("sd1i"), family="sd1", inpaint=True)
  return folder, tinysd.load(folder)

def scheduler(ref, sampler):
  import diffusers
  cls, extra = {"ddim": ("DDIMScheduler", {}), "euler_a": ("EulerAncestralDiscreteScheduler", {}), "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
                "dpm++2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}), "euler": ("EulerDiscreteScheduler", {})}[sampler]
  ref.scheduler = getattr(diffusers, cls).from_config(ref.scheduler.config, **extra)
  ref.set_progress_bar_config(disable=True)
  return ref

def bound_for(run_ref, want):
  moved = np.abs(run_ref(1 + 1e-6) - want).max()   # the reference's own sensitivity (random tiny models can be chaotic)
  return 2e-3 if moved <= 4e-4 else 5 * moved

@pytest.mark.parametrize("sampler,strength", [("ddim", 0.75), ("euler_a", 0.5), ("dpm++2m_karras", 0.75), ("plms", 0.6)])
def test_img2img_matches_diffusers(sd1, sampler, strength):
  import diffusers
  folder, pipe = sd1
  ref = scheduler(diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False), sampler)
  image, steps, lat = smooth_image(), 6, SIZE // pipe.vae_scale
  mod = diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img
  def run_ref(scale=1.0):   # scale perturbs the img2img noise the pipeline draws (its module's randn_tensor), not the ancestral noise
    g, orig = torch.Generator().manual_seed(11), mod.randn_tensor
    mod.randn_tensor = lambda *a, **k: orig(*a, **k) * scale
    try: return ref("a cat", image=image, strength=strength, num_inference_steps=steps, guidance_scale=7.5, generator=g, output_type="np").images
    finally: mod.randn_tensor = orig
  want = run_ref()
  bound = bound_for(run_ref, want)
  g = torch.Generator().manual_seed(11)
  noise = torch.randn((1, 4, lat, lat), generator=g).numpy()   # diffusers' first draw is the img2img noise, then ancestral noise
  got = pipe.img2img("a cat", image, strength=strength, steps=steps, guidance_scale=7.5, sampler=sampler, noise=noise, output_type="np",
                     ancestral_noise=lambda shape: torch.randn(shape, generator=g).numpy())
  err = np.abs(got - want).max()
  assert err <= bound, f"{sampler}: {err:.2e} > {bound:.2e}"

def square_mask() -> Image.Image:
  m = np.zeros((SIZE, SIZE), np.uint8); m[16:48, 8:40] = 255
  return Image.fromarray(m)

@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_inpaint_9_channel_matches_diffusers(sd1_inpaint, sampler):
  import diffusers
  folder, pipe = sd1_inpaint
  assert pipe.config.unet.in_channels == 9 and pipe.config.family.endswith("inpaint")
  ref = scheduler(diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False), sampler)
  lat = SIZE // pipe.vae_scale
  x_T = np.random.default_rng(4).standard_normal((1, 4, lat, lat), dtype=np.float32)
  def run_ref(scale=1.0):
    return ref("a red cat", image=smooth_image(1), mask_image=square_mask(), num_inference_steps=5, guidance_scale=7.5, height=SIZE, width=SIZE,
               latents=torch.from_numpy(x_T * scale), output_type="np").images
  want = run_ref()
  bound = bound_for(run_ref, want)
  got = pipe.inpaint("a red cat", smooth_image(1), square_mask(), steps=5, guidance_scale=7.5, sampler=sampler, noise=x_T, output_type="np")
  err = np.abs(got - want).max()
  assert err <= bound, f"{sampler}: {err:.2e} > {bound:.2e}"

def test_inpaint_empty_prompt_on_inpainting_model(sd1_inpaint):
  _, pipe = sd1_inpaint
  out = pipe.inpaint("", smooth_image(2), square_mask(), steps=2, output_type="np", seed=1)
  assert out.shape == (1, SIZE, SIZE, 3) and np.isfinite(out).all()

@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_masked_blend_matches_diffusers_and_keeps_unmasked(sd1, sampler):
  import diffusers
  folder, pipe = sd1
  ref = scheduler(diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False), sampler)
  lat = SIZE // pipe.vae_scale
  x_T = np.random.default_rng(5).standard_normal((1, 4, lat, lat), dtype=np.float32)
  def run_ref(scale=1.0):
    g = torch.Generator().manual_seed(2)
    return ref("a red cat", image=smooth_image(3), mask_image=square_mask(), num_inference_steps=5, guidance_scale=7.5, height=SIZE, width=SIZE,
               latents=torch.from_numpy(x_T * scale), generator=g, output_type="np").images
  want = run_ref()
  bound = bound_for(run_ref, want)
  g = torch.Generator().manual_seed(2)
  got = pipe.inpaint("a red cat", smooth_image(3), square_mask(), steps=5, guidance_scale=7.5, sampler=sampler, noise=x_T, output_type="np",
                     ancestral_noise=lambda shape: torch.randn(shape, generator=g).numpy())
  assert np.abs(got - want).max() <= bound
  # the unmasked region keeps the input: after the last blend the latents there are the init image's latents exactly (a random tiny VAE
  # has attention in its decoder, so pixels anywhere depend on the whole latent: compare where the method acts, in latent space)
  lat_out = pipe.inpaint("a red cat", smooth_image(3), square_mask(), steps=5, guidance_scale=7.5, sampler=sampler, noise=x_T, output_type="latent",
                         ancestral_noise=lambda shape: torch.randn(shape, generator=torch.Generator().manual_seed(2)).numpy())
  x0 = pipe.encode_image(load_image(smooth_image(3))[None])
  keep = np.ones(lat_out.shape[-2:], bool); keep[16 // 2:48 // 2, 8 // 2:40 // 2] = False   # vae_scale 2 for the tiny VAE
  assert pipe.vae_scale == 2
  assert np.abs(lat_out[..., keep] - x0[..., keep]).max() <= 1e-6
  assert np.abs(lat_out[..., ~keep] - x0[..., ~keep]).max() > 0.1   # and the masked part was repainted

def test_mask_sources(tmp_path):
  rgba = np.zeros((SIZE, SIZE, 4), np.uint8); rgba[..., :3] = 128; rgba[..., 3] = 255; rgba[:20, :20, 3] = 0
  p = tmp_path / "a.png"; Image.fromarray(rgba).save(p)
  assert alpha_mask(p)[:20, :20].all() and alpha_mask(p).sum() == 400
  rgb = np.full((SIZE, SIZE, 3), 100, np.uint8); rgb[30:40, 30:40] = (0, 255, 0)
  q = tmp_path / "g.png"; Image.fromarray(rgb).save(q)
  assert green_mask(q).sum() == 100 and green_mask(q)[30:40, 30:40].all()
  assert inpaint_mask(q, None, (SIZE, SIZE)).sum() == 100
  big = Image.fromarray(np.pad(np.full((64, 64), 255, np.uint8), 64))   # 192x192 mask, same aspect: resized
  m = load_mask(big, (SIZE, SIZE))
  assert m.shape == (SIZE, SIZE) and m[22:42, 22:42].all() and not m[:20].any() and not m[44:].any()   # white square spans 21.3..42.7
  soft = load_mask(Image.fromarray(np.full((SIZE, SIZE), 100, np.uint8)), (SIZE, SIZE), binarize=False)
  assert np.allclose(soft, 100 / 255)
  with pytest.raises(ImageError, match="aspect"): load_mask(Image.new("L", (64, 32), 255), (SIZE, SIZE))
  with pytest.raises(ImageError, match="no mask"): inpaint_mask(Image.new("RGB", (SIZE, SIZE)), None, (SIZE, SIZE))

def test_image_loading_rules(tmp_path):
  im = Image.new("RGBA", (70, 61), (255, 0, 0, 0))   # fully transparent red composites on white; sizes snap down to multiples of 8
  a = load_image(im)
  assert a.shape == (56, 64, 3) and np.allclose(a, 1.0)
  g = load_image(Image.new("L", (16, 16), 51))
  assert g.shape == (16, 16, 3) and np.allclose(g, 0.2)
