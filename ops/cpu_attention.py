# Fused ("flash") attention on the CPU device: softmax(q k^T / sqrt(d)) v as ONE tinygrad kernel whose body is hand-written C (ops/tg.py
# c_kernel). The (Lq, Lk) scores are never stored: per (batch, head, block of BQ queries) the kernel walks the keys in blocks of BK, with an
# online softmax (running max m and sum l per query, older sums rescaled by 2^(m_old - m_new)).
# Layout trick: queries live in the vector lanes everywhere. S^T[key, query] = sum_c K[key, c] * Qt[c, query] broadcasts K straight from
# its own rows (no K transpose per block), the block max is a lane-wise max over rows (no horizontal reductions), and
# O^T[e, query] += V[key, e] * P^T[key, query] again broadcasts V from its rows. Only Q (packed once per query block, pre-scaled by
# log2(e)/sqrt(d) so exp becomes exp2) and O (unpacked once at the end) are transposed, so d and dv need no padding and any value works.
# Both products are register-blocked (MR rows x NV vectors of accumulators, broadcast-FMA from memory); exp2 is a polynomial.
from __future__ import annotations
import math, os
from tinygrad import Tensor, dtypes
from . import tg

# per ISA: W lanes, NV vectors per query block (BQ = W*NV queries), MRS key rows per S tile, MRP value columns per PV tile, BK keys per
# block. AVX-512 (32 zmm): S tile 6x4 = 24 accumulators + 4 Q vectors + 4 block maxima; PV tile the same. AVX2 (16 ymm): 4x3 = 12 + 3.
_CFG = {"avx512": dict(W=16, NV=4, MRS=6, MRP=6, BK=64), "avx2": dict(W=8, NV=3, MRS=4, MRP=4, BK=64)}

def cpu_isa() -> str|None:
  """'avx512' / 'avx2' for this CPU (ops/cpu.py's run-time detection, TINYSD_ISA honoured), None on CPUs we have no kernel for."""
  from .cpu import cpu_isa as detect
  return detect()

ISA: str|None = cpu_isa()   # force "avx2" to run the 8-lane kernel on an AVX-512 machine
THREADS: int|None = None    # core ids per kernel; None: the pool size (tg.install_cpu_threads), else os.cpu_count()

# exp2 on [-0.5, 0.5]: minimax (relative) degree-6 fit, 1.9e-9 in exact arithmetic, ~1e-7 after fp32 Horner (= fp32 rounding)
_EXP2 = ("1.5345808e-04f", "1.3399932e-03f", "9.618489e-03f", "5.5503286e-02f", "2.4022646e-01f", "6.931472e-01f", "1.0f")

def _exp2(dst:str, src:str) -> str:
  # 2^x = 2^n * p(x - n), n = round(x) by the 1.5*2^23 trick (its low mantissa bits are n). x <= 0 always here (scores minus their max);
  # clamping at -127 makes the exponent field 0, so masked (-inf) and NaN (-inf - -inf) inputs give exactly 0
  poly = "; ".join(f"_p = _p*_f + {c}" for c in _EXP2[1:])
  return (f"{{ vf _x = {src}; _x = _x > -127.f ? _x : (vf)-127.f; const vf _t = _x + 12582912.f; const vf _f = _x - (_t - 12582912.f); "
          f"vf _p = (vf){_EXP2[0]}; {poly}; {dst} = _p * (vf)(((vi)_t - 0x4B400000 + 127) << 23); }}")

STACK = 192 << 10   # bytes of scratch per kernel call (stack arrays: the kernel runs freestanding, no malloc)

def blocking(isa:str, D:int, DV:int) -> dict|None:
  """The ISA's blocking with NV cut down until the scratch (Q^T, S^T, O^T blocks) fits STACK; None if even NV = 1 does not."""
  c = dict(_CFG[isa])
  while c["NV"] > 1 and _scratch(c, D, DV) > STACK: c["NV"] -= 1
  return c if _scratch(c, D, DV) <= STACK else None

