# Files tinysd hands to users (PNGs, converted checkpoints): written atomically (a temp file in the target's folder, then a rename over
# it), so a reader never sees half a file and an existing file survives any failure; a batch is renamed only once every file is written;
# and with the mode the umask gives any new file (0644 under umask 022). tempfile.mkstemp/mkdtemp would make them 0600/0700, which
# silently turned an overwritten 0644 image private. Overwriting takes the umask's mode too, as a fresh write does.
from __future__ import annotations
import contextlib, os, secrets, signal
from pathlib import Path
from typing import Callable, BinaryIO

class OutputError(ValueError): pass

def _fail(path:Path, e:OSError) -> OutputError:
  # name the user's path, never our temp file
  if isinstance(e, FileNotFoundError) and not path.parent.is_dir(): return OutputError(f"cannot write '{path}': folder '{path.parent}' does not exist")
  return OutputError(f"cannot write '{path}': {e.strerror or type(e).__name__}")

def temp_file(path) -> tuple[int, Path]:
  """(fd open for writing, its path): a new file beside `path`, created with mode 0666 so the kernel applies the umask (as open() does)."""
  path = Path(path)
  flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
  while True:
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try: return os.open(tmp, flags, 0o666), tmp
    except FileExistsError: continue
    except OSError as e: raise _fail(path, e) from None

def temp_dir(path) -> Path:
  """A new empty folder beside `path` (mode 0777 & ~umask), to be renamed onto it when complete."""
  path = Path(path)
  while True:
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try: os.mkdir(tmp, 0o777); return tmp
    except FileExistsError: continue
    except OSError as e: raise _fail(path, e) from None

@contextlib.contextmanager
def _sigint_deferred():
  # renames run with SIGINT blocked: a Ctrl-C lands after the last one, never between two of a batch
  mask = getattr(signal, "pthread_sigmask", None)
  if mask is None: yield; return
  old = mask(signal.SIG_BLOCK, {signal.SIGINT})
  try: yield
  finally: mask(signal.SIG_SETMASK, old)

def commit(pairs:list[tuple[Path, Path]]):
  """os.replace each (temp, target), SIGINT deferred until all are done."""
  with _sigint_deferred():
    for tmp, path in pairs: os.replace(tmp, path)

def write_files(paths:list, write:Callable[[BinaryIO, int], None], sync:bool=True):
  """write(f, i) fills paths[i] for every i, each into its own temp file; then all are renamed into place. Any error (Ctrl-C included)
  removes every temp file and leaves every target as it was."""
  paths, tmps = [Path(p) for p in paths], []
  try:
    for i, p in enumerate(paths):
      fd, tmp = temp_file(p)
      tmps.append(tmp)
      with os.fdopen(fd, "wb") as f:
        write(f, i)
        if sync: f.flush(); os.fsync(f.fileno())
    commit(list(zip(tmps, paths)))
  except BaseException:
    for t in tmps: t.unlink(missing_ok=True)
    raise

def check_writable(path) -> Path:
  """Refuse, before any work, an output path that cannot become a regular file: a folder, a device/pipe/socket, a missing or read-only
  folder. The folder is probed by creating (and removing) a temp file: permission bits say nothing for root or read-only mounts."""
  p = Path(path)
  if p.is_dir(): raise OutputError(f"output '{path}' is a folder")
  if p.exists() and not p.is_file(): raise OutputError(f"output '{path}' is not a regular file (a device, pipe or socket)")
  if not p.parent.is_dir(): raise OutputError(f"cannot write '{path}': folder '{p.parent}' does not exist")
  with _sigint_deferred():
    fd, tmp = temp_file(p)
    os.close(fd); tmp.unlink()
  return p
