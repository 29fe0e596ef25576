# Activation functions as C kernels for the CPU: SiLU, exact (erf) GELU and quick GELU. tinygrad's clang kernels build exp from its
# portable transcendental code (range checks for inf/nan/denormals on every lane, scalarised per vector element): measured 140 M elements/s
# for a SiLU on 2 Zen 5 cores, ~20x the cost of an add over the same memory, which made the SiLUs after the GroupNorms of every resnet and
# VAE block cost more than the GroupNorms. Here exp is a branch-free Cody-Waite reduction to [-ln2/2, ln2/2] with a degree-7 Taylor
# polynomial (relative error < 2e-7 in fp32) in a plain loop that clang vectorises; erf is Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7),
# the same formula tinygrad's Tensor.erf uses. Inputs are clamped to exp's fp32 range, so huge |x| give the limits (silu(-1e4) = -0).

from __future__ import annotations
import math
import numpy as np
from tinygrad import Tensor, dtypes
from . import tg

KINDS = ("silu", "gelu", "quick_gelu")

# a macro, not a function: the CUSTOM body is pasted inside tinygrad's kernel function, where C allows no nested definitions
_EXP = """#define fexp(x_) ({ float x0 = (x_); x0 = x0 < -87.0f ? -87.0f : (x0 > 88.0f ? 88.0f : x0); \\
  const float t0 = x0 * 1.44269504089f; const int i0 = (int)(t0 + (t0 >= 0.0f ? 0.5f : -0.5f)); \\
  const float n0 = (float)i0, r = (x0 - n0 * 0.693145751953125f) - n0 * 1.428606765330187e-06f; \\
  (1.0f + r * (1.0f + r * (0.5f + r * (0.16666667f + r * (0.041666668f + r * (0.008333334f + r * (0.0013888889f + r * 0.0001984127f))))))) \\
    * __builtin_bit_cast(float, (i0 + 127) << 23); })
"""

# each an expression in the float @v@; below -87 (-51 for quick GELU) the true value is > -1e-35: -0, where v / (1 + exp(87)) would give
# v / 6e37, wrong for v near -FLT_MAX. GELU: 0.5 v (1 + erf(v / sqrt 2)), erf(z) = sign(z) (1 - t poly(t) exp(-z^2)), t = 1 / (1 + 0.3275911 |z|)
_EXPR = {
  "silu": "(@v@ < -87.0f ? -0.0f : @v@ / (1.0f + fexp(-@v@)))",
  "quick_gelu": "(@v@ < -51.1f ? -0.0f : @v@ / (1.0f + fexp(-1.702f * @v@)))",
  "gelu": ("({ const float z = @v@ * 0.70710678f, az = z < 0.0f ? -z : z, t = 1.0f / (1.0f + 0.3275911f * az);"
           " const float e = 1.0f - t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f)))) * fexp(-z * z);"
           " 0.5f * @v@ * (1.0f + (z < 0.0f ? -e : e)); })"),
}

def expr(kind:str, v:str) -> str: return _EXPR[kind].replace("@v@", v)

def source(kind:str, n:int, threads:int) -> str:
  chunk = (-(-n // threads) + 15) // 16 * 16 if threads > 1 else n   # lanes of a vector never straddle two threads
  return "\n".join([_EXP,
    "float* restrict Y = (float*)@Y@; const float* restrict X = (const float*)@X@;",
    f"const long lo = (long)({'@T@' if threads > 1 else '0'}) * {chunk}, hi = lo + {chunk} < {n} ? lo + {chunk} : {n};",
    f"for (long j = lo; j < hi; j++) {{ const float x = X[j]; Y[j] = {expr(kind, 'x')}; }}"])

def run(kind:str, x:Tensor, threads:int) -> Tensor:
  """kind(x) for a float32 CPU tensor, as one kernel; same shape."""
  n = x.numel()
  code = tg.c_named(source(kind, n, threads), ["Y", "X", "T"])
  out = Tensor.empty(n, dtype=dtypes.float32, device=x.device)
  flops = {"silu": 20, "quick_gelu": 21, "gelu": 35}[kind] * n
  y = tg.custom(out, (x.reshape(n).contiguous(),), lambda o, i: tg.c_kernel(code, o, (i,), f"act_{kind}_{n}", ops=flops, mem=8 * n, threads=threads))
  return y.reshape(x.shape)

def reference(kind:str, x:np.ndarray) -> np.ndarray:
  """float64 meaning (exact erf)."""
  x = x.astype(np.float64)
  if kind == "silu": return x / (1 + np.exp(-x))
  if kind == "quick_gelu": return x / (1 + np.exp(-1.702 * x))
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
