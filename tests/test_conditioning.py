# Guidance <= 1 runs no CFG (diffusers' do_classifier_free_guidance), Turbo models (trailing timestep spacing, Euler a, guidance 0) equal to
# diffusers, SDXL's zero unconditional embeddings for an empty negative prompt (force_zeros_for_empty_prompt) and its chunked long prompts
# against transformers, and the command line's Turbo defaults and --clip-skip. Tiny random models, same x_T and ancestral noise as diffusers.
import json, subprocess, sys
import numpy as np, pytest, torch
from PIL import Image
from fixtures import make_tiny_pipeline_folder
import tinysd
from tinysd import prompt

SIZE = 64

def bound(run):
  # chaotic random-weight models: how far the reference itself moves for a 1e-6 relative change of x_T (as tests/test_pipeline.py)
  want, moved = run(1.0), None
  moved = np.abs(run(1 + 1e-6) - want).max()
  return want, 2e-3 if moved <= 4e-4 else 5 * moved

def torch_noise(seed):
  g = torch.Generator().manual_seed(seed)   # the draws diffusers' scheduler makes for ancestral steps
  return lambda shape: torch.randn(shape, generator=g).numpy()

@pytest.fixture(scope="module")
def turbo(tmp_path_factory):
  # an SD1 tiny model with SD-Turbo's scheduler: Euler a, trailing timestep spacing
  import diffusers
  folder = make_tiny_pipeline_folder(tmp_path_factory.mktemp("turbo"), family="sd1")
  cfg_path = folder / "scheduler" / "scheduler_config.json"
  cfg = json.loads(cfg_path.read_text()) | {"_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "trailing"}
  cfg_path.write_text(json.dumps(cfg))
  idx = json.loads((folder / "model_index.json").read_text()) | {"scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"]}
  (folder / "model_index.json").write_text(json.dumps(idx))
  ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False, local_files_only=True)
  ref.set_progress_bar_config(disable=True)
  assert type(ref.scheduler).__name__ == "EulerAncestralDiscreteScheduler" and ref.scheduler.config.timestep_spacing == "trailing"
  return folder, ref, tinysd.load(folder)

def test_turbo_guidance_0_matches_diffusers(turbo):
  _, ref, pipe = turbo
  assert pipe.config.scheduler.timestep_spacing == "trailing"
  lat = SIZE // pipe.vae_scale
  x_T = np.random.default_rng(5).standard_normal((1, 4, lat, lat), dtype=np.float32)
  kw = dict(steps=1, width=SIZE, height=SIZE, sampler="euler_a", latents=x_T, output_type="np")
  for steps in (1, 2, 4):
    def run(scale):
      return ref("a photo of a cat", num_inference_steps=steps, guidance_scale=0.0, height=SIZE, width=SIZE, output_type="np",
                 latents=torch.from_numpy(x_T * scale), generator=torch.Generator().manual_seed(steps)).images
    want, tol = bound(run)
    got = pipe.txt2img("a photo of a cat", guidance_scale=0.0, ancestral_noise=torch_noise(steps), **(kw | {"steps": steps}))
    err = np.abs(got - want).max()
    assert err <= tol, f"{steps} steps: max abs {err:.2e} > {tol:.2e}"
  # no unconditional pass at all for guidance <= 1: 0, 0.5 and 1 are the same run, and the prompt (not the negative) conditions it
  a = pipe.txt2img("a photo of a cat", negative_prompt="blurry", guidance_scale=0.0, seed=1, **kw)
  assert np.array_equal(a, pipe.txt2img("a photo of a cat", guidance_scale=0.5, seed=1, **kw))
  assert np.array_equal(a, pipe.txt2img("a photo of a cat", guidance_scale=1.0, seed=1, **kw))
  assert np.abs(a - pipe.txt2img("", guidance_scale=0.0, seed=1, **kw)).max() > 1e-3
  assert not any(k[0] == "unet" and k[2] for k in pipe._jits)   # every UNet JIT ran without the CFG batch

