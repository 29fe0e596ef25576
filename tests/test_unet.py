# Parity of tinysd's UNet with diffusers' UNet2DConditionModel (same random weights, fp32, CPU).
import math, time, gc
from dataclasses import asdict, replace
import numpy as np, pytest, torch
from tinygrad import Tensor, TinyJit, GlobalCounters, dtypes
from tinygrad.nn.state import get_state_dict, load_state_dict
from diffusers import UNet2DConditionModel as RefUNet
from tinysd.configs import UNetConfig, SD15, SD2, SDXL
from tinysd.models.unet import UNet2DConditionModel

SD1_TINY = UNetConfig(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=2, attention_head_dim=8, norm_num_groups=16,
                      cross_attention_dim=24, sample_size=16)
# SD2: per-level head counts through the attention_head_dim quirk, linear proj_in/proj_out
SD2_TINY = replace(SD1_TINY, attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=40, upcast_attention=True)
# SDXL: first level without attention, transformer depth 2, text_time add embedding (text_embeds 32 + 6 time ids x 8)
SDXL_TINY = replace(SD1_TINY, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                    transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=48,
                    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6*8)
INPAINT_TINY = replace(SD1_TINY, in_channels=9)

def randomize_(ref:torch.nn.Module):
  # torch's default init leaves norms at exactly 1/0; perturb everything so a swapped weight/bias or a wrong eps shows up
  with torch.no_grad():
    for n, p in ref.named_parameters():
      if p.ndim == 1: p.uniform_(0.8, 1.2) if n.endswith("weight") else p.uniform_(-0.2, 0.2)
      else: p.uniform_(-math.sqrt(3 / p[0].numel()), math.sqrt(3 / p[0].numel()))   # variance 1/fan_in

def reference(cfg:UNetConfig) -> RefUNet:
  with torch.device("meta"): ref = RefUNet(**asdict(cfg))   # skip torch's own init: randomize_ overwrites every parameter
  ref = ref.to_empty(device="cpu").eval()
  assert not list(ref.buffers())
  randomize_(ref)
  return ref

def shapes(sd:dict) -> dict: return {k: tuple(v.shape) for k, v in sd.items()}

def build(cfg:UNetConfig) -> tuple[RefUNet, UNet2DConditionModel]:
  ref = reference(cfg)
  model, rsd = UNet2DConditionModel(cfg), ref.state_dict()
  assert shapes(get_state_dict(model)) == shapes(rsd)
  load_state_dict(model, {k: Tensor(v.numpy()) for k, v in rsd.items()}, verbose=False)
  return ref, model

@pytest.fixture
def no_init(monkeypatch):
  # tinygrad.nn layers build a lazy random init graph per parameter (~10 ms each, seconds for a real model); here every one is
  # replaced by load_state_dict or only its shape is looked at
  monkeypatch.setattr(Tensor, "uniform", classmethod(lambda cls, *shape, low=0.0, high=1.0, **kw: cls.empty(*shape, **kw)))

_cache:dict = {}
def tiny(cfg:UNetConfig):
  if cfg not in _cache: _cache[cfg] = build(cfg)
  return _cache[cfg]

def inputs(cfg:UNetConfig, B=2, H=16, W=16, L=77):
  x = dict(sample=torch.randn(B, cfg.in_channels, H, W), encoder_hidden_states=torch.randn(B, L, cfg.cross_attention_dim))
  if cfg.addition_embed_type == "text_time":
    x["text_embeds"] = torch.randn(B, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim)
    x["time_ids"] = torch.tensor([[1024., 768., 0., 32., 1024., 1024.]]).repeat(B, 1) + torch.arange(B)[:, None] * 64.0
  return x

def ref_out(ref, timestep, x) -> np.ndarray:
  added = {k: x[k] for k in ("text_embeds", "time_ids") if k in x} or None
  with torch.no_grad(): return ref(x["sample"], timestep, x["encoder_hidden_states"], added_cond_kwargs=added).sample.numpy()

