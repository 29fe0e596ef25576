# Our CPU GEMM / implicit-GEMM conv kernels (ops/cpu_gemm.py) against the float64 numpy meaning of the same Gemm spec, and the dispatch
# (ops/cpu.py) against tinygrad's own Linear/Conv2d. Odd sizes on purpose: every edge (partial micro-tiles in m and n, a partial last
# K block, padded/strided taps, batch not a multiple of the threads) is hit. fp32 GEMMs with K <= ~3000 of unit normals differ from float64
# by ~1e-6 relative to max|C| (numpy's own fp32 matmul is the same); RTOL 1e-5 is 10x that and far below any indexing error (>= 1e-1).
import numpy as np, pytest
from tinygrad import Tensor, TinyJit, dtypes
from tinygrad.nn import Linear, Conv2d
from tinysd_ops import cpu, cpu_gemm as cg, tg

RTOL = 1e-5
pytestmark = pytest.mark.skipif(cpu.cpu_isa() is None, reason="no x86 SIMD ISA for our kernels")

def _arrays(g:cg.Gemm, adt, bdt, rng):
  na = (g.batch - 1) * g.a_strides[0] + (g.M - 1) * g.a_strides[1] + (g.K - 1) * g.a_strides[2] + 1
  nb = g.batch * g.conv.C * g.conv.H * g.conv.W if g.conv else (g.batch - 1) * g.b_strides[0] + (g.K - 1) * g.b_strides[1] + (g.N - 1) * g.b_strides[2] + 1
  a, b = rng.standard_normal(na).astype(adt), rng.standard_normal(nb).astype(bdt)
  bias = rng.standard_normal(g.M if g.bias == "m" else g.N).astype(np.float32) if g.bias else None
  return a, b, bias

NPDT = {"f32": np.float32, "f16": np.float16}

def _check(g:cg.Gemm, rtol=RTOL, wrong=None):
  a, b, bias = _arrays(g, NPDT[g.a_dtype], NPDT[g.b_dtype], np.random.default_rng(g.M * 7 + g.N))
  tt = lambda x: None if x is None else Tensor(x)
  out = cg.run(g, tt(a), tt(b), tt(bias)).numpy().reshape(g.batch, g.M, g.N)
  ref = cg.reference(wrong or g, a, b, bias)
  return np.abs(out - ref).max() / np.abs(ref).max()

GEMMS = [(1, 37, 53, 29), (2, 64, 96, 300), (1, 130, 70, 513), (3, 9, 33, 17), (1, 1, 1, 1)]
CONVS = [(2, 5, 9, 11, 7, 3, 1, 1), (1, 16, 17, 8, 33, 3, 2, 1), (1, 3, 6, 40, 12, 3, 2, 0), (2, 4, 5, 5, 9, 1, 1, 0), (3, 2, 7, 3, 5, 3, 1, 1)]

@pytest.mark.parametrize("isa", list(cg.ISAS))
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", GEMMS)
def test_gemm_layouts(isa, threads, shape):
  B, M, N, K = shape
  kw = dict(c_strides=(M * N, N), threads=threads, isa=isa)
  assert _check(cg.Gemm(B, M, N, K, "f32", (M * K, K, 1), "f32", (K * N, N, 1), bias="n", **kw)) < RTOL     # row-major B
  assert _check(cg.Gemm(B, M, N, K, "f32", (M * K, K, 1), "f32", (0, 1, K), bias="m", **kw)) < RTOL         # B = W^T, shared weight
  assert _check(cg.Gemm(B, M, N, K, "f32", (M * K, 1, M), "f32", (K * N, N, 1), **kw)) < RTOL                   # A transposed

@pytest.mark.parametrize("isa", list(cg.ISAS))
@pytest.mark.parametrize("shape", CONVS)
@pytest.mark.parametrize("fold", [False, True])
def test_conv_taps(isa, shape, fold):
  B, C, H, W, O, k, s, p = shape
  OH, OW = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
  g = cg.Gemm(B, O, OH * OW, C * k * k, "f32", (0, C * k * k, 1), "f32", None, conv=cg.Conv(C, H, W, k, k, s, p, OH, OW),
              c_strides=(O * OH * OW, OH * OW), bias="m", threads=2, isa=isa, fold=fold)
  assert _check(g) < RTOL

def test_small_blocks():
  # blocks smaller than the matrix in every loop (several jc, pc, ic iterations, the C accumulate path)
  g = cg.Gemm(2, 50, 77, 70, "f32", (50 * 70, 70, 1), "f32", (0, 1, 70), c_strides=(50 * 77, 77), bias="n", threads=2, MC=16, KC=24, NC=32)
  assert _check(g) < RTOL

def test_half_weights_widened():
  # fp16 A (a conv/linear weight stored half) is widened exactly while packed: compare with the fp16 values themselves in float64
  for isa in cg.ISAS:
    assert _check(cg.Gemm(1, 40, 70, 90, "f16", (0, 90, 1), "f32", (0, 70, 1), c_strides=(0, 70), threads=2, isa=isa)) < RTOL
    assert _check(cg.Gemm(1, 40, 70, 90, "f32", (0, 90, 1), "f16", (0, 1, 90), c_strides=(0, 70), threads=2, isa=isa)) < RTOL

