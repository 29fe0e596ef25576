# A worker per CPU core for tinygrad's CPU device. tinygrad 0.14 queues a kernel split by `core_id` as one launch per core id on the
# device's single worker thread, so every kernel runs on one core. The launcher below is an ordinary C function that the device worker
# calls in place of the kernel (ops/tg.py rewrites the queue entry): it hands core ids 1..n-1 to a persistent pool of pthreads, runs id 0
# itself and returns when all are done, so the worker thread and the queue's ordering are unchanged.
# The pool is a real shared library (pthreads, futex), built once with the same clang tinygrad uses and cached by source hash.
from __future__ import annotations
import ctypes, hashlib, os, subprocess, sys, tempfile

NARGS = 60   # kernel arguments the launcher forwards: a queue entry holds 63 words after the function, 3 of them are the launcher's own

_SRC = r"""
#include <pthread.h>
#include <stdint.h>
#include <stdatomic.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <linux/futex.h>
#include <limits.h>
typedef uint64_t u64;
#define NA %(NARGS)d
#define MAXT 256
typedef void (*kfn)(%(PROTO)s);
static struct { void *fn; u64 args[NA]; int slot, n; } job;
static _Atomic uint32_t gen;            /* bumped per job; helpers sleep on it with futex */
static _Atomic int remaining;
static int nthreads, spin;
static void run(int tid, int step) {   /* core ids tid, tid+step, ...: a kernel may ask for more ids than there are threads */
  u64 a[NA];
  for (int i = 0; i < NA; i++) a[i] = job.args[i];
  for (int t = tid; t < job.n; t += step) { a[job.slot] = (u64)t; ((kfn)job.fn)(%(CALL)s); }
}
static void *helper(void *p) {
  int id = (int)(intptr_t)p;
  uint32_t seen = atomic_load(&gen);
  for (;;) {
    uint32_t g;
    for (int i = 0; (g = atomic_load_explicit(&gen, memory_order_acquire)) == seen; i++) {
      if (i < spin) __builtin_ia32_pause();
      else { syscall(SYS_futex, &gen, FUTEX_WAIT_PRIVATE, seen, 0, 0, 0); i = 0; }
    }
    seen = g;
    if (id < job.n) run(id, job.n < nthreads ? job.n : nthreads);
    atomic_fetch_sub_explicit(&remaining, 1, memory_order_release);   /* every helper answers every job: gen never moves twice unseen */
  }
  return 0;
}
/* called by tinygrad's device worker as fn(word1, ..., word63): the kernel, the number of core ids, the core_id argument's slot, args */
void tinysd_parallel_launch(u64 fn, u64 n, u64 slot, %(PROTO_ARGS)s) {
  u64 a[NA] = {%(ARGLIST)s};
  int used = (int)n < nthreads ? (int)n : nthreads;
  job.fn = (void *)fn; job.slot = (int)slot; job.n = (int)n;
  for (int i = 0; i < NA; i++) job.args[i] = a[i];
  atomic_store_explicit(&remaining, nthreads - 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&gen, 1, memory_order_release);
  syscall(SYS_futex, &gen, FUTEX_WAKE_PRIVATE, INT_MAX, 0, 0, 0);
  run(0, used);
  while (atomic_load_explicit(&remaining, memory_order_acquire) > 0) __builtin_ia32_pause();
}
int tinysd_pool_start(int n, int spin_iters) {
  pthread_attr_t at; pthread_attr_init(&at); pthread_attr_setstacksize(&at, 16 << 20);
  spin = spin_iters;
  if (n > MAXT) n = MAXT;
  for (int i = 1; i < n; i++) { pthread_t t; if (pthread_create(&t, &at, helper, (void *)(intptr_t)i)) return i; pthread_detach(t); }
  nthreads = n;
  return n;
}
"""

def source() -> str:
  u = ", ".join(["u64"] * NARGS)
  return _SRC % dict(NARGS=NARGS, PROTO=u, CALL=", ".join(f"a[{i}]" for i in range(NARGS)),
                     PROTO_ARGS=", ".join(f"u64 a{i}" for i in range(NARGS)), ARGLIST=", ".join(f"a{i}" for i in range(NARGS)))

def _cache_dir() -> str:
  d = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tinysd")
  os.makedirs(d, exist_ok=True)
  return d

_lib = None
_threads = 0

def start(nthreads:int, spin_iters:int=20000) -> int:
  """Builds (once, cached) and starts the pool; returns the launcher's address. Idempotent: a second call keeps the first pool."""
  global _lib, _threads
  if _lib is not None: return ctypes.cast(_lib.tinysd_parallel_launch, ctypes.c_void_p).value
  if not sys.platform.startswith("linux") or os.uname().machine not in ("x86_64", "AMD64"): raise OSError("the CPU pool is built for x86-64 Linux")
  src = source()
  path = os.path.join(_cache_dir(), f"pool-{hashlib.sha256(src.encode()).hexdigest()[:16]}.so")
  if not os.path.exists(path):
    with tempfile.NamedTemporaryFile("w", suffix=".c", delete=False) as f: f.write(src)
    tmp = path + f".{os.getpid()}.tmp"
    try: subprocess.check_call([os.environ.get("CC", "clang"), "-O2", "-shared", "-fPIC", "-pthread", f.name, "-o", tmp])
    finally: os.unlink(f.name)
    os.replace(tmp, path)   # atomic: a concurrent process sees the whole library or none
  _lib = ctypes.CDLL(path)
  _lib.tinysd_pool_start.argtypes, _lib.tinysd_pool_start.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  _threads = _lib.tinysd_pool_start(nthreads, spin_iters)
  return ctypes.cast(_lib.tinysd_parallel_launch, ctypes.c_void_p).value

def threads() -> int: return _threads
