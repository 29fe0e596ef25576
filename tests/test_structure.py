# The rooms of the codebase, read from the source with ast (nothing is imported): every import counts, the ones inside functions and
# `if TYPE_CHECKING:` blocks too -- a lazy import is still a dependency, it only moves the failure to run time.
import ast, pathlib
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("tinysd", "ops")   # folders; ops/ is the package tinysd_ops (setup.cfg package_dir, tinysd_ops.py in a checkout)
NAMES = {"ops": "tinysd_ops"}
# tinygrad's public surface (what its README and docs use); everything else -- tinygrad.uop, .engine, .runtime, .device, .renderer,
# .codegen, .schedule, ... -- is internal and goes through the adapter, ops/tg.py, so a tinygrad upgrade touches one file
PUBLIC_TINYGRAD = {"tinygrad", "tinygrad.nn", "tinygrad.nn.state", "tinygrad.dtype", "tinygrad.helpers"}
PUBLIC_HELPERS = {"Context", "getenv", "tqdm"}   # of tinygrad.helpers; the rest of it (caches, db connections, ...) is internal
ADAPTER = "tinysd_ops.tg"
ORACLES = {"torch", "diffusers", "transformers", "openvino"}   # test-only references: never at run time

def _files(*dirs:str) -> dict[str, pathlib.Path]:
  out = {}
  for d in dirs:
    for f in sorted((ROOT / d).rglob("*.py")):
      parts = f.relative_to(ROOT).with_suffix("").parts
      parts = (NAMES.get(parts[0], parts[0]),) + parts[1:]
      out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
  return out

MODULES = _files(*PACKAGES)

def _imports(mod:str, path:pathlib.Path) -> list[tuple[str, list[str], int]]:
  """(module named, names taken from it, line) for every import statement in the file, relative ones resolved."""
  pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
  out = []
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
    if isinstance(node, ast.Import): out += [(a.name, [], node.lineno) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1]) if node.level else ""
      name = ".".join(x for x in (base, node.module or "") if x)
      out.append((name, [a.name for a in node.names], node.lineno))
  return out

def _internal(name:str, names:list[str]) -> list[str]:
  # the modules of ours an import statement loads: `from tinysd import prompt` is tinysd.prompt, `from tinysd.x import f` is tinysd.x
  if (hit := [f"{name}.{n}" for n in names if f"{name}.{n}" in MODULES]): return hit
  while name and name not in MODULES: name = name.rpartition(".")[0]
  return [name] if name else []

def graph() -> dict[str, set[str]]:
  return {m: {t for name, names, _ in _imports(m, p) for t in _internal(name, names) if t != m} for m, p in MODULES.items()}

def _cycle(g:dict[str, set[str]]) -> list[str]|None:
  state, stack = {}, []
  def visit(m):
    state[m] = 1; stack.append(m)
    for t in sorted(g[m]):
      if state.get(t) == 1: return stack[stack.index(t):] + [t]
      if t not in state and (c := visit(t)): return c
    state[m] = 2; stack.pop()
    return None
  return next((c for m in sorted(g) if m not in state and (c := visit(m))), None)

def test_graph_is_read():
  # guards the test itself: a parser that found nothing would pass everything below
  g = graph()
  assert {"tinysd.pipeline", "tinysd.cli", "tinysd.models.unet", "tinysd_ops.tg", "tinysd_ops.attention"} <= set(g)
  assert "tinysd.models.unet" in g["tinysd.pipeline"] and "tinysd_ops.tg" in g["tinysd_ops.attention"] and "tinysd.prompt" in g["tinysd.pipeline"]

def test_no_cycle():
  assert (c := _cycle(graph())) is None, "import cycle: " + " -> ".join(c)

def test_cycle_finder():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None

def _where(p:pathlib.Path) -> str: return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else p.name

def ops_importing_tinysd(g:dict[str, set[str]]) -> list[tuple[str, str]]:
  return [(m, t) for m, ts in g.items() if m.split(".")[0] == "tinysd_ops" for t in ts if t.split(".")[0] == "tinysd"]

def tinygrad_internals(files:dict[str, pathlib.Path]) -> list[str]:
  bad = []
  for m, p in files.items():
    if m == ADAPTER: continue
    for name, names, line in _imports(m, p):
      if name.split(".")[0] != "tinygrad": continue
      extra = set(names) - PUBLIC_HELPERS if name == "tinygrad.helpers" else set()
      if name not in PUBLIC_TINYGRAD or extra: bad.append(f"{_where(p)}:{line} {name} {sorted(extra) or ''}")
  return bad

def oracle_imports(files:dict[str, pathlib.Path]) -> list[str]:
  return [f"{_where(p)}:{line} {name}" for m, p in files.items() for name, _, line in _imports(m, p) if name.split(".")[0] in ORACLES]

