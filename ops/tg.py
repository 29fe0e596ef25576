# The one adapter over tinygrad internals (UOp, Ops, PatternMatcher, graph_rewrite, @function): a tinygrad upgrade touches only this file.
# Everything here is read from / tested against tinygrad==0.14.0.
from __future__ import annotations
from typing import Callable
from contextlib import contextmanager
from tinygrad import Tensor, Device, TinyJit, GlobalCounters, function
from tinygrad.uop.ops import UOp, Ops, UPat, PatternMatcher, graph_rewrite

def _in_body(u:UOp) -> bool: return any(x.op is Ops.PARAM and x.arg.slot >= 0 for x in u.toposort(enter_calls=False))   # -1: Variables

def region(fxn:Callable[..., Tensor], *args, **kwargs) -> Tensor:
  # Runs fxn as one tinygrad FUNCTION (inlined again by the scheduler). Why it matters: a top-level .contiguous() becomes a Tensor-visible
  # buffer held for the whole schedule, while one inside a FUNCTION body is a scheduler-internal buffer that the memory planner packs into
  # the arena by lifetime. Tensors among args/kwargs become the explicit inputs; fxn must not close over realized buffers.
  # Inside another FUNCTION's body (inputs built on PARAMs) fxn runs inline: that body already is a region, and a nested FUNCTION's PARAMs
  # would hash-cons with the outer ones of the same slot and shape and get substituted wrongly.
  if any(isinstance(a, Tensor) and _in_body(a.uop) for a in (*args, *kwargs.values())): return fxn(*args, **kwargs)
  return function(fxn)(*args, **kwargs)

# *** recognising Tensor.scaled_dot_product_attention in a lazy graph ***

def _strip_cast(u:UOp) -> UOp: return u.src[0] if u.op is Ops.CAST else u

def _dot(u:UOp) -> tuple[UOp, UOp]|None:
  # a @ b lowers to REDUCE(ADD)(PERMUTE(last axis first)([CAST] MUL(a', b'))), a' = a.reshape(..., M, 1, K), b' = (b^T).reshape(..., 1, N, K)
  if u.op is not Ops.REDUCE or u.arg[0] is not Ops.ADD or u.src[0].op is not Ops.PERMUTE: return None
  if (m:=_strip_cast(u.src[0].src[0])).op is not Ops.MUL or len(m.shape) < 3: return None
  a, b = m.src
  if a.shape[-2] != 1 or b.shape[-3] != 1: a, b = b, a
  return (a, b) if a.shape[-2] == 1 and b.shape[-3] == 1 else None

def _sdpa_operands(u:UOp) -> tuple[UOp, UOp, UOp, UOp|None]|None:
  # peels out = softmax(q @ k^T / sqrt(d) [+ mask]) @ v as lowered by tinygrad 0.14 (mixin/rand.py, mixin/op.py _softmax, dot).
  # Only candidates: the caller checks that rebuilding SDPA from them gives back exactly u (UOps are hash-consed).
  if (d:=_dot(_strip_cast(u))) is None: return None
  p, vt = d
  if p.op is not Ops.RESHAPE or vt.op is not Ops.PERMUTE or vt.src[0].op is not Ops.RESHAPE: return None
  v, p = vt.src[0].src[0], p.src[0]
  if p.op is not Ops.MUL: return None
  e = next((_strip_cast(s) for s in p.src if _strip_cast(s).op is Ops.EXP2), None)   # softmax = e * 1/sum(e)
  if e is None or (z:=_strip_cast(e.src[0])).op is not Ops.MUL: return None
  x = next((_strip_cast(s) for s in z.src if _strip_cast(s).op is Ops.ADD), None)    # exp2((x - max(x)) * log2(e))
  if x is None: return None
  logits = _strip_cast(x.src[0])
  mask = None
  if logits.op is Ops.ADD:                                                           # qk + mask
    if (logits.src[0].op is Ops.MUL) == (logits.src[1].op is Ops.MUL): return None
    logits, mask = logits.src if logits.src[0].op is Ops.MUL else logits.src[::-1]
  if logits.op is not Ops.MUL: return None
  if (qk:=next((d for s in logits.src if (d:=_dot(s)) is not None), None)) is None: return None   # qk * (1/sqrt(d))
  qr, kt = qk
  if qr.op is not Ops.RESHAPE or kt.op is not Ops.PERMUTE or kt.src[0].op is not Ops.RESHAPE or kt.src[0].src[0].op is not Ops.PERMUTE: return None
  return qr.src[0], kt.src[0].src[0].src[0], v, mask

