# The fused C attention kernel (ops/cpu_attention.py) vs a float64 numpy reference and vs tinygrad's own fp32 SDPA, for both ISA variants,
# with the core ids run serially (tinygrad's launcher) and on the thread pool.
# Error bound: both fp32 paths round the same way (dot products of length d, an exp per score, a sum of Lk terms) but in another order,
# so neither is "the" answer: measured at these randn shapes, tinygrad's plain SDPA is 0.7-2.4e-7 * max|v| from float64, the C kernel
# 0.7-1.7e-7 * max|v|. The kernel must be within 4x the plain path's own error (+1e-7 for shapes where that is ~0), capped at 2e-6 * max|v|
# (~16 ulp): a wrong scale (1%), mask or rescale is off by >= 1e-3, see the negative controls.
import platform
import numpy as np, pytest
from tinygrad import Tensor, TinyJit, GlobalCounters, dtypes, function
from tinysd_ops import tg, cpu_attention as ca

pytestmark = pytest.mark.skipif(ca.cpu_isa() is None, reason="the C kernels need an x86-64 CPU with AVX2 or AVX-512")
ISAS = ["avx512", "avx2"]   # both compile anywhere with AVX2 (-march=native splits 16-lane vectors); forcing avx2 tests the 8-lane code here
CAP = 2e-6

@pytest.fixture(params=["serial", "pool"])
def launch(request, monkeypatch):
  # install_cpu_threads patches tinygrad's CPUProgram.__call__ for the process; "serial" puts tinygrad's own launcher back for one test
  from tinygrad.runtime import ops_cpu
  if request.param == "pool": assert tg.install_cpu_threads(2) >= 1
  elif tg._orig_call: monkeypatch.setattr(ops_cpu.CPUProgram, "__call__", tg._orig_call[0])
  return request.param

def ref64(q, k, v, causal=False):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
  if causal: s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)) @ v

def inputs(B, H, Lq, Lk, d, dv, bhld=False):
  # numpy (B, H, L, .) arrays, and Tensors laid out as the UNet has them (transposed views of (B, L, H, .) buffers) or contiguous
  arrs = [np.random.randn(B, L, H, n).astype(np.float32) for L, n in ((Lq, d), (Lk, d), (Lk, dv))]
  ts = [Tensor(np.ascontiguousarray(a.transpose(0, 2, 1, 3))).realize() if bhld else Tensor(a).realize().transpose(1, 2) for a in arrs]
  return [a.transpose(0, 2, 1, 3) for a in arrs], ts

def err(out, ref, v) -> float: return float(np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(v).max())

_plain: dict = {}
def check(case, out:Tensor, causal:bool, a, t):
  # out vs float64, bounded by the plain fp32 path's own error on the same inputs (computed once per case)
  r = ref64(*a, causal)
  if case not in _plain: _plain[case] = err(t[0].scaled_dot_product_attention(t[1], t[2], is_causal=causal).numpy(), r, a[2])
  e, bound = err(out.numpy(), r, a[2]), min(4 * _plain[case] + 1e-7, CAP)
  assert e <= bound, f"{case}: error {e:.3g} * max|v| > bound {bound:.3g} (plain fp32 SDPA: {_plain[case]:.3g})"
  return e

# (B, H, Lq, Lk, d, dv, causal): every d in 1 7 16 40 64 80 160, every L in 1 5 77 100 257, B*H = 1, 3, 16; dv != d; Lq < / > Lk causal
CASES = [(1, 1, 1, 1, 1, 1, False), (1, 1, 5, 1, 7, 7, False), (1, 1, 1, 77, 16, 16, False), (1, 3, 5, 5, 7, 7, True),
         (1, 3, 77, 77, 64, 64, True), (2, 8, 100, 77, 40, 40, False), (1, 1, 257, 100, 80, 80, False), (1, 3, 100, 257, 160, 160, False),
         (1, 1, 257, 257, 16, 16, True), (1, 1, 77, 5, 80, 80, True), (1, 1, 5, 257, 64, 64, True), (1, 3, 257, 77, 1, 1, False),
         (1, 1, 100, 100, 40, 7, False), (1, 1, 77, 77, 7, 160, True)]

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])) + ("c" if c[6] else ""))
def test_matches_reference(case, isa, launch):
  *shape, causal = case
  a, t = inputs(*shape, bhld=CASES.index(case) % 2 == 1)
  out = ca.attention(*t, is_causal=causal, isa=isa, threads=2)
  assert out.shape == t[0].shape[:-1] + (shape[5],) and out.dtype == dtypes.float32
  check(case, out, causal, a, t)

