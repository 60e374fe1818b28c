"""The installable package: its wheel holds all of jdeq and declares what jdeq imports.

The wheel is built offline from a copy of the sources (``pip wheel --no-deps
--no-build-isolation``, with this environment's setuptools). Its ``Requires-Dist``
must cover every third-party module the library imports: those of ``jdeq.data``
under the ``data`` extra, jaxopt under ``krylov``, all others unconditionally; and
the core must import with the extras' packages absent, as in a fresh install
without extras. (CI also installs the package into a fresh environment and imports
it: ``.ci/run``.)
"""

import ast
import email
import importlib.metadata
import pathlib
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "jdeq"
# Third-party imports that are optional, and the extra that provides them.
EXTRA_OF_MODULE = {"jaxopt": "krylov"}
EXTRA_OF_SUBPACKAGE = {"data": "data"}  # jdeq/data/** needs the "data" extra


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  source = tmp_path_factory.mktemp("source")
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO_ROOT / name, source / name)
  shutil.copytree(PACKAGE, source / "jdeq",
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  out = tmp_path_factory.mktemp("wheel")
  result = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
       "--no-index", "--quiet", "--wheel-dir", str(out), str(source)],
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  (path,) = out.glob("jdeq-*.whl")
  return path


def _metadata(wheel: pathlib.Path) -> email.message.Message:
  with zipfile.ZipFile(wheel) as archive:
    (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    return email.message_from_bytes(archive.read(name))


def _requirements(wheel: pathlib.Path) -> dict[str | None, dict[str, Requirement]]:
  """Requires-Dist by extra (None: unconditional), keyed by canonical name."""
  metadata = _metadata(wheel)
  extras = metadata.get_all("Provides-Extra") or []
  groups: dict[str | None, dict[str, Requirement]] = {None: {}}
  groups.update({extra: {} for extra in extras})
  for line in metadata.get_all("Requires-Dist") or []:
    requirement = Requirement(line)
    name = canonicalize_name(requirement.name)
    if requirement.marker is None:
      groups[None][name] = requirement
      continue
    for extra in extras:
      if requirement.marker.evaluate({"extra": extra}):
        groups[extra][name] = requirement
  return groups


def _third_party_imports() -> dict[str, set[str]]:
  """Top-level third-party modules imported by jdeq, with the files importing them."""
  found: dict[str, set[str]] = {}
  for path in PACKAGE.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        names = [node.module]
      else:
        continue
      for name in names:
        top = name.split(".")[0]
        if top != "jdeq" and top not in sys.stdlib_module_names and top != "__future__":
          found.setdefault(top, set()).add(str(path.relative_to(PACKAGE)))
  return found


def test_wheel_holds_every_module(wheel):
  with zipfile.ZipFile(wheel) as archive:
    packaged = {n for n in archive.namelist() if n.startswith("jdeq/")}
  sources = {str(p.relative_to(REPO_ROOT)) for p in PACKAGE.rglob("*.py")
             if "__pycache__" not in p.parts}
  assert sources and sources <= packaged, sorted(sources - packaged)


def test_requires_dist_covers_every_third_party_import(wheel):
  groups = _requirements(wheel)
  assert {"data", "krylov", "bench", "test"} <= set(groups)
  distributions = importlib.metadata.packages_distributions()
  imports = _third_party_imports()
  assert {"jax", "flax", "optax", "orbax", "numpy", "tensorflow"} <= set(imports)
  for module, files in sorted(imports.items()):
    if module in EXTRA_OF_MODULE:
      extra = EXTRA_OF_MODULE[module]
    elif all(pathlib.Path(f).parts[0] in EXTRA_OF_SUBPACKAGE for f in files):
      extra = EXTRA_OF_SUBPACKAGE[pathlib.Path(min(files)).parts[0]]
    else:  # imported by the core: needed by every install
      extra = None
    declared = set(groups[None]) | (set(groups[extra]) if extra else set())
    providers = {canonicalize_name(d) for d in distributions.get(module, ())}
    where = f"under the {extra!r} extra" if extra else "unconditionally"
    assert providers & declared, (
        f"{module} (imported by {sorted(files)}) is provided by {sorted(providers)}, "
        f"none of which is declared {where}")


def test_pinned_versions_are_within_the_declared_ranges(wheel):
  groups = _requirements(wheel)
  core = groups[None]
  declared: dict[str, Requirement] = {}
  for group in groups.values():
    declared.update(group)
  pins = {}
  for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
      requirement = Requirement(line)
      (spec,) = requirement.specifier
      assert spec.operator == "==", f"requirements.txt pins exact versions: {line}"
      pins[canonicalize_name(requirement.name)] = spec.version
  # numpy comes pinned by the others; every other runtime dependency is pinned.
  unpinned = set(core) - set(pins) - {"numpy"}
  assert not unpinned, f"runtime dependencies missing from requirements.txt: {unpinned}"
  for name, version in pins.items():
    if name in declared:
      assert declared[name].specifier.contains(version), (name, version)
  for name, requirement in core.items():  # and this environment satisfies them
    installed = importlib.metadata.version(name)
    assert requirement.specifier.contains(installed), (name, installed)


def test_core_imports_without_the_extras():
  """The library below the experiment layer imports with the extras' packages absent."""
  blocked = ("tensorflow", "tensorflow_datasets", "jaxopt", "torch", "torchdeq")
  code = textwrap.dedent(f"""
      import importlib.abc, sys
      class Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is not installed")
      sys.meta_path.insert(0, Absent())
      import jdeq, jdeq.nn, jdeq.ops, jdeq.models, jdeq.train
      print("ok", jdeq.__version__)
  """)
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
