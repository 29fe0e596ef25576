# Source-checkout stand-in for the package `tinysd_ops`, whose code is the ops/ folder. Installed (pip install . or -e .), setup.cfg's
# package_dir maps tinysd_ops -> ops/ and this file is not installed; run from a checkout without installing, Python finds this file
# first and it makes itself that package: submodules are looked up in __path__ (ops/), and ops/__init__.py runs here.
# Why not a top-level `ops`: PyPI has a package of that name (Canonical's charm framework); both would install into site-packages/ops/.
import os as _os
__path__ = [_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "ops")]
with open(_os.path.join(__path__[0], "__init__.py"), encoding="utf-8") as _f: exec(compile(_f.read(), _f.name, "exec"))
