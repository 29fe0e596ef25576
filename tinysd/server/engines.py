# Where jobs run: a pipeline in this process (LocalEngine) or in a worker process of its own (ProcessEngine, for `--workers N`). Both
# load the first model when started, switch models when a job asks for another, and stop a job between sampler steps when told to.
from __future__ import annotations
import multiprocessing as mp, threading, traceback
from dataclasses import dataclass
from tinysd.server.jobs import Job, Cancelled, JobFailed, one_line
from tinysd.server.render import Result, generate

@dataclass(frozen=True)
class Loader:
  """How `tinysd serve` loads a checkpoint (picklable: worker processes get it)."""
  dtype: str = "float32"
  compute_dtype: str | None = None
  lowmem: bool = False
  quant: str | None = None
  attention_chunk: int = 1024

  def __call__(self, path:str):
    import tinysd
    pipe = tinysd.load(path, dtype=self.dtype, lowmem=self.lowmem, quant=self.quant, compute_dtype=self.compute_dtype)
    pipe.attention_chunk = self.attention_chunk or None
    return pipe

class LocalEngine:
  """A pipeline in this process, loaded and run by its runner thread only (tinygrad is not thread-safe)."""
  def __init__(self, loader, model:str):
    self.loader, self.model, self.pipe, self.path = loader, model, None, None
    self._ready, self._error = threading.Event(), None

  def start(self):   # in the runner thread, before its first job
    from tinysd_ops.tg import shareable_diskcache
    try:
      shareable_diskcache()
      self.ensure(self.model)
    except Exception as e: self._error = e
    finally: self._ready.set()

  def wait_ready(self):
    self._ready.wait()
    if self._error is not None: raise self._error

  def ensure(self, path:str):
    if self.path == path: return
    self.pipe = self.path = None   # the old model goes before the new one comes in: never two in memory
    self.pipe, self.path = self.loader(path), path

  def run(self, job:Job) -> Result:
    self.ensure(job.spec.model)
    return generate(self.pipe, job.spec, job.report)

  def close(self): self.pipe = None

def _worker_main(conn, flag, loader, model:str):
  # a worker process: loads its own pipeline, then runs Specs sent to it; flag 1 = interrupt, 2 = drop, checked at every step
  engine = LocalEngine(loader, model)
  try: engine.start(); engine.wait_ready()
  except Exception as e:
    conn.send(("error", one_line(e), isinstance(e, ValueError)))
    return
  conn.send(("ready",))
  while True:
    try: spec = conn.recv()
    except (EOFError, OSError): return
    def report(step, total, preview):
      conn.send(("step", step, total, preview))
      if flag.value == 2: raise Cancelled()
      if flag.value == 1: return False
    try:
      engine.ensure(spec.model)
      conn.send(("done", generate(engine.pipe, spec, report)))
    except Cancelled: conn.send(("cancelled",))
    except Exception as e:
      if not isinstance(e, ValueError): traceback.print_exc()
      conn.send(("error", one_line(e), isinstance(e, ValueError)))

class ProcessEngine:
  """A worker process with its own pipeline (spawned: a forked tinygrad would inherit threads and device state)."""
  def __init__(self, loader, model:str, name:str="worker"):
    self.loader, self.model, self.name = loader, model, name
    self._start()

  def start(self): pass   # the process was started by __init__

  def _start(self):   # spawns without waiting: several workers load their models at the same time
    ctx = mp.get_context("spawn")
    self.conn, child = ctx.Pipe()
    self.flag = ctx.Value("i", 0)
    self.proc = ctx.Process(target=_worker_main, args=(child, self.flag, self.loader, self.model), name=self.name, daemon=True)
    self.proc.start()
    child.close()
    self.ready = False

  def wait_ready(self):
    if self.ready: return
    msg = self._recv()
    if msg[0] != "ready":   # a bad checkpoint is the user's input (one line, exit 2 from the CLI); anything else a failure
      raise (ValueError(msg[1]) if msg[2] else JobFailed(f"{self.name} could not load the model: {msg[1]}", False))
    self.ready = True

  def _recv(self):
    while not self.conn.poll(0.05):
      if not self.proc.is_alive(): raise JobFailed(f"worker process {self.proc.pid} exited (code {self.proc.exitcode})", False)
    return self.conn.recv()

  def run(self, job:Job) -> Result:
    if not self.proc.is_alive(): self._start()   # a worker that crashed (or was killed) is replaced for the next job
    self.wait_ready()
    self.model = job.spec.model
    self.flag.value = 0
    self.conn.send(job.spec)
    while True:
      if job.stop: self.flag.value = 2 if job.stop == "abort" else 1   # on every message too: a busy worker sends one per step
      if not self.conn.poll(0.05):
        if not self.proc.is_alive(): raise JobFailed(f"worker process {self.proc.pid} exited (code {self.proc.exitcode})", False)
        continue
      kind, *rest = self.conn.recv()
      if kind == "step": job.update(*rest)
      elif kind == "done": return rest[0]
      elif kind == "cancelled": raise Cancelled()
      else: raise JobFailed(rest[0], rest[1])

  def close(self):
    self.conn.close()
    self.proc.join(5)
    if self.proc.is_alive(): self.proc.terminate()
