# `tinysd serve`: its arguments (importable without the server extra, so `tinysd --help` works without fastapi) and its main.
from __future__ import annotations
import argparse, os, sys

def add_arguments(p:argparse.ArgumentParser):
  from tinysd.frontend import DEFAULT_MODEL
  p.add_argument("--model", action="append", default=None,
                 help="checkpoint (.safetensors, diffusers folder or Hub id); repeat it to offer several (the first is loaded; "
                      f"/sdapi/v1/options switches); default: $TINYSD_MODEL or {DEFAULT_MODEL}")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=7860)
  p.add_argument("--listen", action="store_true", help="bind 0.0.0.0 (every interface) instead of --host; use with --api-auth")
  p.add_argument("--api-auth", default=None, metavar="USER:PASSWORD[,USER:PASSWORD...]", help="HTTP basic auth on every route, the page included")
  p.add_argument("--workers", type=int, default=1, help="N > 1: N worker processes, each with its own copy of the model, behind one queue")
  p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weights in memory")
  p.add_argument("--compute-dtype", default=None, choices=["float32", "float16", "bfloat16"])
  p.add_argument("--lowmem", action="store_true", help="bring each model in from the checkpoint just for its use (less memory, slower)")
  p.add_argument("--quant", default=None, choices=["int8", "pal8", "pal6", "pal4"])
  p.add_argument("--attention-chunk", type=int, default=1024, help="split attention tiles; 0 = plain attention")

def parse_auth(text:str) -> list[tuple[str, str]]:
  from tinysd.frontend import UsageError
  pairs = []
  for item in text.split(","):
    user, sep, pw = item.partition(":")
    if not sep or not user or not pw: raise UsageError("--api-auth takes user:password pairs separated by commas")
    pairs.append((user, pw))
  return pairs

def main(a) -> int:
  from tinysd.frontend import UsageError, resolve_model, DEFAULT_MODEL
  if not 1 <= a.workers <= 64: raise UsageError(f"--workers must be in 1..64, got {a.workers}")
  if not 0 < a.port < 65536: raise UsageError(f"--port must be in 1..65535, got {a.port}")
  if a.attention_chunk < 0: raise UsageError(f"--attention-chunk must be >= 0, got {a.attention_chunk}")
  auth = parse_auth(a.api_auth) if a.api_auth else None
  paths = [resolve_model(m) for m in (a.model or [os.environ.get("TINYSD_MODEL", DEFAULT_MODEL)])]
  import importlib.util
  if missing := [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]:
    raise UsageError(f"tinysd serve needs the server extra ({', '.join(missing)} missing): pip install 'tinysd[server]'")
  import uvicorn
  from tinysd.server.engines import Loader
  loader = Loader(a.dtype, a.compute_dtype, a.lowmem, a.quant, a.attention_chunk)
  app, scheduler = build(paths, loader, a.workers, auth)
  host = "0.0.0.0" if a.listen else a.host
  if a.listen and not auth: print("tinysd serve: warning: listening on every interface without --api-auth", file=sys.stderr)
  try:
    print(f"tinysd serve: {a.workers} engine(s), model {paths[0]}; open http://{'127.0.0.1' if a.listen else host}:{a.port}/", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=host, port=a.port, log_level="warning", timeout_graceful_shutdown=5)
  finally: scheduler.close()
  return 0

def build(paths:list[str], loader, workers:int=1, auth=None):
  """The app and its scheduler over `workers` engines, the first model loaded in each (a bad checkpoint fails here, before binding)."""
  from tinysd.server.a1111 import model_entry
  from tinysd.server.api import Server, create_app
  from tinysd.server.engines import LocalEngine, ProcessEngine
  from tinysd.server.jobs import Scheduler
  engines = [LocalEngine(loader, paths[0])] if workers == 1 else \
            [ProcessEngine(loader, paths[0], name=f"tinysd-worker-{i}") for i in range(workers)]   # they load at the same time
  scheduler = Scheduler(engines)
  try:
    for e in engines: e.wait_ready()
  except Exception:
    scheduler.close()
    raise
  return create_app(Server(scheduler, [model_entry(p) for p in paths], auth)), scheduler