def match_sdpa(u:UOp) -> dict|None:
  """If u is exactly `q.scaled_dot_product_attention(k, v, attn_mask=..., is_causal=...)`, its arguments as Tensors (attn_mask additive)."""
  if u.op not in {Ops.REDUCE, Ops.CAST} or (ops:=_sdpa_operands(u)) is None: return None
  q, k, v, m = (Tensor(x) if x is not None else None for x in ops)
  tries = [dict(is_causal=True), dict(attn_mask=m)] if m is not None else [{}]
  for kw in tries:
    try:
      if q.scaled_dot_product_attention(k, v, **kw).uop is u: return dict(q=q, k=k, v=v, attn_mask=None, is_causal=False) | kw
    except (RuntimeError, ValueError, AssertionError): pass
  return None

def _swap_sdpa(ctx:dict, u:UOp) -> UOp|None:
  if (args:=match_sdpa(u)) is None or (new:=ctx["impl"](**args)) is None: return None
  ctx["count"] += 1
  return (new if new.dtype == u.dtype else new.cast(u.dtype)).uop

pm_swap_sdpa = PatternMatcher([(UPat((Ops.REDUCE, Ops.CAST), name="u"), _swap_sdpa)])

def rewrite_sdpa(tensors:list[Tensor], impl:Callable[..., Tensor|None]) -> tuple[list[Tensor], int]:
  """Replaces every SDPA in the lazy graphs of tensors (@function bodies included) by impl(q=, k=, v=, attn_mask=, is_causal=) (None keeps
  it). Returns (new tensors, count).
  The given Tensors are not changed; other Tensors sharing the graph keep the original nodes."""
  ctx = {"impl": impl, "count": 0}
  sink = graph_rewrite(UOp.sink(*[t.uop for t in tensors]), pm_swap_sdpa, ctx=ctx, enter_calls=True, name="split attention")
  return [t if s is t.uop else Tensor(s) for t, s in zip(tensors, sink.src)], ctx["count"]

# *** memory-mapped checkpoints ***

def drop_file_pages():
  """Lets the kernel unmap every checkpoint page tinygrad's DISK devices have touched. tinygrad reads a safetensors file through one
  mmap of the whole file, and each page read stays mapped, counting in this process's RSS as long as any lazy tensor keeps the file open
  (lowmem keeps them all open): a model copied into device buffers would then be counted twice. MADV_DONTNEED on a file mapping loses
  nothing (the pages stay in the page cache; a later read maps them again)."""
  import mmap
  from tinygrad.device import Device
  for name in [d for d in Device._opened_devices if d.startswith("DISK")]:
    if (mem := getattr(Device[name], "mem", None)) is not None and hasattr(mmap, "MADV_DONTNEED"):
      try: mem.madvise(mmap.MADV_DONTNEED)
      except (OSError, ValueError): pass   # closed meanwhile, or a platform without madvise on this mapping

def lazy_graph(t:Tensor) -> UOp: return t.uop   # what a lazy tensor (e.g. a weight's file read) will compute, to be put back later
def restore_lazy(t:Tensor, graph:UOp) -> None: t.replace(Tensor(graph))   # t computes that graph again; its realised buffer is dropped

def free_cached_memory(device:str) -> None:
  """tinygrad's LRU allocators keep freed blocks for reuse (device.py LRUAllocator.free_cache): hand them back to the system."""
  if hasattr(alloc := Device[device].allocator, "free_cache"): alloc.free_cache()

def allocate(t:Tensor) -> Tensor:
  """t realised with its buffer allocated (on the NULL device realize allocates nothing until a kernel writes it): for memory accounting."""
  t.realize().uop.buffer.ensure_allocated()
  return t

# *** construction: the layers' random init replaced by placeholders ***

