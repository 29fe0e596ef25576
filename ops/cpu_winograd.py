# Winograd F(4x4, 3x3) for stride-1 3x3 convolutions on the CPU (Lavin & Gray 2015): each 4x4 block of outputs is A^T [(G g G^T) * (B^T d B)] A
# over a 6x6 input tile d, so the multiplies become 36 independent GEMMs (O x C) @ (C x tiles), one per point of the 6x6 transform
# domain, with K = C instead of 9C: 2.25x fewer FLOPs than the direct conv (4x fewer multiplies in the GEMM part, less the transforms).
# Three kernels around our batched GEMM (ops/cpu_gemm.py): the input transform (NCHW image -> V[36][C][T]), the filter transform
# (W[O][C][3][3] -> U[36][O][C], per call: it is ~1% of the conv's work and costs no memory between calls), and the output transform
# (M[36][O][T] -> NCHW, + bias). T counts the 4x4 tiles of all images. The transforms are plain loops over a row of tiles that clang
# vectorises. fp32 error grows with the transform's coefficients (up to 8 and 1/24): measured in tests/test_ops_cpu_winograd.py.
from __future__ import annotations
from fractions import Fraction as Fr
import numpy as np
from tinygrad import Tensor, dtypes
from . import tg, cpu_gemm

# interpolation points 0, 1, -1, 2, -2 and infinity
BT = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
G = [[Fr(1, 4), 0, 0], [Fr(-1, 6), Fr(-1, 6), Fr(-1, 6)], [Fr(-1, 6), Fr(1, 6), Fr(-1, 6)], [Fr(1, 24), Fr(1, 12), Fr(1, 6)],
     [Fr(1, 24), Fr(-1, 12), Fr(1, 6)], [0, 0, 1]]
AT = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]

def _lin(row, terms:list[str]) -> str:
  """C expression of sum(row[k] * terms[k]) with the zero coefficients left out."""
  out = []
  for c, t in zip(row, terms):
    if c == 0: continue
    out.append(f"{'+' if c > 0 else '-'} {t}" if abs(c) == 1 else f"{'+' if c > 0 else '-'} {float(abs(c))!r}f * {t}")
  s = " ".join(out)
  return s[2:] if s.startswith("+ ") else "(" + s + ")" if s else "0.0f"

BAND_BYTES = 64 << 20   # V or M of one band at most this (UNet 64x64 at 320 channels, CFG batch: 24 MB, one band)

