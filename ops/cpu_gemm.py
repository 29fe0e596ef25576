# GEMM kernels we own for the CPU: C[b] = A[b] @ B[b] (+ bias), fp32 accumulate, written as C and run as one tinygrad kernel each.
# BLIS's loop nest (Goto & van de Geijn): column blocks of NC -> depth blocks of KC, B block packed -> row blocks of MC, A block packed
# -> NR-wide x MR-tall micro-tiles held in vector registers. Both operands are packed on the fly from their natural layout, so nothing
# is re-laid-out at load time and no second copy of any weight exists: the pack of a weight block is amortised over all the rows (tokens
# or pixels) that use it. Packing also converts: fp16/bf16 weights are widened to fp32 while packed (weights stay half-size in memory,
# compute is fp32 at fp32 speed). B may be an implicit im2col of an NCHW image (3x3 and strided convs): the pack gathers the taps.
# The source is generated per shape (sizes are constants) and compiled by tinygrad's clang; `reference()` is the naive numpy meaning.
from __future__ import annotations
import math
from dataclasses import dataclass
import numpy as np
from tinygrad import Tensor, dtypes
from . import tg

# micro-tile per ISA: (vector lanes W, rows MR, vectors per row NV). AVX-512: 8x32 = 16 zmm accumulators (2 FMA pipes x 4 cycles latency
# need >= 8 in flight), 2 B loads + 8 broadcasts per k. AVX2 (16 ymm registers): 6x16 = 12 accumulators + 2 B vectors + 1 broadcast.
ISAS = {"avx512": (16, 8, 2), "avx2": (8, 6, 2)}
CTYPES = {"f32": "float", "f16": "__fp16", "bf16": "unsigned short"}

@dataclass(frozen=True)
class Conv:
  C: int; H: int; W: int; KH: int; KW: int; S: int; P: int; OH: int; OW: int   # noqa: E702

@dataclass(frozen=True)
class Gemm:
  batch: int; M: int; N: int; K: int                                              # noqa: E702
  a_dtype: str; a_strides: tuple[int, int, int]                                   # noqa: E702  (batch, m, k) in elements
  b_dtype: str; b_strides: tuple[int, int, int]|None = None                       # noqa: E702  (batch, k, n); None: conv
  conv: Conv|None = None
  c_strides: tuple[int, int] = (0, 0)                                             # (batch, m); n stride is 1
  bias: str|None = None                                                           # "m" (per row) / "n" (per column), float32
  threads: int = 1
  isa: str = "avx512"
  fold: bool = False                                                              # conv only: batch folded into N (see below)
  prec: str = "f32"                                                               # "bf16": products of bf16-rounded operands (vdpbf16ps)
  MC: int = 96; KC: int = 384; NC: int = 384                                      # noqa: E702  (best of 6 blockings on Zen 5 SD shapes)

def _split(g:Gemm) -> tuple[int, bool]:
  # parts per batch item so that threads get equal work: batch 2 on 2 threads -> one item each; batch 1 -> halves of the larger dim
  if g.fold: return g.threads, g.batch * g.N >= g.M
  parts = g.threads // math.gcd(g.batch, g.threads)
  return parts, g.N >= g.M

def _cvt(dt:str, expr:str) -> str:
  if dt == "bf16": return f"bf16f({expr})"
  return f"(float)({expr})"

