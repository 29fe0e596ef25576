# GroupNorm (+ fused SiLU) and LayerNorm C kernels (ops/cpu_norm.py) against float64 numpy, and their dispatch under tinygrad.nn.GroupNorm /
# LayerNorm (ops/cpu.py), including the fusion of a SiLU applied to a GroupNorm output. Inputs with a mean of 5 and std 3 (the two-pass
# variance must not cancel). Bound 2e-6 absolute on outputs of unit scale: fp32 rounding of the mean/variance/affine steps gives ~5e-7
# (measured), a wrong group, channel or eps gives >1e-3.
import numpy as np, pytest
from tinygrad import Tensor, dtypes
from tinygrad.nn import GroupNorm, LayerNorm
from tinysd_ops import cpu, cpu_norm

pytestmark = pytest.mark.skipif(cpu.cpu_isa() is None, reason="no x86 SIMD ISA for our kernels")
TOL = 2e-6

def _x(shape, seed=0): return (np.random.default_rng(seed).standard_normal(shape) * 3 + 5).astype(np.float32)

@pytest.mark.parametrize("shape,G", [((2, 64, 7, 9), 32), ((1, 12, 5, 5), 3), ((3, 20, 33), 4), ((1, 32, 1, 1), 32), ((2, 6, 17, 16), 1)])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_group_norm(shape, G, silu, affine, threads):
  x, rng = _x(shape), np.random.default_rng(1)
  w, b = (rng.standard_normal(shape[1]).astype(np.float32), rng.standard_normal(shape[1]).astype(np.float32)) if affine else (None, None)
  t = lambda a: None if a is None else Tensor(a)
  y = cpu_norm.group_norm(Tensor(x), G, t(w), t(b), 1e-6, silu, threads).numpy()
  assert np.abs(y - cpu_norm.reference_group_norm(x, G, w, b, 1e-6, silu)).max() < TOL

@pytest.mark.parametrize("shape", [(2, 77, 320), (5, 33), (1, 3, 1000)])
@pytest.mark.parametrize("threads", [1, 2])
def test_layer_norm(shape, threads):
  x, rng = _x(shape), np.random.default_rng(2)
  w, b = rng.standard_normal(shape[-1]).astype(np.float32), rng.standard_normal(shape[-1]).astype(np.float32)
  assert np.abs(cpu_norm.layer_norm(Tensor(x), Tensor(w), Tensor(b), 1e-5, threads).numpy() - cpu_norm.reference_layer_norm(x, w, b, 1e-5)).max() < TOL
  assert np.abs(cpu_norm.layer_norm(Tensor(x), None, None, 1e-5, threads).numpy() - cpu_norm.reference_layer_norm(x, None, None, 1e-5)).max() < TOL

def _names(t:Tensor) -> str: return " ".join(str(u.arg.name) for u in t.uop.toposort() if hasattr(u.arg, "name"))

def test_dispatch_and_fusion():
  cpu.install()
  gn, ln = GroupNorm(8, 32, eps=1e-6), LayerNorm(48)
  rng = np.random.default_rng(3)
  for p in (gn.weight, gn.bias, ln.weight, ln.bias): p.assign(Tensor(rng.standard_normal(p.shape).astype(np.float32))).realize()
  x, xl = Tensor(_x((2, 32, 8, 8))), Tensor(_x((2, 20, 48)))
  y = gn(x)
  assert "groupnorm_" in _names(y) and "_silu" not in _names(y)
  ys = y.silu()
  assert "groupnorm_silu_" in _names(ys) and "act_silu" not in _names(ys)   # one fused kernel, no separate SiLU
  ref = cpu_norm.reference_group_norm(x.numpy(), 8, gn.weight.numpy(), gn.bias.numpy(), 1e-6)
  assert np.abs(y.numpy() - ref).max() < TOL and np.abs(ys.numpy() - ref / (1 + np.exp(-ref))).max() < TOL
  theirs = cpu._orig["group_norm"](gn, x).silu().numpy()   # tinygrad's GroupNorm (our SiLU on it, unfused)
  assert np.abs(ys.numpy() - theirs).max() < 1e-5
  yl = ln(xl)
  assert "layernorm_" in _names(yl)
  assert np.abs(yl.numpy() - cpu._orig["layer_norm"](ln, xl).numpy()).max() < 1e-5
  assert "groupnorm" not in _names(gn(x.cast(dtypes.float16)))   # fp16 compute stays tinygrad's