def tiles(OH:int, OW:int) -> tuple[int, int]: return -(-OH // 4), -(-OW // 4)

def input_source(B:int, C:int, H:int, W:int, P:int, OH:int, OW:int, threads:int, ty0:int=0, TY:int|None=None) -> str:
  """V[e][c][t] = (B^T d B)[e] of the 6x6 tile of channel c at tile t = (image, ty, tx), origin (4(ty0 + ty) - P, 4tx - P), zero outside,
  for the band of TY tile rows from ty0 (default: all)."""
  TY_, TX = tiles(OH, OW)
  TY = TY_ - ty0 if TY is None else TY
  T, RW = B * TY * TX, 4 * TX + 2
  TP = TX + 1   # each padded tile row is split by phase (i % 4), so tile t's six taps 4t..4t+5 are phases 0-3 at t and 0-1 at t+1: unit-stride
  L = ["float* restrict V = (float*)@V@; const float* restrict X = (const float*)@X@;",
       f"const int tid = {'@T@' if threads > 1 else '0'};",
       f"float d[6][4][{TP}] __attribute__((aligned(64))); float u[6][6][{TX}] __attribute__((aligned(64)));",
       f"for (int item = tid; item < {B * C}; item += {threads}) {{",
       f" const int b = item / {C}, c = item % {C}; const float* restrict xc = X + (long)item * {H * W};",
       f" for (int ty = 0; ty < {TY}; ty++) {{",
       "  for (int r = 0; r < 6; r++) {",   # the tile rows with their padding, so the transform below has no bounds checks
       f"   const int iy = 4 * (ty + {ty0}) - {P} + r;",
       f"   float* restrict dr = &d[r][0][0]; for (int i = 0; i < {4 * TP}; i++) dr[i] = 0.0f;",
       "   if (iy < 0 || iy >= " + str(H) + ") continue;",
       f"   const float* restrict row = xc + (long)iy * {W};",
       f"   for (int ix = 0; ix < {min(W, RW - P)}; ix++) {{ const int i = ix + {P}; d[r][i & 3][i >> 2] = row[ix]; }}",
       "  }",
       f"  for (int r = 0; r < 6; r++) for (int t = 0; t < {TX}; t++) {{"]   # rows: u[r][j] = sum_k BT[j][k] d[r][4t + k]
  taps = ["d[r][0][t]", "d[r][1][t]", "d[r][2][t]", "d[r][3][t]", "d[r][0][t + 1]", "d[r][1][t + 1]"]
  L += [f"   u[r][{j}][t] = {_lin(BT[j], taps)};" for j in range(6)]
  L += ["  }",
        f"  float* restrict v = V + (long)c * {T} + (long)b * {TY * TX} + (long)ty * {TX};",
        f"  for (int j = 0; j < 6; j++) for (int t = 0; t < {TX}; t++) {{"]   # columns: V[i][j] = sum_r BT[i][r] u[r][j]
  L += [f"   v[(long)({i} * 6 + j) * {C * T} + t] = {_lin(BT[i], [f'u[{r}][j][t]' for r in range(6)])};" for i in range(6)]
  L += ["  }", " }", "}"]
  return "\n".join(L)

def filter_source(O:int, C:int, w_dtype:str, threads:int) -> str:
  """U[e][o][c] = (G g G^T)[e] of the 3x3 filter g = W[o][c], widened to fp32."""
  ct = cpu_gemm.CTYPES[w_dtype]
  L = [f"float* restrict U = (float*)@U@; const {ct}* restrict Wq = (const {ct}*)@W@;",
       f"const int tid = {'@T@' if threads > 1 else '0'};",
       f"for (int o = tid; o < {O}; o += {threads}) for (int c = 0; c < {C}; c++) {{",
       f" const {ct}* restrict g = Wq + ((long)o * {C} + c) * 9; float h[6][3];",
       " for (int k = 0; k < 3; k++) {"]
  L += [f"  h[{i}][k] = {_lin(G[i], [f'(float)g[{r} * 3 + k]' for r in range(3)])};" for i in range(6)]
  L += [" }",
        f" float* restrict u = U + (long)o * {C} + c;"]
  L += [f" u[{(i * 6 + j) * O * C}L] = {_lin(G[j], [f'h[{i}][{k}]' for k in range(3)])};" for i in range(6) for j in range(6)]
  L.append("}")
  return "\n".join(L)

def output_source(B:int, O:int, OH:int, OW:int, bias:bool, threads:int, ty0:int=0, TY:int|None=None) -> str:
  """Y[b][o] = A^T M A (+ bias[o]) of every tile of the band of TY tile rows from ty0 (default: all): its output rows 4ty0.. cropped to
  OH x OW, as a (B, O, rows, OW) array."""
  TY_, TX = tiles(OH, OW)
  TY = TY_ - ty0 if TY is None else TY
  T, rows = B * TY * TX, min(4 * TY, OH - 4 * ty0)
  L = ["#define MIN(a, b) ((a) < (b) ? (a) : (b))",
       "float* restrict Y = (float*)@Y@; const float* restrict Mq = (const float*)@M@;",
       *(["const float* restrict bias = (const float*)@BIAS@;"] if bias else []),
       f"const int tid = {'@T@' if threads > 1 else '0'};",
       f"float w[4][6][{TX}] __attribute__((aligned(64))); float y[4][{4 * TX}] __attribute__((aligned(64)));",
       f"for (int item = tid; item < {B * O}; item += {threads}) {{",
       f" const int b = item / {O}, o = item % {O}; float* restrict yo = Y + (long)item * {rows * OW};",
       f" const float bv = {'bias[o]' if bias else '0.0f'};",
       f" for (int ty = 0; ty < {TY}; ty++) {{",
       f"  const float* restrict m = Mq + (long)o * {T} + (long)b * {TY * TX} + (long)ty * {TX};",
       f"  for (int j = 0; j < 6; j++) for (int t = 0; t < {TX}; t++) {{"]   # columns: w[a][j] = sum_i AT[a][i] M[i][j]
  L += [f"   w[{a}][j][t] = {_lin(AT[a], [f'm[(long)({i} * 6 + j) * {O * T} + t]' for i in range(6)])};" for a in range(4)]
  L += ["  }",
        f"  for (int a = 0; a < 4; a++) for (int t = 0; t < {TX}; t++) {{"]   # rows: y[a][4t + c] = sum_j AT[c][j] w[a][j]
  L += [f"   y[a][4 * t + {c}] = {_lin(AT[c], [f'w[a][{j}][t]' for j in range(6)])} + bv;" for c in range(4)]
  L += ["  }",
        f"  for (int a = 0; a < MIN(4, {rows} - 4 * ty); a++) {{",
        f"   float* restrict dst = yo + (long)(4 * ty + a) * {OW};",
        f"   for (int i = 0; i < {OW}; i++) dst[i] = y[a][i];",
        "  }", " }", "}"]
  return "\n".join(L)

def _kernel(code:str, names:list[str], out:Tensor, ins:tuple[Tensor, ...], name:str, threads:int, ops:int) -> Tensor:
  code = tg.c_named(code, names + (["T"] if threads > 1 else []))
  mem = sum(t.nbytes() for t in ins) + out.nbytes()
  ins = tuple(t.contiguous() for t in ins)
  return tg.custom(out, ins, lambda o, *i: tg.c_kernel(code, o, i, name, ops=ops, mem=mem, threads=threads))

def conv2d(x:Tensor, w:Tensor, bias:Tensor|None, P:int, w_dtype:str, threads:int, isa:str, prec:str="f32") -> Tensor:
  """Stride-1 3x3 conv of fp32 NCHW x with W (O, C, 3, 3) (fp32 or fp16, widened), padding P, as (B, O, OH, OW) fp32. Images whose
  transform-domain arrays would pass BAND_BYTES run in bands of tile rows, concatenated: V and M are 36/16 = 2.25x the input and output."""
  B, C, H, W_ = x.shape
  O = w.shape[0]
  OH, OW = H + 2 * P - 2, W_ + 2 * P - 2
  TY, TX = tiles(OH, OW)
  bands = -(-36 * max(C, O) * B * TY * TX * 4 // BAND_BYTES)
  nty = -(-TY // bands)
  U = _kernel(filter_source(O, C, w_dtype, threads), ["U", "W"], Tensor.empty(36 * O * C, dtype=dtypes.float32, device=x.device),
              (w,), f"wino_filter_{O}x{C}", threads, ops=O * C * (6 * 3 * 5 + 36 * 5))
  outs = []
  for ty0 in range(0, TY, nty):
    ty = min(nty, TY - ty0)
    T, rows = B * ty * TX, min(4 * ty, OH - 4 * ty0)
    V = _kernel(input_source(B, C, H, W_, P, OH, OW, threads, ty0, ty), ["V", "X"], Tensor.empty(36 * C * T, dtype=dtypes.float32, device=x.device),
                (x,), f"wino_in_{B}x{C}x{H}x{W_}_{ty0}_{ty}", threads, ops=36 * 2 * 12 * C * T)
    g = cpu_gemm.Gemm(36, O, T, C, "f32", (O * C, C, 1), "f32", (C * T, T, 1), c_strides=(O * T, T), threads=threads, isa=isa, prec=prec)
    M = cpu_gemm.run(g, U, V)
    Y = _kernel(output_source(B, O, OH, OW, bias is not None, threads, ty0, ty), ["Y", "M"] + (["BIAS"] if bias is not None else []),
                Tensor.empty(B * O * rows * OW, dtype=dtypes.float32, device=x.device), (M,) + ((bias.float(),) if bias is not None else ()),
                f"wino_out_{B}x{O}x{OH}x{OW}_{ty0}_{ty}", threads, ops=O * T * (4 * 6 * 5 + 16 * 5))
    outs.append(Y.reshape(B, O, rows, OW))
  return outs[0] if len(outs) == 1 else Tensor.cat(*outs, dim=2)

# *** numpy meaning, for tests ***

def matrices() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  return tuple(np.array([[float(v) for v in r] for r in m]) for m in (BT, G, AT))

def reference(x:np.ndarray, w:np.ndarray, bias:np.ndarray|None, P:int) -> np.ndarray:
  """float64 Winograd conv in numpy (the algorithm, exact up to float64 rounding): equals the direct conv."""
  bt, g, at = matrices()
  x, w = x.astype(np.float64), w.astype(np.float64)
  B, C, H, W_ = x.shape
  OH, OW = H + 2 * P - 2, W_ + 2 * P - 2
  TY, TX = tiles(OH, OW)
  xp = np.zeros((B, C, 4 * TY + 2, 4 * TX + 2))
  xs = np.pad(x, ((0, 0), (0, 0), (P, P), (P, P)))[:, :, :4 * TY + 2, :4 * TX + 2]
  xp[:, :, :xs.shape[2], :xs.shape[3]] = xs
  d = np.stack([np.stack([xp[:, :, 4 * ty:4 * ty + 6, 4 * tx:4 * tx + 6] for tx in range(TX)], 2) for ty in range(TY)], 2)  # B,C,TY,TX,6,6
  v = np.einsum("ir,bcyxrs,js->ijcbyx", bt, d, bt)
  u = np.einsum("ir,ocrs,js->ijoc", g, w, g)
  m = np.einsum("ijoc,ijcbyx->ijobyx", u, v)
  y = np.einsum("ai,ijobyx,cj->boyaxc", at, m, at).reshape(B, O := w.shape[0], 4 * TY, 4 * TX)[:, :, :OH, :OW]
  return y + (0 if bias is None else bias.astype(np.float64)[None, :, None, None])
