# The queue: jobs run FIFO, one at a time per engine (a pipeline in this process, or a worker process with its own). Each job has its own
# progress; interrupt stops it at the next sampler step with what it has (A1111's semantics), a client that went away drops it there.
from __future__ import annotations
import collections, concurrent.futures, sys, threading, time, traceback, uuid
from tinysd.server.render import Spec, Result

HISTORY = 64   # finished jobs whose state /progress?id_task= can still report (their images are not kept)

class Cancelled(Exception):
  """The job was dropped (its client disconnected) before it finished."""

class JobFailed(RuntimeError):
  def __init__(self, msg:str, bad_input:bool): super().__init__(msg); self.bad_input = bad_input

def one_line(e:BaseException) -> str:
  msg = str(e).strip().splitlines()
  return msg[0] if msg else type(e).__name__

class Job:
  def __init__(self, spec:Spec, id:str|None=None):
    self.id, self.spec = id or uuid.uuid4().hex[:16], spec
    self.state = "queued"          # queued, running, done, interrupted, cancelled, error
    self.step, self.total, self.preview, self.error = 0, 0, None, None
    self.t_queued, self.t_start, self.t_end = time.time(), None, None
    self.stop: str | None = None   # "interrupt" | "abort", read by the engine between steps
    self.engine: int | None = None   # index of the engine (worker) that ran it
    self.future: concurrent.futures.Future = concurrent.futures.Future()

  def update(self, step:int, total:int, preview:str|None):
    self.step, self.total = step, total
    if preview is not None: self.preview = preview

  def report(self, step:int, total:int, preview:str|None):   # the sampler callback of an in-process engine
    self.update(step, total, preview)
    if self.stop == "abort": raise Cancelled()
    if self.stop == "interrupt": return False

  @property
  def finished(self) -> bool: return self.state in ("done", "interrupted", "cancelled", "error")

class Scheduler:
  """FIFO queue over engines (tinysd/server/engines.py): each engine's runner thread takes the oldest queued job when it is free."""
  def __init__(self, engines:list):
    self.engines, self._queue, self._cv = engines, collections.deque(), threading.Condition()
    self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
    self._closed = False
    self._threads = [threading.Thread(target=self._loop, args=(i, e), name=f"tinysd-runner-{i}", daemon=True) for i, e in enumerate(engines)]
    for t in self._threads: t.start()

  def submit(self, spec:Spec, id:str|None=None) -> Job:
    with self._cv:
      if id is not None and id in self._jobs and not self._jobs[id].finished: raise JobFailed(f"task id '{id}' is already in use", True)
      job = Job(spec, id)
      self._jobs.pop(job.id, None)
      self._jobs[job.id] = job
      self._queue.append(job)
      self._cv.notify()
    return job

  def _loop(self, index:int, engine):
    engine.start()
    while True:
      with self._cv:
        while not self._queue and not self._closed: self._cv.wait()
        if self._closed: return
        job = self._queue.popleft()
        job.state, job.t_start, job.engine = "running", time.time(), index
      try:
        res = engine.run(job)
        job.state = "interrupted" if res.interrupted else "done"
        job.future.set_result(res)
      except Cancelled as e:
        job.state = "cancelled"
        job.future.set_exception(e)
      except Exception as e:
        job.state, job.error = "error", one_line(e)
        if not isinstance(e, (ValueError, JobFailed)): traceback.print_exc(file=sys.stderr)
        job.future.set_exception(e if isinstance(e, JobFailed) else JobFailed(job.error, isinstance(e, ValueError)))
      finally:
        job.t_end, job.spec = time.time(), None   # the init image and mask are not kept
        self._forget()

  def _forget(self):
    with self._cv:
      done = [k for k, j in self._jobs.items() if j.finished]
      for k in done[:max(0, len(done) - HISTORY)]: del self._jobs[k]

  def get(self, id:str) -> Job|None:
    with self._cv: return self._jobs.get(id)

  def active(self) -> tuple[list[Job], list[Job]]:
    """(running, queued) in FIFO order."""
    with self._cv: return [j for j in self._jobs.values() if j.state == "running"], list(self._queue)

  def cancel(self, job:Job, mode:str="abort"):
    """mode "interrupt": stop at the next step and return what there is; "abort": drop it (its client went away)."""
    with self._cv:
      if job.state == "queued":
        self._queue.remove(job)
        job.state, job.t_end, job.spec = ("interrupted" if mode == "interrupt" else "cancelled"), time.time(), None
        if mode == "interrupt": job.future.set_result(Result([], [], [], interrupted=True))
        else: job.future.set_exception(Cancelled())
      elif not job.finished: job.stop = mode

  def interrupt(self, id:str|None=None) -> int:
    """Interrupt one job (running or queued) by id, or every running one (A1111's /interrupt); returns how many."""
    with self._cv:
      jobs = [self._jobs[id]] if id is not None and id in self._jobs else [] if id is not None else \
             [j for j in self._jobs.values() if j.state == "running"]
    for j in jobs: self.cancel(j, "interrupt")
    return len(jobs)

  def close(self):
    with self._cv:
      self._closed = True
      self._cv.notify_all()
    for e in self.engines: e.close()