@pytest.mark.parametrize("isa", ISAS)
def test_sd_shape_and_3d(isa):
  # a 64x64-latent-like head (L = 1024, d = 40: 16 key blocks per query block) and 3-D (BH, L, d) inputs
  a, t = inputs(1, 1, 1024, 1024, 40, 40)
  check("sd1024", ca.attention(*t, isa=isa), False, a, t)
  a, t = inputs(1, 3, 100, 77, 40, 40, bhld=True)
  t3 = [x.reshape(3, x.shape[2], x.shape[3]) for x in t]
  out = ca.attention(*t3, isa=isa)
  assert out.shape == (3, 100, 40)
  check("3d", out.reshape(1, 3, 100, 40), False, a, t)

def test_negative_controls():
  # the bound catches a 1% scale error, and causal vs not; so it is not vacuous
  case = (1, 3, 77, 77, 64, 64, True)
  a, t = inputs(*case[:6])
  check(case, ca.attention(*t, is_causal=True), True, a, t)
  with pytest.raises(AssertionError, match="> bound"): check(case, ca.attention(t[0] * 1.01, t[1], t[2], is_causal=True), True, a, t)
  with pytest.raises(AssertionError, match="> bound"): check(case, ca.attention(*t, is_causal=False), True, a, t)
  with pytest.raises(AssertionError, match="> bound"): check(case, ca.attention(*t, is_causal=True), False, a, t)

@pytest.mark.parametrize("isa", ISAS)
def test_tinyjit(isa, launch):
  # eager, capture, replay: bit-identical (same kernel, fixed work split); then new data through the replayed kernel
  B, L, H, d = 2, 100, 4, 40
  def step(q, k, v): return ca.attention(q, k, v, isa=isa, threads=2).transpose(1, 2).reshape(B, L, H * d).realize()
  jit = TinyJit(step)
  a, t = inputs(B, H, L, L, d, d)
  eager = step(*t).numpy()
  outs = [jit(*t).numpy() for _ in range(3)]
  assert all(np.array_equal(o, eager) for o in outs)
  a2, t2 = inputs(B, H, L, L, d, d)
  out2 = jit(*t2)
  check("jit", out2.reshape(B, L, H, d).transpose(1, 2), False, a2, t2)

def test_layout_no_copies():
  # the UNet case: q, k, v are transposed views of (B, L, H*d) projections and the result goes back with .transpose(1, 2).reshape: one kernel
  B, L, H, d = 2, 77, 3, 40
  xs = [Tensor(np.random.randn(B, L, H * d).astype(np.float32)).realize() for _ in range(3)]
  q, k, v = (x.reshape(B, L, H, d).transpose(1, 2) for x in xs)
  GlobalCounters.reset()
  out = ca.attention(q, k, v).transpose(1, 2).reshape(B, L, H * d).realize()
  assert GlobalCounters.kernel_count == 1
  assert GlobalCounters.global_ops == 4 * B * H * L * L * d   # the estimates reach tinygrad's counters
  ref = ref64(*(x.numpy().reshape(B, L, H, d).transpose(0, 2, 1, 3) for x in xs))
  assert err(out.numpy().reshape(B, L, H, d).transpose(0, 2, 1, 3), ref, xs[2].numpy()) < CAP