def _scratch(c:dict, D:int, DV:int) -> int: return 4*c["W"]*c["NV"]*(D + DV + -(-c["BK"] // c["MRS"])*c["MRS"] + 1)

def kernel_c(B:int, H:int, Lq:int, Lk:int, D:int, DV:int, qs:tuple, ks:tuple, vs:tuple, causal:bool, isa:str, threads:int) -> str:
  """C body (not brace-escaped; $O $Q $K $V $T mark the pointers / core id). qs/ks/vs: (batch, head, row) strides of q, k, v in floats;
  the output is written as (B, Lq, H, DV) contiguous."""
  if (c:=blocking(isa, D, DV)) is None: raise ValueError(f"d={D}, dv={DV}: scratch exceeds {STACK} bytes")
  W, NV, MRS, MRP, BK = c["W"], c["NV"], c["MRS"], c["MRP"], c["BK"]
  BQ, NQB = W*NV, -(-Lq // (W*NV))
  NT, BKR = B*H*NQB, -(-BK // MRS)*MRS
  R, V = range(MRS), range(NV)
  sc = repr(float(1/math.sqrt(D) * math.log2(math.e)))
  L = [f"typedef float vf __attribute__((ext_vector_type({W}), aligned(4)));", f"typedef int vi __attribute__((ext_vector_type({W}), aligned(4)));",
       "float* restrict O = (float*)$O; const float* restrict Q = (const float*)$Q;",
       "const float* restrict K = (const float*)$K; const float* restrict Vm = (const float*)$V;",
       # scratch: Q^T block (scaled), S^T then P^T of one key block, O^T accumulators, 1/l. ~100 KB at d = 160
       "float " + ", ".join(f"{n}[{sz}] __attribute__((aligned(64)))" for n, sz in (("qt", D*BQ), ("st", BKR*BQ), ("ot", DV*BQ), ("li", BQ))) + ";",
       f"vi lane; for (int i = 0; i < {W}; i++) lane[i] = i;", "const vf ninf = (vf)(-__builtin_inff());",
       # contiguous task ranges per core: causal blocks grow with the query index, and every head has the same blocks, so ranges balance
       f"const int core = {'$T' if threads > 1 else '0'}, t0 = (int)((long)core*{NT}/{threads}), t1 = (int)((long)(core+1)*{NT}/{threads});",
       "for (int t = t0; t < t1; t++) {",
       f" const int bh = t / {NQB}, b = bh / {H}, h = bh % {H}, i0 = (t % {NQB})*{BQ}, nq = {Lq} - i0 < {BQ} ? {Lq} - i0 : {BQ};",
       f" const float* restrict qp = Q + (long)b*{qs[0]} + (long)h*{qs[1]} + (long)i0*{qs[2]};",
       f" const float* restrict kp = K + (long)b*{ks[0]} + (long)h*{ks[1]}; const float* restrict vp = Vm + (long)b*{vs[0]} + (long)h*{vs[1]};",
       f" float* restrict op = O + (long)b*{Lq*H*DV} + (long)h*{DV} + (long)i0*{H*DV};",
       # padding lanes repeat the last query (finite, never stored); a select, not a zero-fill loop that clang could turn into memset
       f" for (int i = 0; i < {BQ}; i++) {{ const float* restrict qr = qp + (long)(i < nq ? i : nq-1)*{qs[2]};",
       f"  for (int c = 0; c < {D}; c++) qt[c*{BQ}+i] = qr[c]*{sc}f; }}",
       " " + " ".join(f"vf m{v} = ninf, l{v} = (vf)0.f, al{v};" for v in V),
       # causal (top-left aligned, as tinygrad's tril): keys j <= i only, so key blocks past the last query are skipped
       f" const int jend = {f'{Lk} < i0 + nq ? {Lk} : i0 + nq' if causal else Lk};",
       f" for (int j0 = 0; j0 < jend; j0 += {BK}) {{",
       f"  const int nk = jend - j0 < {BK} ? jend - j0 : {BK};",
       "  " + " ".join(f"vf bm{v} = ninf;" for v in V),
       f"  for (int jr = 0; jr < nk; jr += {MRS}) {{",
       # rows past the end repeat the last key: a real score, so the block max stays exact; their P rows are never read
       "   " + " ".join(f"const float* restrict k{r} = kp + (long)(j0+jr+{r} < jend ? j0+jr+{r} : jend-1)*{ks[2]};" for r in R),
       "   " + " ".join(f"vf s{r}_{v} = (vf)0.f;" for r in R for v in V),
       f"   for (int c = 0; c < {D}; c++) {{",
       "    " + " ".join(f"const vf q{v} = *(const vf*)(qt + c*{BQ} + {v*W});" for v in V),
       *("    { const float x = k%d[c]; %s }" % (r, " ".join(f"s{r}_{v} += x*q{v};" for v in V)) for r in R),
       "   }"]
  if causal:
    L += [f"   if (j0 + jr + {MRS-1} > i0) {{",
          *(f"    {{ const vi iv = lane + (i0 + {v*W}); " + " ".join(f"s{r}_{v} = (vi)(j0+jr+{r}) > iv ? ninf : s{r}_{v};" for r in R) + " }"
            for v in V), "   }"]
  L += [*(f"   *(vf*)(st + (jr+{r})*{BQ} + {v*W}) = s{r}_{v}; bm{v} = s{r}_{v} > bm{v} ? s{r}_{v} : bm{v};" for r in R for v in V),
        "  }",
        *(f"  {{ const vf mn = bm{v} > m{v} ? bm{v} : m{v}; " + _exp2(f"al{v}", f"m{v} - mn") + f" m{v} = mn; }}" for v in V),
        # P = 2^(S - m) in place, one lane group at a time (keeps the polynomial's constants in registers with 16 of them)
        *(f"  {{ vf ls = (vf)0.f; for (int j = 0; j < nk; j++) {{ vf* sp = (vf*)(st + j*{BQ} + {v*W}); vf p; " + _exp2("p", f"*sp - m{v}") +
          f" *sp = p; ls += p; }} l{v} = l{v}*al{v} + ls; }}" for v in V)]
  def pv(e0:str, rows:int) -> list[str]:
    # O^T rows e0..e0+rows: rescale by alpha while loading (fresh zeros on the first block: ot is never zero-filled, so no memset)
    E = range(rows)
    return [f"   const float* restrict vr = vp + (long)j0*{vs[2]} + {e0};",
            "   " + " ".join(f"vf o{r}_{v} = j0 ? *(const vf*)(ot + ({e0}+{r})*{BQ} + {v*W}) * al{v} : (vf)0.f;" for r in E for v in V),
            f"   for (int j = 0; j < nk; j++, vr += {vs[2]}) {{",
            "    " + " ".join(f"const vf p{v} = *(const vf*)(st + j*{BQ} + {v*W});" for v in V),
            *("    { const float x = vr[%d]; %s }" % (r, " ".join(f"o{r}_{v} += x*p{v};" for v in V)) for r in E),
            "   }",
            "   " + " ".join(f"*(vf*)(ot + ({e0}+{r})*{BQ} + {v*W}) = o{r}_{v};" for r in E for v in V)]
  DVM = DV // MRP * MRP
  if DVM: L += [f"  for (int e0 = 0; e0 < {DVM}; e0 += {MRP}) {{", *pv("e0", MRP), "  }"]
  if DV > DVM: L += ["  {", *pv(str(DVM), DV - DVM), "  }"]
  L += [" }",
        " " + " ".join(f"*(vf*)(li + {v*W}) = 1.f / l{v};" for v in V),
        f" for (int i = 0; i < nq; i++) {{ float* restrict orow = op + (long)i*{H*DV}; const float s = li[i];",
        f"  for (int e = 0; e < {DV}; e++) orow[e] = ot[e*{BQ}+i]*s; }}",
        "}"]
  return "\n".join(L)

def _operand(x:Tensor) -> tuple[Tensor, tuple[int, int, int]]:
  # (B, H, L, d) -> a contiguous tensor the kernel reads, and its (batch, head, row) strides. A transpose(1, 2) view of a (B, L, H, d)
  # buffer (the UNet/CLIP case, possibly under a cast) is read in that layout: transposing back and .contiguous() costs no copy there
  B, H, L, d = x.shape
  u = x.uop
  while u.op is tg.Ops.CAST: u = u.src[0]
  if u.op is tg.Ops.PERMUTE and tuple(u.arg) == (0, 2, 1, 3): return x.transpose(1, 2).contiguous(), (L*H*d, d, H*d)
  return x.contiguous(), (H*L*d, L*d, d)

def attention(q:Tensor, k:Tensor, v:Tensor, is_causal:bool=False, isa:str|None=None, threads:int|None=None) -> Tensor:
  """softmax(q k^T / sqrt(d)) v (is_causal: key j <= query i, as Tensor.scaled_dot_product_attention) for fp32 q (B, H, Lq, d),
  k (B, H, Lk, d), v (B, H, Lk, dv), or 3-D (BH, L, .), on the CPU device, as one C kernel. Returns fp32 (B, H, Lq, dv), a transpose(1, 2)
  view of a (B, Lq, H, dv) buffer (so `.transpose(1, 2).reshape(B, Lq, H*dv)` is free). isa/threads default to ISA/THREADS."""
  if (isa:=isa or ISA) not in _CFG: raise RuntimeError(f"no C attention kernel for ISA {isa!r}")
  if threads is None: threads = THREADS
  if threads is None:
    from . import cpu_pool
    threads = cpu_pool.threads() or os.cpu_count() or 1
  if q.ndim == 3: return attention(q[:, None], k[:, None], v[:, None], is_causal, isa, threads)[:, 0]
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4: raise ValueError(f"expected 3-D or 4-D q, k, v, got {q.shape} {k.shape} {v.shape}")
  (B, H, Lq, D), Lk, DV = q.shape, k.shape[-2], v.shape[-1]
  if k.shape != (B, H, Lk, D) or v.shape[:-1] != (B, H, Lk): raise ValueError(f"shape mismatch q {q.shape} k {k.shape} v {v.shape}")
  if any(x.dtype != dtypes.float32 for x in (q, k, v)): raise ValueError("q, k, v must be float32")
  if Lq == 0 or Lk == 0 or D == 0 or DV == 0: raise ValueError("empty attention")
  (qc, qs), (kc, ks), (vc, vs) = _operand(q), _operand(k), _operand(v)
  src = kernel_c(B, H, Lq, Lk, D, DV, qs, ks, vs, is_causal, isa, threads)
  code = tg.c_escape(src)
  for i, n in enumerate(("$O", "$Q", "$K", "$V", "$T")): code = code.replace(n, "{%d}" % i)
  pairs = sum(min(i + 1, Lk) for i in range(Lq)) if is_causal else Lq*Lk   # (query, key) pairs computed
  nqb = -(-Lq // ((c:=blocking(isa, D, DV))["W"]*c["NV"]))
  ops, mem = 2*B*H*pairs*(D + DV), 4*B*H*(Lq*D + nqb*Lk*(D + DV) + Lq*DV)   # K, V are read once per query block
  name = f"flash_attn_{isa}_{B*H}_{Lq}_{Lk}_{D}_{DV}{'_causal' if is_causal else ''}"
  out = Tensor.empty(B, Lq, H, DV, dtype=dtypes.float32, device=q.device)
  # tag=1 marks the SINK as already optimised: tinygrad's apply_opts would otherwise rebuild its KernelInfo without our estimates (the kernel
  # has no ranges, so there is nothing else for it to do) and the GFLOP/s counters would read 0
  fxn = lambda o, a, b, c: tg.c_kernel(code, o, (a, b, c), name, ops=ops, mem=mem, threads=threads).replace(tag=1)
  return tg.custom(out, (qc, kc, vc), fxn).transpose(1, 2)

def impl(q:Tensor, k:Tensor, v:Tensor, attn_mask:Tensor|None, is_causal:bool) -> Tensor|None:
  """The ops/attention.py rewrite contract: attention() for what it handles, None (keep tinygrad's SDPA) otherwise: another device, a
  mask, a non-float dtype, unequal batch/head dims, a CPU without a kernel, or TINYSD_KERNELS=generic. fp16 inputs are computed in fp32
  (like split_attention) and the result is cast back to q's dtype."""
  from .cpu import generic
  if generic() or attn_mask is not None or ISA not in _CFG or cpu_isa() is None: return None
  if any(not isinstance(x.device, str) or x.device.split(":")[0] != "CPU" for x in (q, k, v)) or len({x.device for x in (q, k, v)}) != 1: return None
  if not tg.renders_c(q.device): return None   # DEV=CPU:X86 / CPU:LLVM: no C kernel bodies
  if any(x.dtype not in (dtypes.float32, dtypes.float16) for x in (q, k, v)) or not q.ndim == k.ndim == v.ndim in (3, 4): return None
  if k.shape[:-2] != q.shape[:-2] or v.shape[:-1] != k.shape[:-1] or k.shape[-1] != q.shape[-1] or 0 in q.shape + k.shape + v.shape: return None
  if blocking(ISA, q.shape[-1], v.shape[-1]) is None: return None
  return attention(q.float(), k.float(), v.float(), is_causal).cast(q.dtype)

def install(*tensors:Tensor) -> Tensor|tuple[Tensor, ...]:
  """Rewrites every Tensor.scaled_dot_product_attention in the lazy graphs of tensors to attention() where impl() accepts it."""
  new, _ = tg.rewrite_sdpa(list(tensors), impl)
  return new[0] if len(new) == 1 else tuple(new)

if __name__ == "__main__":
  # python -m tinysd_ops.cpu_attention [BH L d [isa]]: GFLOP/s of this kernel vs split attention on one SD shape (a few seconds)
  import sys, time
  from tinygrad import TinyJit
  from .attention import split_attention
  BH, L, D = (int(a) for a in sys.argv[1:4]) if len(sys.argv) > 3 else (16, 1024, 40)
  if len(sys.argv) > 4: ISA = sys.argv[4]
  n = tg.install_cpu_threads(os.cpu_count() or 1)
  x = [Tensor.randn(1, L, BH, D).realize().transpose(1, 2) for _ in range(3)]   # (1, BH, L, d) views, as in the UNet
  flops = 4*BH*L*L*D
  for name, f in (("flash (C)", lambda a, b, c: attention(a, b, c)), ("split_attention", split_attention)):
    jf = TinyJit(lambda a, b, c, f=f: f(a, b, c).realize())
    for _ in range(3): jf(*x)
    ts = []
    for _ in range(5 if name[0] == "f" else 2):
      st = time.perf_counter(); jf(*x); ts.append(time.perf_counter() - st)
    print(f"{name:16s} BH={BH} L={L} d={D} isa={ISA} threads={n}: {min(ts)*1e3:8.2f} ms  {flops/min(ts)*1e-9:7.1f} GFLOP/s")
