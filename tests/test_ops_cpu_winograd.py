# Winograd F(4x4,3x3) (ops/cpu_winograd.py): its numpy meaning against the direct conv (the algorithm), the C kernels against float64 direct
# convs on odd shapes (partial 4x4 tiles at the right and bottom edges, padding 0/1/2, odd channel counts, batch, fp16 weights, AVX2), and
# the dispatch rule of ops/cpu.py. Error bound: Winograd's fp32 rounding error grows with the transform's coefficients (up to 8 in A^T,
# 5 in B^T): measured ~1.5e-5 relative to max|y| at SD sizes (C = 320-640), 10-30x the direct conv's own ~5e-7. Each check states both:
# the kernel's error must stay within 64x the direct fp32 conv's error on the same data (measured in the test) and under a 1e-4 cap; an
# indexing or transform mistake gives errors of order 1.
import os
import numpy as np, pytest
from tinygrad import Tensor
from tinysd_ops import cpu, cpu_gemm, cpu_winograd as cw

pytestmark = pytest.mark.skipif(cpu.cpu_isa() is None, reason="no x86 SIMD ISA for our kernels")
GROWTH, CAP = 64, 1e-4

def direct(x, w, b, P):
  """float64 direct conv, stride 1, 3x3."""
  B, C, H, W = x.shape
  OH, OW = H + 2 * P - 2, W + 2 * P - 2
  xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (P, P), (P, P)))
  out = sum(np.einsum("oc,bcyx->boyx", w[:, :, ky, kx].astype(np.float64), xp[:, :, ky:ky + OH, kx:kx + OW]) for ky in range(3) for kx in range(3))
  return out + (0 if b is None else b.astype(np.float64)[None, :, None, None])

def _data(B, C, O, H, W, wdt=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, C, H, W)).astype(np.float32)
  w = (rng.standard_normal((O, C, 3, 3)) / np.sqrt(9 * C)).astype(wdt)
  return x, w, rng.standard_normal(O).astype(np.float32)

def _rel(y, ref): return float(np.abs(y - ref).max() / np.abs(ref).max())

def test_transform_matrices():
  # the defining identity of F(4,3) in 1D: A^T [(G g) * (B^T d)] = the 4 outputs of correlating d (6 taps) with g (3 taps)
  bt, g, at = cw.matrices()
  rng = np.random.default_rng(1)
  d, f = rng.standard_normal(6), rng.standard_normal(3)
  assert np.allclose(at @ ((g @ f) * (bt @ d)), [d[i:i + 3] @ f for i in range(4)], atol=1e-12)

@pytest.mark.parametrize("shape", [(1, 3, 5, 7, 9, 1), (2, 8, 16, 13, 6, 1), (1, 4, 4, 10, 11, 0), (2, 5, 3, 9, 9, 2), (1, 1, 1, 3, 3, 0)])
def test_reference_is_the_conv(shape):
  B, C, O, H, W, P = shape
  x, w, b = _data(B, C, O, H, W)
  assert _rel(cw.reference(x, w, b, P), direct(x, w, b, P)) < 1e-12

SHAPES = [(1, 3, 5, 7, 9, 1), (2, 17, 33, 13, 6, 1), (1, 4, 4, 10, 11, 0), (2, 5, 3, 9, 9, 2), (3, 24, 40, 16, 16, 1), (1, 1, 1, 3, 3, 0),
          (1, 64, 64, 32, 36, 1)]

def _direct_kernel(x, w, b, P, isa):
  """Our direct implicit-GEMM conv (ops/cpu_gemm.py), the fp32 path Winograd replaces: its error sets the yardstick."""
  B, C, H, W = x.shape
  O, OH, OW = w.shape[0], H + 2 * P - 2, W + 2 * P - 2
  g = cpu_gemm.Gemm(B, O, OH * OW, C * 9, "f32", (0, C * 9, 1), "f32", None, conv=cpu_gemm.Conv(C, H, W, 3, 3, 1, P, OH, OW),
                    c_strides=(O * OH * OW, OH * OW), bias=None if b is None else "m", threads=2, isa=isa)
  return cpu_gemm.run(g, Tensor(w.reshape(O, -1)), Tensor(x), None if b is None else Tensor(b)).numpy().reshape(B, O, OH, OW)