def test_negative_control():
  # the comparison detects a wrong kernel: the same data against a spec with a shifted conv padding
  conv = lambda P: cg.Gemm(1, 4, 64, 27, "f32", (0, 27, 1), "f32", None, conv=cg.Conv(3, 8, 8, 3, 3, 1, P, 8, 8), c_strides=(256, 64))
  assert _check(conv(1), wrong=conv(2)) > 1e-1   # taps shifted by one pixel
  g2 = cg.Gemm(1, 20, 30, 40, "f32", (0, 40, 1), "f32", (0, 1, 40), c_strides=(0, 30))
  assert _check(g2, wrong=cg.Gemm(1, 20, 30, 40, "f32", (0, 40, 1), "f32", (0, 40, 1), c_strides=(0, 30))) > 1e-1   # B read untransposed

@pytest.fixture
def fast():
  if not cpu.install()["isa"]: pytest.skip("fast path off (TINYSD_KERNELS=generic or no ISA)")

def _generic(fn):
  cpu.uninstall()
  try: return fn()
  finally: cpu._orig.clear(); cpu.install()

@pytest.mark.parametrize("dt", [dtypes.float32, dtypes.float16])
def test_layers_dispatch(fast, dt):
  # the models' layers on the fast path equal tinygrad's own ops on the same (possibly fp16-stored) weights, under TinyJit
  rng = np.random.default_rng(2)
  lin, conv, conv_s2, conv1 = Linear(48, 70), Conv2d(24, 40, 3, padding=1), Conv2d(24, 16, 3, stride=2, padding=1), Conv2d(24, 36, 1)
  for layer in (lin, conv, conv_s2, conv1):
    layer.weight = Tensor(rng.standard_normal(layer.weight.shape).astype(np.float32)).cast(dt).realize().float()   # lazy widening cast, as pipeline.present does
    layer.bias = Tensor(rng.standard_normal(layer.bias.shape).astype(np.float32)).realize()
  x = Tensor(rng.standard_normal((2, 24, 13, 11)).astype(np.float32)).realize()
  xs = Tensor(rng.standard_normal((3, 24, 5, 7)).astype(np.float32)).realize()   # <= FOLD_PIXELS: the folded-batch kernel
  t = Tensor(rng.standard_normal((3, 5, 48)).astype(np.float32)).realize()
  run = lambda x, xs, t: [lin(t), conv(x), conv_s2(x), conv1(x), conv(xs), conv1(xs)]
  f = TinyJit(lambda x, xs, t: [y.realize() for y in run(x, xs, t)])
  for _ in range(3): fast_out = [y.numpy() for y in f(x, xs, t)]
  ref = _generic(lambda: [y.numpy() for y in run(x, xs, t)])
  for a, b in zip(fast_out, ref):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * np.abs(b).max())

def test_dispatch_declines(fast):
  # not ours: grouped convs, fp16 activations, tiny problems -> None, and the layer falls back to tinygrad
  x = Tensor.randn(1, 8, 6, 6)
  assert cpu.conv2d(x, Tensor.randn(8, 4, 3, 3), None, groups=2) is None
  assert cpu.linear(Tensor.randn(4, 8).half(), Tensor.randn(8, 8).half(), None) is None
  assert cpu.linear(Tensor.randn(2, 8), Tensor.randn(8, 8), None) is None
  g = Conv2d(8, 8, 3, padding=1, groups=2)
  assert g(x).shape == (1, 8, 6, 6)

@pytest.mark.skipif(not ({"avx512f", "avx512_bf16"} <= cpu.cpu_flags()), reason="no AVX512-BF16")
@pytest.mark.parametrize("shape", [(1, 37, 53, 29), (2, 64, 96, 300), (1, 130, 70, 513)])
def test_bf16_products(shape):
  # bf16 mode = the exact float64 product of bf16-rounded operands, accumulated in fp32: against that reference it is as tight as fp32
  # (RTOL); against the unrounded fp32 reference it is off by the rounding (~3e-3), which the fp32 bound must catch (negative control)
  B, M, N, K = shape
  g = cg.Gemm(B, M, N, K, "f32", (M * K, K, 1), "f32", (0, 1, K), c_strides=(M * N, N), bias="n", threads=2, prec="bf16")
  assert _check(g) < RTOL
  assert _check(g, wrong=cg.Gemm(**{**g.__dict__, "prec": "f32"})) > 10 * RTOL
  cv = cg.Gemm(2, 7, 99, 45, "f32", (0, 45, 1), "f32", None, conv=cg.Conv(5, 9, 11, 3, 3, 1, 1, 9, 11), c_strides=(7 * 99, 99), bias="m",
               threads=2, prec="bf16")
  assert _check(cv) < RTOL