W = [w.astype(np.float32) / 4 for w in np.random.RandomState(0).randn(4, 16, 16)]
def tiny_model(x:Tensor, ctx:Tensor, heads:int=2) -> Tensor:
  # self-attention, cross-attention (77 keys), then a causal one (CLIP), each a plain SDPA on (B, heads, L, d) views
  B, L, C = x.shape
  wq, wk, wv, wo = (Tensor(w) for w in W)
  def split(t:Tensor) -> Tensor: return t.reshape(B, t.shape[1], heads, C // heads).transpose(1, 2)
  def merge(t:Tensor) -> Tensor: return t.transpose(1, 2).reshape(B, L, C) @ wo
  h = x + merge(split(x @ wq).scaled_dot_product_attention(split(x @ wk), split(x @ wv)))
  h = h + merge(split(h @ wq).scaled_dot_product_attention(split(ctx @ wk), split(ctx @ wv)))
  return h + merge(split(h @ wq).scaled_dot_product_attention(split(h @ wk), split(h @ wv), is_causal=True))

def test_rewrite_model_graph(launch):
  x, ctx = Tensor(np.random.randn(2, 24, 16).astype(np.float32)).realize(), Tensor(np.random.randn(2, 77, 16).astype(np.float32)).realize()
  ref = tiny_model(x, ctx)
  (new,), n = tg.rewrite_sdpa([ref], ca.impl)
  assert n == 3
  np.testing.assert_allclose(new.numpy(), ref.numpy(), rtol=1e-5, atol=CAP * 8)   # |v| <= ~8 here
  left = []
  def step(x, ctx):
    out = ca.install(tiny_model(x, ctx))
    tg.rewrite_sdpa([out], lambda **kw: left.append(kw))   # lists the SDPAs left over (none)
    return out.realize()
  jit = TinyJit(step)
  for _ in range(3): np.testing.assert_allclose(jit(x, ctx).numpy(), ref.numpy(), rtol=1e-5, atol=CAP * 8)
  assert left == []

def test_rewrite_in_function_and_half():
  @function
  def attn(q:Tensor, k:Tensor, v:Tensor) -> Tensor: return q.scaled_dot_product_attention(k, v)
  a, t = inputs(1, 2, 40, 40, 16, 16)
  out = ca.install(attn(*t))
  check("fn", out, False, a, t)
  h = ca.install(t[0].half().scaled_dot_product_attention(t[1].half(), t[2].half()))   # fp16 in: fp32 inside, fp16 out
  assert h.dtype == dtypes.half
  np.testing.assert_allclose(h.numpy(), ref64(*a), atol=2e-3)

def test_impl_declines(monkeypatch):
  _, t = inputs(1, 2, 8, 8, 16, 16)
  assert ca.impl(*t, None, False) is not None
  assert ca.impl(*t, Tensor.zeros(8, 8), False) is None                          # masks stay with tinygrad
  assert ca.impl(*(x.cast(dtypes.int32) for x in t), None, False) is None        # not a float
  assert ca.impl(*(Tensor.empty(1, 2, 8, 16, device="NULL") for _ in range(3)), None, False) is None   # not the CPU device
  assert ca.impl(t[0], t[1][:, :1], t[2][:, :1], None, False) is None           # broadcast heads
  monkeypatch.setenv("TINYSD_KERNELS", "generic")
  assert ca.impl(*t, None, False) is None
  monkeypatch.delenv("TINYSD_KERNELS")
  monkeypatch.setattr(ca, "ISA", None)
  assert ca.impl(*t, None, False) is None

def test_cpu_isa(monkeypatch):
  flags = set(next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split(":", 1)[1].split())
  assert ca.cpu_isa() == ("avx512" if "avx512f" in flags else "avx2")
  monkeypatch.setattr(platform, "machine", lambda: "aarch64")
  assert ca.cpu_isa() is None
  _, t = inputs(1, 1, 4, 4, 8, 8)
  assert ca.impl(*t, None, False) is None