def ours(model, timestep, x) -> Tensor:
  t = Tensor(timestep.numpy()) if isinstance(timestep, torch.Tensor) else timestep
  return model(Tensor(x["sample"].numpy()), t, Tensor(x["encoder_hidden_states"].numpy()),
               *(Tensor(x[k].numpy()) if k in x else None for k in ("text_embeds", "time_ids")))

def check(cfg, timestep, **shape):
  ref, model = tiny(cfg)
  x = inputs(cfg, **shape)
  r, o = ref_out(ref, timestep, x), ours(model, timestep, x).numpy()
  assert o.shape == r.shape and np.abs(r).max() > 0.1
  np.testing.assert_allclose(o, r, atol=1e-4, rtol=0)

@pytest.mark.parametrize("timestep", [torch.tensor([3., 871.]), 999, 501.5, torch.tensor([42])], ids=["tensor_B", "int", "float", "tensor_1"])
def test_sd1(timestep): check(SD1_TINY, timestep)

def test_sd2_odd_size(): check(SD2_TINY, torch.tensor([250.]), H=9, W=12)   # 9 -> 5 -> upsampled back to 9 (diffusers' upsample_size)
def test_sdxl(): check(SDXL_TINY, torch.tensor([17., 600.]))
def test_inpaint(): check(INPAINT_TINY, 700)

def test_state_dict_names(no_init):
  # real configs: names and shapes identical to diffusers (torch on the meta device, tinygrad lazy: nothing is allocated)
  for cfg in (SD15.unet, SD2.unet, SDXL.unet, replace(SD15.unet, in_channels=9)):
    with torch.device("meta"): ref = RefUNet(**asdict(cfg))
    assert shapes(get_state_dict(UNet2DConditionModel(cfg))) == shapes(ref.state_dict())

def test_timestep_is_an_input():
  # the timestep must stay a graph input (not a baked constant) so one TinyJit capture serves every step
  ref, model = tiny(SD1_TINY)
  x = inputs(SD1_TINY)   # same shapes as test_sd1[tensor_1]: the kernels are already compiled
  step = TinyJit(lambda s, t, c: model(s, t, c).realize())
  s, c = Tensor(x["sample"].numpy()).realize(), Tensor(x["encoder_hidden_states"].numpy()).realize()
  for tv in (900., 500., 100.): o = step(s, Tensor([tv]).realize(), c).numpy()
  np.testing.assert_allclose(o, ref_out(ref, torch.tensor([100.]), x), atol=1e-4, rtol=0)

def test_fp16_weights():
  # one level, one resnet: every fp16 kernel is a new compile, keep them few
  cfg = replace(SD1_TINY, block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                layers_per_block=1)
  ref, model = tiny(cfg)
  half = UNet2DConditionModel(cfg)
  load_state_dict(half, {k: v.cast(dtypes.float16) for k, v in get_state_dict(model).items()}, verbose=False)
  x = inputs(cfg, B=1, H=8, W=8)
  o, r = ours(half, 400, x), ref_out(ref, 400, x)
  assert o.dtype == dtypes.float16
  err = np.abs(o.float().numpy() - r).max()
  assert err < 2e-2 * np.abs(r).max(), err   # fp16 storage: ~3 decimal digits

@pytest.mark.slow
def test_sd15_real_size(no_init):
  cfg = SD15.unet
  ref = reference(cfg)
  x = inputs(cfg, B=1, H=8, W=8)
  r = ref_out(ref, torch.tensor([500.]), x)
  model = UNet2DConditionModel(cfg)
  load_state_dict(model, {k: Tensor(v.numpy()) for k, v in ref.state_dict().items()}, verbose=False, realize=False)   # copied in the first call
  del ref; gc.collect()
  s, t, c = Tensor(x["sample"].numpy()), Tensor([500.]), Tensor(x["encoder_hidden_states"].numpy())
  GlobalCounters.reset(); st = time.perf_counter()
  o = model(s, t, c).numpy()
  print(f"SD1.5 UNet 1x4x8x8 first call {time.perf_counter() - st:.1f} s, {GlobalCounters.kernel_count} kernels")
  assert np.abs(r).max() > 0.1
  np.testing.assert_allclose(o, r, atol=1e-4, rtol=0)
