# SiLU / exact GELU / quick GELU C kernels (ops/cpu_act.py) against their float64 meaning, and the dispatch that puts them under Tensor.silu,
# Tensor.gelu(approximate="none") and Tensor.quick_gelu (ops/cpu.py). Bounds: the kernels' exp has < 2e-7 relative error, erf (A&S 7.1.26,
# the formula tinygrad's Tensor.erf uses too) <= 1.5e-7 absolute, so |y - ref| <= B * max(1, |x|) with B = 2.5e-7 (silu, quick GELU) and
# 4e-7 (GELU), ~2x the measured worst case over 1e5 normals of std 4 plus the range limits; fp32 rounding of the output alone is 6e-8.
import numpy as np, pytest
from tinygrad import Tensor, dtypes
from tinysd_ops import cpu, cpu_act

pytestmark = pytest.mark.skipif(cpu.cpu_isa() is None, reason="no x86 SIMD ISA for our kernels")
BOUND = {"silu": 2.5e-7, "quick_gelu": 2.5e-7, "gelu": 4e-7}
EDGES = np.array([0, -0.0, 1e-30, -1e-30, 1e-8, 0.5, -0.5, 20, -20, 51, -52, 87, -87, 88.5, -88.5, 100, -100, 1e4, -1e4, 3.4e38, -3.4e38], np.float32)

def _err(kind, x, y):
  with np.errstate(over="ignore"): ref = cpu_act.reference(kind, x)
  return float((np.abs(y.astype(np.float64) - ref) / np.maximum(1, np.abs(x.astype(np.float64)))).max())

@pytest.mark.parametrize("kind", cpu_act.KINDS)
@pytest.mark.parametrize("n,threads", [(1, 1), (37, 2), (4099, 3), (100003, 2)])
def test_kernel(kind, n, threads):
  x = np.concatenate([np.random.default_rng(n).standard_normal(n).astype(np.float32) * 4, EDGES])
  y = cpu_act.run(kind, Tensor(x), threads).numpy()
  assert y.shape == x.shape and np.isfinite(y).all()
  assert _err(kind, x, y) < BOUND[kind]

def test_nan_propagates():
  for kind in cpu_act.KINDS: assert np.isnan(cpu_act.run(kind, Tensor(np.array([np.nan, 1.0], np.float32)), 1).numpy()[0])

def test_dispatch():
  cpu.install()
  x = Tensor(np.random.default_rng(1).standard_normal((2, 64, 300)).astype(np.float32) * 3)
  names = lambda t: " ".join(str(u.arg.name) for u in t.uop.toposort() if hasattr(u.arg, "name"))
  for kind, ours in (("silu", x.silu()), ("gelu", x.gelu(approximate="none")), ("quick_gelu", x.quick_gelu())):
    assert f"act_{kind}" in names(ours)
    assert _err(kind, x.numpy(), ours.numpy()) < BOUND[kind]
    theirs = {"silu": cpu._orig["silu"], "gelu": lambda t: cpu._orig["gelu"](t, "none"), "quick_gelu": cpu._orig["quick_gelu"]}[kind](x)
    assert np.abs(ours.numpy() - theirs.numpy()).max() < 1e-5   # tinygrad's own op, same math
  assert "act_" not in names(x.gelu())                           # the tanh approximation stays tinygrad's
  assert "act_" not in names(x[:1, :1, :100].silu())                   # too small: left to tinygrad's fusion
  assert "act_" not in names(x.cast(dtypes.float16).silu())      # fp16 compute