def source(g:Gemm) -> str:
  W, MR, NV = ISAS[g.isa]
  NR, KC, MC = W * NV, g.KC, g.MC
  NC = max(NR, g.NC // NR * NR)
  LDB = NC + W   # padded row of the packed B block: a power-of-two stride would map every k row to the same L1 set
  parts, split_n = _split(g)
  # fold: a conv whose images are small (the UNet's 8x8 and 4x4 levels) is one GEMM over all batch items' pixels, N' = batch * N, so the
  # threads split the weights (M) and each weight block is read once, instead of once per image and thread
  assert not g.fold or (g.conv is not None and g.a_strides[0] == 0 and g.bias != "n"), "fold needs a conv with shared weights"
  NB, NL = (1, g.batch * g.N) if g.fold else (g.batch, g.N)
  bf16 = g.prec == "bf16"
  assert not bf16 or g.isa == "avx512", "bf16 products need AVX512-BF16"
  sab, sam, sak = g.a_strides
  scb, scm = g.c_strides
  ta, tb = CTYPES[g.a_dtype], CTYPES[g.b_dtype]
  L = [f"typedef float vf __attribute__((ext_vector_type({W}), aligned(4)));",
       "union fu { unsigned int u; float f; };",
       "#define bf16f(x) (((union fu){.u = ((unsigned int)(x)) << 16}).f)",
       "#define MIN(a, b) ((a) < (b) ? (a) : (b))",
       f"float* restrict Cq = (float*)@C@; const {ta}* restrict Aq = (const {ta}*)@A@; const {tb}* restrict Bq = (const {tb}*)@B@;"]
  if g.bias: L.append("const float* restrict bias = (const float*)@BIAS@;")
  L += [f"const int tid = {'@T@' if g.threads > 1 else '0'};",
        f"float Ap[{MC * KC}] __attribute__((aligned(64))); float Bp[{KC * LDB}] __attribute__((aligned(64)));",
        f"float tile[{MR * NR}] __attribute__((aligned(64)));",
        *([f"unsigned int Ap2[{MC * KC // 2 + MC}] __attribute__((aligned(64))); unsigned int Bp2[{(KC // 2 + 1) * LDB}] __attribute__((aligned(64)));",
           "typedef int vi __attribute__((ext_vector_type(16), aligned(4)));",
           "#define BF(x_) ({ unsigned int u_ = ((union fu){.f = (x_)}).u; (u_ + 0x7fffu + ((u_ >> 16) & 1u)) >> 16; })"] if bf16 else []),
        f"for (int item = tid; item < {NB * parts}; item += {g.threads}) {{",
        f" const int b = item / {parts}, part = item % {parts};"]
  D, A_ = (NL, NR) if split_n else (g.M, MR)
  chunk = -(-(-(-D // parts)) // A_) * A_
  L.append(f" const int lo = part * {chunk}, hi = MIN({D}, lo + {chunk});")
  L.append(" if (lo >= hi) continue;")
  L.append(f" const int m0 = {'0' if split_n else 'lo'}, m1 = {g.M if split_n else 'hi'}, n0 = {'lo' if split_n else '0'}, n1 = {'hi' if split_n else NL};")
  L.append(f" const {ta}* restrict A = Aq + (long)b * {sab}; float* restrict Cb = Cq + (long)b * {scb};")
  bsb = g.b_strides[0] if g.conv is None else g.conv.C * g.conv.H * g.conv.W
  L.append(f" const {tb}* restrict Bb = Bq + (long)b * {bsb};")   # fold: b = 0, the pack walks the images itself
  L.append(f" for (int jc = n0; jc < n1; jc += {NC}) {{")
  L.append(f"  const int nc = MIN({NC}, n1 - jc), ncp = (nc + {NR - 1}) / {NR} * {NR};")
  L.append(f"  for (int pc = 0; pc < {g.K}; pc += {KC}) {{")
  L.append(f"   const int kc = MIN({KC}, {g.K} - pc), kcp = (kc + 1) / 2;")
  L += _pack_b(g, LDB)
  if bf16:
    L.append("   for (int k = 0; k < kcp; k++) for (int j = 0; j < ncp; j++) {")
    L.append(f"    const float lo_ = Bp[2 * k * {LDB} + j], hi_ = (2 * k + 1 < kc) ? Bp[(2 * k + 1) * {LDB} + j] : 0.0f;")
    L.append(f"    Bp2[k * {LDB} + j] = BF(lo_) | (BF(hi_) << 16); }}")
  L.append(f"   for (int ic = m0; ic < m1; ic += {MC}) {{")
  L.append(f"    const int mc = MIN({MC}, m1 - ic), mcp = (mc + {MR - 1}) / {MR} * {MR};")
  # pack A: Ap[i/MR][k][i%MR], rows past mc zero
  # row by row: each source row is read contiguously (when k is the unit stride, as for every weight), written with stride MR
  L.append(f"    for (int i = 0; i < mcp; i += {MR}) for (int r = 0; r < {MR}; r++) {{")
  L.append("     float* restrict d = Ap + i * kc + r;")
  L.append(f"     if (i + r >= mc) {{ for (int k = 0; k < kc; k++) d[k * {MR}] = 0.0f; continue; }}")
  L.append(f"     const {ta}* restrict src = A + (long)(ic + i + r) * {sam} + (long)pc * {sak};")
  L.append(f"     for (int k = 0; k < kc; k++) d[k * {MR}] = {_cvt(g.a_dtype, f'src[(long)k * {sak}]')};")
  L.append("    }")
  if bf16:
    L.append(f"    for (int i = 0; i < mcp; i += {MR}) for (int k = 0; k < kcp; k++) for (int r = 0; r < {MR}; r++) {{")
    L.append(f"     const float lo_ = Ap[i * kc + 2 * k * {MR} + r], hi_ = (2 * k + 1 < kc) ? Ap[i * kc + (2 * k + 1) * {MR} + r] : 0.0f;")
    L.append(f"     Ap2[i * kcp + k * {MR} + r] = BF(lo_) | (BF(hi_) << 16); }}")
  L.append(f"    const int last = pc + {KC} >= {g.K};")
  L.append(f"    for (int jr = 0; jr < ncp; jr += {NR}) for (int ir = 0; ir < mcp; ir += {MR}) {{")
  L += [f"     vf acc{r}_{v} = (vf)0.0f;" for r in range(MR) for v in range(NV)]
  if not bf16:
    L.append("     const float* restrict ap = Ap + ir * kc; const float* restrict bp = Bp + jr;")
    L.append("     for (int k = 0; k < kc; k++) {")
    L += [f"      const vf b{v} = *(const vf*)(bp + k * {LDB} + {W * v});" for v in range(NV)]
    for r in range(MR):
      L.append(f"      {{ const float x = ap[k * {MR} + {r}]; " + " ".join(f"acc{r}_{v} += x * b{v};" for v in range(NV)) + " }")
  else:   # one vdpbf16ps = 2 k steps: acc += a[2p]*b[2p] + a[2p+1]*b[2p+1], pairs packed as 32-bit words
    L.append("     const unsigned int* restrict ap = Ap2 + ir * kcp; const unsigned int* restrict bp = Bp2 + jr;")
    L.append("     for (int k = 0; k < kcp; k++) {")
    L += [f"      const vi b{v} = *(const vi*)(bp + k * {LDB} + {W * v});" for v in range(NV)]
    for r in range(MR):
      L.append(f"      {{ const vi x = (vi)(int)ap[k * {MR} + {r}]; " +
               " ".join(f"acc{r}_{v} = __builtin_ia32_dpbf16ps_512(acc{r}_{v}, x, b{v});" for v in range(NV)) + " }")
  L.append("     }")
  L.append(f"     const int mr = MIN({MR}, mc - ir), nr = MIN({NR}, nc - jr);")
  if g.fold:   # output column q of the folded GEMM is pixel q % N of image q / N
    L.append(f"     const int q0 = jc + jr, b0 = q0 / {g.N}, n0_ = q0 % {g.N};")
    L.append(f"     float* restrict c = Cq + (long)b0 * {scb} + (long)(ic + ir) * {scm} + n0_;")
    L.append(f"     if (mr == {MR} && nr == {NR} && n0_ + {NR} <= {g.N}) {{")
  else:
    L.append(f"     float* restrict c = Cb + (long)(ic + ir) * {scm} + jc + jr;")
    L.append(f"     if (mr == {MR} && nr == {NR}) {{")
  for r in range(MR):
    for v in range(NV):
      e = f"acc{r}_{v}"
      L.append(f"      {{ vf o = {e}; float* p = c + {r} * {scm} + {W * v}; if (pc) o += *(vf*)p;")
      if g.bias == "m": L.append(f"        if (last) o += bias[ic + ir + {r}];")
      if g.bias == "n": L.append(f"        if (last) o += *(const vf*)(bias + jc + jr + {W * v});")
      L.append("        *(vf*)p = o; }")
  L.append("     } else {")
  L += [f"      *(vf*)(tile + {r * NR + W * v}) = acc{r}_{v};" for r in range(MR) for v in range(NV)]
  L.append("      for (int r = 0; r < mr; r++) for (int j = 0; j < nr; j++) {")
  pj = f"Cq + (long)((q0 + j) / {g.N}) * {scb} + (long)(ic + ir + r) * {scm} + (q0 + j) % {g.N}" if g.fold else f"c + (long)r * {scm} + j"
  L.append(f"       float o = tile[r * {NR} + j]; float* p = {pj}; if (pc) o += *p;")
  if g.bias == "m": L.append("       if (last) o += bias[ic + ir + r];")
  if g.bias == "n": L.append("       if (last) o += bias[jc + jr + j];")
  L.append("       *p = o; }")
  L.append("     }")
  L.append("    }\n   }\n  }\n }\n}")
  return "\n".join(L)

def _pack_b(g:Gemm, LDB:int) -> list[str]:
  # Bp[k][j] = B[pc+k][jc+j] for j < nc, 0 up to ncp
  L = []
  if g.conv is None:
    sbb, sbk, sbn = g.b_strides
    src = lambda k, j: _cvt(g.b_dtype, f"Bb[(long)(pc + {k}) * {sbk} + (long)(jc + {j}) * {sbn}]")
    if sbn == 1 or sbk != 1:   # rows of B contiguous (or neither): copy row by row
      L.append(f"   for (int k = 0; k < kc; k++) {{ float* restrict d = Bp + k * {LDB}; for (int j = 0; j < nc; j++) d[j] = {src('k', 'j')};"
               f" for (int j = nc; j < ncp; j++) d[j] = 0.0f; }}")
    else:                      # B = W^T (a Linear weight): read along k, write down the column
      L.append(f"   for (int j = 0; j < nc; j++) for (int k = 0; k < kc; k++) Bp[k * {LDB} + j] = {src('k', 'j')};")
      L.append(f"   for (int k = 0; k < kc; k++) for (int j = nc; j < ncp; j++) Bp[k * {LDB} + j] = 0.0f;")
    return L
  c = g.conv
  cv = lambda e: _cvt(g.b_dtype, e)
  L.append("   for (int k = 0; k < kc; k++) {")
  L.append(f"    const int kk = pc + k, ch = kk / {c.KH * c.KW}, ky = kk % {c.KH * c.KW} / {c.KW}, kx = kk % {c.KW};")
  L.append(f"    int j = 0, im = jc / {c.OH * c.OW}, oy = jc % {c.OH * c.OW} / {c.OW}, ox = jc % {c.OW};")   # im > 0 only when folded
  L.append(f"    const {CTYPES[g.b_dtype]}* restrict xc = Bb + (long)im * {c.C * c.H * c.W} + (long)ch * {c.H * c.W}; float* restrict d = Bp + k * {LDB};")
  L.append("    while (j < nc) {")
  L.append(f"     const int run = MIN({c.OW} - ox, nc - j), iy = oy * {c.S} + ky - {c.P};")
  L.append(f"     if (iy < 0 || iy >= {c.H}) {{ for (int t = 0; t < run; t++) d[j + t] = 0.0f; }}")
  L.append("     else {")
  L.append(f"      const {CTYPES[g.b_dtype]}* restrict row = xc + (long)iy * {c.W};")
  if c.S == 1:   # taps of one output row are a contiguous input run, zero where it hangs over the padding
    L.append(f"      const int ix0 = ox + kx - {c.P}; int tl = -ix0, th = {c.W} - ix0;")
    L.append("      tl = tl < 0 ? 0 : (tl > run ? run : tl); th = th > run ? run : (th < tl ? tl : th);")
    L.append("      for (int t = 0; t < tl; t++) d[j + t] = 0.0f;")
    L.append(f"      for (int t = tl; t < th; t++) d[j + t] = {cv('row[ix0 + t]')};")
    L.append("      for (int t = th; t < run; t++) d[j + t] = 0.0f;")
  else:
    L.append(f"      for (int t = 0; t < run; t++) {{ const int ix = (ox + t) * {c.S} + kx - {c.P}; d[j + t] = (ix >= 0 && ix < {c.W}) ? {cv('row[ix]')} : 0.0f; }}")
  L.append("     }")
  L.append(f"     j += run; ox = 0; if (++oy == {c.OH}) {{ oy = 0; xc += {c.C * c.H * c.W}; }}")
  L.append("    }")
  L.append("    for (; j < ncp; j++) d[j] = 0.0f;")
  L.append("   }")
  return L

def run(g:Gemm, a:Tensor, b:Tensor, bias:Tensor|None=None) -> Tensor:
  """The kernel as a lazy Tensor op: (batch*M*N,) float32. a, b, bias must be contiguous buffers in the dtypes/strides g describes."""
  names = ["C", "A", "B"] + (["BIAS"] if g.bias else []) + (["T"] if g.threads > 1 else [])
  code = tg.c_named(source(g), names)
  ins = (a, b) + ((bias,) if g.bias else ())
  mem = sum(t.nbytes() for t in ins) + 4 * g.batch * g.M * g.N
  name = f"cgemm{'_conv' if g.conv else ''}{'_fold' if g.fold else ''}{'_bf16' if g.prec == 'bf16' else ''}_{g.batch}x{g.M}x{g.N}x{g.K}"
  out = Tensor.empty(g.batch * g.M * g.N, dtype=dtypes.float32, device=a.device)
  ins = tuple(t.contiguous() for t in ins)   # no copy for what already is a contiguous buffer
  return tg.custom(out, ins, lambda o, *i: tg.c_kernel(code, o, i, name, ops=2 * g.batch * g.M * g.N * g.K, mem=mem, threads=g.threads))

# *** numpy meaning, for tests ***

def reference(g:Gemm, a:np.ndarray, b:np.ndarray, bias:np.ndarray|None=None) -> np.ndarray:
  """float64 result (batch, M, N) of what the kernel computes, from flat a/b arrays (any dtype numpy can widen)."""
  a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
  sab, sam, sak = g.a_strides
  A = np.stack([np.lib.stride_tricks.as_strided(a[bi * sab:], (g.M, g.K), (sam * 8, sak * 8)) for bi in range(g.batch)])
  if g.conv is None:
    sbb, sbk, sbn = g.b_strides
    B = np.stack([np.lib.stride_tricks.as_strided(b[bi * sbb:], (g.K, g.N), (sbk * 8, sbn * 8)) for bi in range(g.batch)])
  else:
    c = g.conv
    x = np.pad(b.reshape(g.batch, c.C, c.H, c.W), ((0, 0), (0, 0), (c.P, c.P + c.S), (c.P, c.P + c.S)))
    cols = [x[:, :, ky:ky + c.OH * c.S:c.S, kx:kx + c.OW * c.S:c.S] for ky in range(c.KH) for kx in range(c.KW)]
    B = np.stack(cols, 2).reshape(g.batch, c.C * c.KH * c.KW, c.OH * c.OW)
  if g.prec == "bf16": A, B = bf16_round(A), bf16_round(B)
  out = A @ B
  if g.bias == "m": out = out + bias.astype(np.float64)[None, :, None]
  if g.bias == "n": out = out + bias.astype(np.float64)[None, None, :]
  return out

def bf16_round(x:np.ndarray) -> np.ndarray:
  """float64 values of x rounded to bf16 (via fp32, round to nearest even), as the bf16 kernels round their operands."""
  u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
  return ((u + 0x7fff + ((u >> 16) & 1)) >> 16 << 16).astype(np.uint32).view(np.float32).astype(np.float64)