@contextmanager
def placeholder_init():
  """Yields a list that collects every weight tinygrad's layers create while inside, each an empty placeholder instead of a random-init
  graph (~40 ms of Python per weight, hundreds per UNet, all thrown away by loading): fill them (load_state_dict, random_init) or
  replace them before use. tinygrad.nn's layers draw their init from Tensor.uniform / Tensor.glorot_uniform (nn/__init__.py, 0.14)."""
  made, orig = [], {n: Tensor.__dict__.get(n) for n in ("uniform", "glorot_uniform")}
  def empty(*shape, **kw):
    made.append(t := Tensor.empty(*(shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape), dtype=kw.get("dtype"),
                                  device=kw.get("device")))
    return t
  Tensor.uniform = Tensor.glorot_uniform = staticmethod(empty)
  try: yield made
  finally:
    for n, f in orig.items():
      if f is None: delattr(Tensor, n)   # the originals live on a mixin base class
      else: setattr(Tensor, n, f)

def random_init(model, rng, dtype=None) -> None:
  """Every parameter of model (a tinygrad.nn layer tree) in place from the numpy Generator rng, stored in dtype (default: its own), for
  benchmarks, demo models and tests: matrices N(0, 1/fan_in), so activations stay O(1) through the depth; norm weights U(0.8, 1.2) and
  biases U(-0.2, 0.2), so a swapped or dropped one shows. Realised ~256 MB at a time: bounded numpy staging, no second copy."""
  from tinygrad.nn.state import get_state_dict
  batch, nbytes = [], 0
  for name, p in get_state_dict(model).items():
    if len(p.shape) > 1: v = rng.standard_normal(p.shape, dtype="float32") * (1 / max(1, p.numel() // p.shape[0])) ** 0.5
    elif name.endswith("weight"): v = rng.uniform(0.8, 1.2, p.shape).astype("float32")
    else: v = rng.uniform(-0.2, 0.2, p.shape).astype("float32")
    p.replace(Tensor(v, device=p.device).cast(dtype or p.dtype))
    batch.append(p); nbytes += p.nbytes()
    if nbytes > 1 << 28: Tensor.realize(*batch); batch, nbytes = [], 0
  Tensor.realize(*batch)

# *** peak memory: tinygrad keeps only the current figure, so every allocation is watched ***

_watching: list[PeakMemory] = []
_orig_allocate: list = []

def _allocate(buf, *args, **kwargs):
  r = _orig_allocate[0](buf, *args, **kwargs)
  for m in _watching: m.top = max(m.top, GlobalCounters.mem_used)
  return r

class PeakMemory:
  """`with PeakMemory() as m: ...` -> m.peak: the high-water mark of tinygrad's allocated bytes (GlobalCounters.mem_used, every non-DISK
  device) while inside, above the figure on entry (or at the last reset); m.top is the absolute mark. Deterministic, unlike RSS. Patches
  Buffer.allocate (device.py, 0.14) while any tracker is open; trackers nest; not thread safe."""
  def __init__(self): self.base = self.top = GlobalCounters.mem_used
  @property
  def peak(self) -> int: return self.top - self.base
  def reset(self) -> int:
    """The absolute mark so far; a new window starts at the current figure."""
    top, self.base = self.top, GlobalCounters.mem_used
    self.top = self.base
    return top
  def __enter__(self) -> PeakMemory:
    from tinygrad.device import Buffer
    if not _watching: _orig_allocate.append(Buffer.allocate); Buffer.allocate = _allocate
    self.base = self.top = GlobalCounters.mem_used
    _watching.append(self)
    return self
  def __exit__(self, *exc):
    from tinygrad.device import Buffer
    _watching.remove(self)
    if not _watching: Buffer.allocate = _orig_allocate.pop()

# *** hand-written C kernels on the CPU device ***

def _param(u:UOp) -> UOp:
  while u.op is not Ops.PARAM: u = u.src[0]   # custom_kernel hands RESHAPE(PARAM); the C code needs the PARAM itself
  return u

def c_escape(code:str) -> str: return code.replace("{", "{{").replace("}", "}}")   # the CUSTOM arg goes through str.format

def c_named(code:str, names:list[str]) -> str:
  """code escaped for c_kernel, its @NAME@ markers turned into the positional {i} of names[i] (output, inputs, then the core id)."""
  code = c_escape(code)
  for i, n in enumerate(names): code = code.replace(f"@{n}@", "{%d}" % i)
  return code

def c_kernel(code:str, out:UOp, ins:tuple[UOp, ...], name:str, ops:int=0, mem:int=0, threads:int=1) -> UOp:
  """SINK of a kernel whose body is the C text `code` (already brace-escaped, with {0} = out pointer, {1}.. = inputs and, when threads > 1,
  {n+1} = the int core_id in [0, threads)). An `out[0] = out[0]` store (hidden in a CUSTOMI so symbolic keeps it) comes first: without a
  STORE/LOAD the program records no outputs/inputs and a consumer would not wait for it."""
  from tinygrad import dtypes
  from tinygrad.uop.ops import KernelInfo
  from tinygrad.renderer import Estimates
  out, ins = _param(out), tuple(_param(x) for x in ins)
  i0 = UOp.const(0, dtypes.int)
  mark = out.index(i0).store(UOp(Ops.CUSTOMI, out.dtype, src=(out.index(i0).load(),) + tuple(p.index(i0).load() for p in ins), arg="{0}"))
  extra = (UOp.variable("core_id", 0, threads - 1, dtypes.int, param=True),) if threads > 1 else ()
  body = UOp(Ops.CUSTOM, dtypes.void, src=(out,) + ins + extra + (mark,), arg=code)
  # tag=1: an untagged SINK goes through apply_opts, which rebuilds the KernelInfo and drops the estimates (GFLOP/s would read 0)
  return UOp.sink(body, arg=KernelInfo(name=name, estimates=Estimates(ops=ops, lds=mem, mem=mem)), tag=1)

def custom(out:Tensor, ins:tuple[Tensor, ...], fxn:Callable[..., UOp]) -> Tensor:
  """Runs fxn(out_placeholder, *in_placeholders) -> SINK as one kernel writing out; returns out after it."""
  return Tensor.custom_kernel(out, *ins, fxn=fxn)[0]

# *** all cores for every CPU kernel ***

_pool: list = []   # [launcher as a ctypes function]

def _parallel_call(self, *bufs, global_size=(1, 1, 1), local_size=(1, 1, 1), vals=(), wait=False, timeout=None):
  # tinygrad's CPUProgram.__call__ runs the core ids of a kernel one after the other on the calling thread; this hands them to the pool
  import time
  from .cpu_pool import NARGS
  args = [int(b.va_addr) for b in bufs] + [0 if v is None else int(v) for v in vals]
  if self.lvp or 'core_id' not in self.runtimevars or global_size[0] <= 1 or len(args) > NARGS:
    return _orig_call[0](self, *bufs, global_size=global_size, local_size=local_size, vals=vals, wait=wait, timeout=timeout)
  st = time.perf_counter()
  _pool[0](self.addr, global_size[0], self.runtimevars['core_id'], *args, *([0] * (NARGS - len(args))))
  return time.perf_counter() - st if wait else None

_orig_call: list = []

def install_cpu_threads(nthreads:int) -> int:
  """Every CPU kernel split by core_id (tinygrad's THREAD opt, and our C kernels) runs its core ids in parallel on a pool of nthreads
  threads instead of one after the other. Patches tinygrad's CPUProgram.__call__ (runtime/ops_cpu.py); idempotent. Returns the pool size."""
  import ctypes
  from tinygrad.runtime import ops_cpu
  from . import cpu_pool
  if not _pool:
    addr = cpu_pool.start(nthreads)
    _pool.append(ctypes.CFUNCTYPE(None, *([ctypes.c_uint64] * (3 + cpu_pool.NARGS)))(addr))
    _orig_call.append(ops_cpu.CPUProgram.__call__)
    ops_cpu.CPUProgram.__call__ = _parallel_call
  return cpu_pool.threads()

def stored_form(t:Tensor) -> Tensor:
  """t itself, or, when t is a lazy widening cast of a half/bf16 buffer (how tinysd presents fp16-stored weights to fp32 models), the
  narrow tensor: a kernel that converts while it reads then needs no widened copy."""
  from tinygrad import dtypes
  u = t.uop
  if u.op is Ops.CAST and u.src[0].dtype in (dtypes.half, dtypes.bfloat16) and t.dtype == dtypes.float32: return Tensor(u.src[0])
  return t

# *** per-kernel timing (tinysd bench --profile) ***

@contextmanager
def kernel_timer():
  """Yields a list that collects (name, seconds, ops, bytes, kernels) for each CALL tinygrad runs and counts (GlobalCounters) inside.
  tinygrad 0.14 engine/realize.py: run_linear -- a TinyJit replay's too -- makes an ExecContext and
  calls the module global track_stats(ctx, call, st, ets) after each CALL, ets being what the runtime returned: seconds per kernel when
  ctx.wait, else None. We swap in an ExecContext with wait=True, so the runtime times each kernel itself (CPUProgram.__call__, or whatever
  replaced it, e.g. ops/tg.py's thread pool, which returns its own elapsed time), and wrap track_stats to record. A call that comes back
  untimed (copies) is timed as tinygrad's DEBUG=2 path does: synchronize, now - st (st: taken just before its launch)."""
  from tinygrad.engine import realize
  from tinygrad.helpers import ansistrip, perf_counter_us
  from tinygrad.uop.ops import Ops, sym_infer
  rec: list[tuple[str, float, int, int, int]] = []
  orig_track, orig_ctx = realize.track_stats, realize.ExecContext
  class WaitingContext(orig_ctx):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      self.wait = True
  def track(ctx, call, st, ets):
    if ctx.update_stats and (kernels:=realize.get_call_kernels(call)):
      if not ets or any(et is None for et in ets):
        for d in {d for d, _ in kernels}: Device[d].synchronize()
        t = float(perf_counter_us() - st) * 1e-6
      else: t = sum(ets)
      ast, est, n = call.src[0], realize.estimate_uop(call), len(kernels)
      name = ansistrip(ast.arg.name) if ast.op is Ops.PROGRAM else "copy" if ast.op is Ops.COPY else \
             f"batched {len(ast.src[0].src)}" if ast.arg == "graph" else str(ast.arg)
      rec.append((name, t, n * int(sym_infer(est.ops, ctx.var_vals)), n * int(sym_infer(est.mem, ctx.var_vals)), n))
    return orig_track(ctx, call, st, ets)
  realize.track_stats, realize.ExecContext = track, WaitingContext
  try: yield rec
  finally: realize.track_stats, realize.ExecContext = orig_track, orig_ctx

# *** TinyJit: capture on the first call ***

def capture_jit(fxn:Callable) -> TinyJit:
  """A TinyJit that captures on its first call instead of running it eagerly first. Why: the memory planner packs a schedule's internal
  buffers only; our custom kernels' operands and outputs are Tensor-visible buffers, which an eager realize keeps alive for the whole
  schedule (a 512-px VAE decode then held GBs), while a captured JIT plans every buffer no live Tensor holds. The eager first call exists
  for lazily built state (weights): callers must realise that before. Reads TinyJit's call counter (engine/jit.py, 0.14)."""
  from tinygrad import TinyJit
  j = TinyJit(fxn)
  j.cnt = 1
  return j

def free_jit_memory(j) -> None:
  """Drops a captured JIT's planned activation arena (it is allocated again on the next call); the compiled graph stays."""
  if (c := getattr(j, "captured", None)) is not None: c.free_intermediates()

def renders_c(device:str) -> bool:
  """True where the device's kernels are C compiled by clang (CPU with the CLANG renderer): only there can a kernel body be our C text.
  DEV=CPU:X86 / CPU:LLVM keep the device name CPU with another renderer."""
  from tinygrad.renderer.cstyle import ClangRenderer
  try: return isinstance(Device[device].renderer, ClangRenderer)
  except Exception: return False

def shareable_diskcache():
  """tinygrad opens its compile cache (sqlite) once per process, in whichever thread compiles first, and sqlite refuses that connection in
  any other thread. A server compiles in its own worker thread: reopen the connection so every thread may use it (one at a time)."""
  import os, sqlite3
  from tinygrad import helpers
  if os.path.dirname(helpers.CACHEDB): os.makedirs(os.path.dirname(helpers.CACHEDB), exist_ok=True)
  conn = sqlite3.connect(helpers.CACHEDB, timeout=60, isolation_level="IMMEDIATE", check_same_thread=False)
  conn.execute("PRAGMA synchronous=NORMAL")
  helpers._db_connection = conn
