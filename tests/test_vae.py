# Parity of tinysd's VAE with diffusers' AutoencoderKL (same random weights, fp32, CPU).
import math
from dataclasses import asdict, replace
import numpy as np, pytest, torch
from tinygrad import Tensor, dtypes
from tinygrad.nn.state import get_state_dict, load_state_dict
from diffusers import AutoencoderKL as RefVAE
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from tinysd.configs import VAEConfig, SD15, SDXL
from tinysd.models.vae import AutoencoderKL, DiagonalGaussian

TINY = VAEConfig(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=16, latent_channels=4, scaling_factor=0.5, sample_size=16)
DOWN = ("DownEncoderBlock2D",)
UP = ("UpDecoderBlock2D",)

def meta_reference(cfg:VAEConfig) -> RefVAE:
  n = len(cfg.block_out_channels)
  with torch.device("meta"): return RefVAE(**asdict(cfg), down_block_types=DOWN*n, up_block_types=UP*n)

def reference(cfg:VAEConfig) -> RefVAE:
  ref = meta_reference(cfg).to_empty(device="cpu").eval()   # skip torch's init: every parameter is overwritten below
  assert not list(ref.buffers())
  with torch.no_grad():   # every parameter random (norms off 1/0 too) so that a swapped or skipped tensor changes the output
    for name, p in ref.named_parameters():
      if p.ndim == 1: p.uniform_(0.8, 1.2) if name.endswith("weight") else p.uniform_(-0.2, 0.2)
      else: p.uniform_(-math.sqrt(3 / p[0].numel()), math.sqrt(3 / p[0].numel()))
  return ref

@pytest.fixture
def no_init(monkeypatch):
  # tinygrad.nn layers build a lazy random init graph per parameter (~10 ms each, seconds for a real model); here every one is
  # replaced by load_state_dict or only its shape is looked at
  monkeypatch.setattr(Tensor, "uniform", classmethod(lambda cls, *shape, low=0.0, high=1.0, **kw: cls.empty(*shape, **kw)))

_cache:dict = {}
def tiny(cfg:VAEConfig=TINY) -> tuple[RefVAE, AutoencoderKL]:
  if cfg not in _cache:
    ref, model = reference(cfg), AutoencoderKL(cfg)
    load_state_dict(model, {k: Tensor(v.numpy()) for k, v in ref.state_dict().items()}, verbose=False)
    _cache[cfg] = ref, model
  return _cache[cfg]

def test_state_dict_names(no_init):
  for cfg in (TINY, SD15.vae, SDXL.vae):
    ref = meta_reference(cfg)
    assert {k: tuple(v.shape) for k, v in get_state_dict(AutoencoderKL(cfg)).items()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  assert AutoencoderKL(SDXL.vae).scaling_factor == 0.13025

def test_encode():
  ref, vae = tiny()
  x, noise = torch.rand(2, 3, 16, 24) * 2 - 1, torch.randn(2, 4, 8, 12)
  with torch.no_grad(): d = ref.encode(x).latent_dist
  ours = vae.encode(Tensor(x.numpy()))
  assert np.abs(d.mean.numpy()).max() > 0.1 and np.abs(d.logvar.numpy()).max() > 0.1
  for name in ("mean", "logvar", "std"):
    np.testing.assert_allclose(getattr(ours, name).numpy(), getattr(d, name).numpy(), atol=1e-4, rtol=0, err_msg=name)
  np.testing.assert_allclose(ours.sample(Tensor(noise.numpy())).numpy(), (d.mean + d.std * noise).numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(ours.mode().numpy(), d.mode().numpy(), atol=1e-4, rtol=0)

def test_encode_odd_size():
  # the encoder's asymmetric (0,1,0,1) padding decides the latent size for odd inputs
  ref, vae = tiny()
  x = torch.rand(1, 3, 15, 9) * 2 - 1
  with torch.no_grad(): m = ref.encode(x).latent_dist.mean.numpy()
  np.testing.assert_allclose(vae.encode(Tensor(x.numpy())).mean.numpy(), m, atol=1e-4, rtol=0)

def test_decode():
  ref, vae = tiny()
  z = torch.randn(2, 4, 6, 8) * 2
  with torch.no_grad(): r = ref.decode(z).sample.numpy()
  o = vae.decode(Tensor(z.numpy())).numpy()
  assert o.shape == r.shape == (2, 3, 12, 16) and np.abs(r).max() > 0.1
  np.testing.assert_allclose(o, r, atol=1e-4, rtol=0)

def test_diagonal_gaussian_clamp():
  moments = torch.randn(1, 8, 3, 3) * 40   # logvar far outside [-30, 20]
  d, ours = DiagonalGaussianDistribution(moments), DiagonalGaussian(Tensor(moments.numpy()))
  np.testing.assert_allclose(ours.logvar.numpy(), d.logvar.numpy(), rtol=0, atol=1e-5)
  np.testing.assert_allclose(ours.std.numpy(), d.std.numpy(), rtol=1e-5, atol=0)

def test_fp16_decode():
  cfg = replace(TINY, block_out_channels=(32,), layers_per_block=1)   # few kernels: every fp16 kernel is a new compile
  ref, vae = tiny(cfg)
  half = AutoencoderKL(cfg)
  load_state_dict(half, {k: v.cast(dtypes.float16) for k, v in get_state_dict(vae).items()}, verbose=False)
  z = torch.randn(1, 4, 8, 8)
  with torch.no_grad(): r = ref.decode(z).sample.numpy()
  o = half.decode(Tensor(z.numpy()))
  assert o.dtype == dtypes.float16
  err = np.abs(o.float().numpy() - r).max()
  assert err < 2e-2 * np.abs(r).max(), err   # fp16 storage: ~3 decimal digits