def attribute_uses(files:dict[str, pathlib.Path], attrs:set[str]) -> list[str]:
  return [f"{_where(p)}:{node.lineno} .{node.attr}" for p in files.values() for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
          if isinstance(node, ast.Attribute) and node.attr in attrs]

# lazy-graph nodes (.uop), allocator caches, Buffer.allocate and Tensor's random init are tinygrad internals: ops/tg.py wraps them
# (lazy_graph/restore_lazy, free_cached_memory, allocate, PeakMemory, placeholder_init). ops/* may hold the lazy graphs they rewrite.
JUGGLING = {"uop", "lazydata", "allocator", "ensure_allocated", "glorot_uniform"}

def test_ops_below_tinysd():
  # ops/ holds drop-in ops under the models: the models do not know them and they do not know the models
  assert not (bad := ops_importing_tinysd(graph())), f"ops/ imports tinysd: {bad}"

def _reaches(g, a:str, b:str) -> bool:
  seen, todo = set(), [a]
  while todo:
    if (m := todo.pop()) == b: return True
    if m not in seen: seen.add(m); todo += g[m]
  return False

def test_quantize_below_pipeline():
  # the pipeline's load() quantises through tinysd.quantize, so quantize must not reach the pipeline, directly or through another room
  g = graph()
  assert "tinysd.quantize" in g["tinysd.pipeline"] and not _reaches(g, "tinysd.quantize", "tinysd.pipeline")

@pytest.mark.parametrize("where", ["tinysd", "ops", "examples"])
def test_tinygrad_internals_only_in_adapter(where):
  assert not (bad := tinygrad_internals(_files(where))), "tinygrad internals outside ops/tg.py:\n" + "\n".join(bad)

@pytest.mark.parametrize("where", ["tinysd", "examples"])
def test_no_graph_juggling_above_ops(where):
  assert not (bad := attribute_uses(_files(where), JUGGLING)), "\n".join(bad)

def test_no_reference_libraries_at_run_time():
  assert not (bad := oracle_imports(MODULES)), "tinysd/ops import a test oracle:\n" + "\n".join(bad)

def test_rules_bite(tmp_path):
  # every check above on a planted violation, so a parser regression cannot turn them into no-ops
  f = tmp_path / "bad.py"
  f.write_text("from __future__ import annotations\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING: from tinysd.models import vae\n"
               "def f(t):\n  from tinysd.pipeline import load\n  from tinygrad.engine.realize import run_schedule\n"
               "  from tinygrad.helpers import DEBUG, Context\n  import torch\n  return t.uop\n")
  files = {"tinysd_ops.bad": f}
  assert [n for n, _, _ in _imports("tinysd_ops.bad", f)] == ["__future__", "typing", "tinysd.models", "tinysd.pipeline", "tinygrad.engine.realize",
                                                      "tinygrad.helpers", "torch"]
  g = {**graph(), "tinysd_ops.bad": {t for name, names, _ in _imports("tinysd_ops.bad", f) for t in _internal(name, names)}}
  assert sorted(ops_importing_tinysd(g)) == [("tinysd_ops.bad", "tinysd.models.vae"), ("tinysd_ops.bad", "tinysd.pipeline")]
  assert [b.split()[1] for b in tinygrad_internals(files)] == ["tinygrad.engine.realize", "tinygrad.helpers"]
  assert "DEBUG" in tinygrad_internals(files)[1] and "Context" not in tinygrad_internals(files)[1]
  assert oracle_imports(files) == ["bad.py:8 torch"] and attribute_uses(files, JUGGLING) == ["bad.py:9 .uop"]
  assert _cycle({**g, "tinysd.pipeline": g["tinysd.pipeline"] | {"tinysd_ops.bad"}}) is not None

def test_no_top_level_ops_and_every_package_installed():
  # PyPI's `ops` would collide with a top-level ops: nothing imports it by that name, and setup.cfg installs every package folder we have
  import configparser
  bad = [f"{_where(p)}:{line} {name}" for where in ("tinysd", "ops", "examples", "tests") for m, p in _files(where).items()
         for name, _, line in _imports(m, p) if name.split(".")[0] == "ops"]
  assert not bad, "import ops (installs as tinysd_ops):\n" + "\n".join(bad)
  cfg = configparser.ConfigParser(); cfg.read(ROOT / "setup.cfg")
  listed = set(cfg["options"]["packages"].replace(",", " ").split())
  folders = {m for m, p in MODULES.items() if p.name == "__init__.py"}
  assert listed == folders and "tinysd_ops = ops" in cfg["options"]["package_dir"], (listed, folders)