@pytest.mark.parametrize("isa", list(cpu_gemm.ISAS))
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels(shape, threads, isa):
  B, C, O, H, W, P = shape
  x, w, b = _data(B, C, O, H, W)
  for bias in (b, None):
    ref = direct(x, w, bias, P)
    y = cw.conv2d(Tensor(x), Tensor(w), None if bias is None else Tensor(bias), P, "f32", threads, isa).numpy()
    err, err_direct = _rel(y, ref), _rel(_direct_kernel(x, w, bias, P, isa), ref)
    assert err < min(CAP, GROWTH * max(err_direct, 1e-7)), (err, err_direct)

def test_half_weights_widened():
  # fp16-stored weights are widened in the filter transform: compare with the fp16 values themselves
  x, w, b = _data(2, 12, 20, 11, 14, wdt=np.float16)
  ref = direct(x, w.astype(np.float64), b, 1)
  y = cw.conv2d(Tensor(x), Tensor(w), Tensor(b), 1, "f16", 2, cpu.cpu_isa()).numpy()
  assert _rel(y, ref) < min(CAP, GROWTH * max(_rel(_direct_kernel(x, w.astype(np.float32), b, 1, cpu.cpu_isa()), ref), 1e-7))

@pytest.mark.parametrize("mode,shape,wino", [("auto", (2, 8, 8, 64, 64), True), ("auto", (2, 16, 16, 16, 16), False),
                                              ("1", (2, 16, 16, 16, 16), True), ("0", (2, 8, 8, 64, 64), False)])
def test_dispatch_rule(monkeypatch, mode, shape, wino):
  # auto: Winograd from WINO_MIN_TILES 4x4 tiles over all images (64x64 batch 2 = 512 tiles; 16x16 batch 2 = 32); 1/0 force it on/off
  monkeypatch.setenv("TINYSD_WINOGRAD", mode)
  cpu.install()
  B, C, O, H, W = shape
  x, w, b = _data(B, C, O, H, W)
  out = cpu.conv2d(Tensor(x), Tensor(w), Tensor(b), padding=1)
  assert out is not None
  names = " ".join(str(u.arg) for u in out.uop.toposort() if "wino" in str(u.arg)[:200])
  assert ("wino_in" in names) == wino
  assert _rel(out.numpy(), direct(x, w, b, 1)) < CAP

@pytest.mark.parametrize("shape", [(2, 5, 7, 23, 14, 1), (1, 8, 3, 17, 9, 0), (3, 4, 6, 12, 12, 2)])
def test_bands(monkeypatch, shape):
  # big images run in bands of tile rows (V/M bounded by BAND_BYTES): force several bands, including a short last one
  B, C, O, H, W, P = shape
  monkeypatch.setattr(cw, "BAND_BYTES", 36 * max(C, O) * B * 2 * cw.tiles(H + 2 * P - 2, W + 2 * P - 2)[1] * 4)   # 2 tile rows a band
  x, w, b = _data(B, C, O, H, W)
  out = cw.conv2d(Tensor(x), Tensor(w), Tensor(b), P, "f32", 2, cpu.cpu_isa())
  bands = {str(u.arg.name) for u in out.uop.toposort() if hasattr(u.arg, "name") and str(u.arg.name).startswith("wino_out")}
  assert len(bands) == -(-cw.tiles(H + 2 * P - 2, W + 2 * P - 2)[0] // 2) >= 2, bands
  ref = direct(x, w, b, P)
  assert _rel(out.numpy(), ref) < min(CAP, GROWTH * max(_rel(_direct_kernel(x, w, b, P, cpu.cpu_isa()), ref), 1e-7))