def test_cli_turbo_defaults_and_clip_skip(tmp_path, turbo):
  folder = turbo[0]
  from tinysd.cli import build_parser
  assert "Turbo" in build_parser()._subparsers._group_actions[0].choices["txt2img"].format_help()
  out = tmp_path / "t.png"
  r = subprocess.run([sys.executable, "-m", "tinysd.cli", "txt2img", "--model", str(folder), "--prompt", "a (red:1.2) cat", "--width", "64",
                      "--height", "64", "--seed", "1", "--clip-skip", "2", "--output", str(out)], capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr
  assert "Turbo model" in r.stderr
  params = Image.open(out).text["parameters"]
  assert "Steps: 1, Sampler: Euler a, CFG scale: 0.0, Seed: 1, Size: 64x64" in params and params.endswith("Clip skip: 2"), params
  r = subprocess.run([sys.executable, "-m", "tinysd.cli", "txt2img", "--model", str(folder), "--prompt", "a cat", "--clip-skip", "0",
                      "--output", str(tmp_path / "bad.png")], capture_output=True, text=True, timeout=600)
  assert r.returncode == 2 and r.stderr.strip().splitlines() == ["tinysd: error: --clip-skip must be >= 1, got 0"], r.stderr

# ---- SDXL ----

@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
  import diffusers
  folder = make_tiny_pipeline_folder(tmp_path_factory.mktemp("sdxl"), family="sdxl")
  ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
  ref.set_progress_bar_config(disable=True)
  return folder, ref, tinysd.load(folder)

def test_sdxl_empty_negative_is_zeros(sdxl):
  folder, ref, pipe = sdxl
  assert ref.config.force_zeros_for_empty_prompt and pipe.force_zeros_for_empty_prompt
  lat = SIZE // pipe.vae_scale
  x_T = np.random.default_rng(6).standard_normal((1, 4, lat, lat), dtype=np.float32)
  kw = dict(steps=2, guidance_scale=5.0, width=SIZE, height=SIZE, sampler="euler", latents=x_T, output_type="np")
  _, ctx, pooled, _ = pipe._conditioning("a photo of a cat", "", 1, 5.0, SIZE, SIZE)
  assert ctx.shape == (2, 77, 192) and pooled.shape == (2, 96) and not ctx[0].numpy().any() and not pooled[0].numpy().any()
  try:
    for zeros in (True, False):   # diffusers zeroes the uncond embeddings for negative_prompt=None, and encodes an explicit ""
      pipe.force_zeros_for_empty_prompt = zeros
      want, tol = bound(lambda s: ref("a photo of a cat", negative_prompt=None if zeros else "", num_inference_steps=2, guidance_scale=5.0,
                                      height=SIZE, width=SIZE, latents=torch.from_numpy(x_T * s), output_type="np").images)
      err = np.abs(pipe.txt2img("a photo of a cat", **kw) - want).max()
      assert err <= tol, f"force_zeros {zeros}: max abs {err:.2e} > {tol:.2e}"
  finally: pipe.force_zeros_for_empty_prompt = True
  from tinysd.pipeline import _force_zeros   # a fine-tune's model_index.json can turn it off
  off = folder.parent / "off"
  off.mkdir(exist_ok=True)
  (off / "model_index.json").write_text(json.dumps(json.loads((folder / "model_index.json").read_text()) | {"force_zeros_for_empty_prompt": False}))
  assert _force_zeros(folder, pipe.config) and not _force_zeros(off, pipe.config) and _force_zeros(off / "missing", pipe.config)

def test_sdxl_long_prompt_matches_transformers(sdxl):
  # both encoders on every chunk (transformers, hidden_states[-2], no final norm), concatenated along the sequence and the channels;
  # the pooled embeds are the second encoder's text_embeds of the first chunk, as A1111 does
  _, ref, pipe = sdxl
  text = "a (golden:1.2) retriever, " * 20 + "BREAK on a beach"
  ctx, pooled = pipe._encode(["", text])
  k = ctx.shape[1] // 77
  assert k == 3 and ctx.shape == (2, 3 * 77, 192)
  for row, t in enumerate(["", text]):
    parts, first = [], None
    for tok, te in zip(pipe.tokenizers, (ref.text_encoder, ref.text_encoder_2)):
      chunks = prompt.chunks(prompt.parse(t), tok)
      outs = []
      for ids, ws in chunks + [([], [])] * (k - len(chunks)):
        ids, ws = prompt.frame(tok, ids, ws)
        with torch.no_grad(): out = te(torch.tensor([ids]), output_hidden_states=True)
        z = out.hidden_states[-2][0].double().numpy()
        zw = z * np.array(ws)[:, None]
        outs.append(zw * (z.mean() / zw.mean()))
        if first is None and hasattr(out, "text_embeds"): first = out.text_embeds[0].numpy()
      parts.append(np.concatenate(outs))
    np.testing.assert_allclose(ctx[row].numpy(), np.concatenate(parts, axis=-1), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(pooled[row].numpy(), first, atol=1e-4, rtol=1e-4)
