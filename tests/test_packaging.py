"""Packaging: what `pip install .` declares is what the code imports, and the lock pins it.

Checks by reading the sources (no install): every third-party module that `gseps_jax/` imports is
provided by a core dependency of pyproject.toml (except PyTorch, an extra, which must only be
imported lazily so the core install works without it); every declared dependency is pinned in
requirements.txt at a version its lower bound admits; README's test command installs the test
extra and `.ci/run` runs exactly README's test command.
"""

import ast
import importlib.metadata
import pathlib
import re
import sys
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]
# Imported only inside functions that need PyTorch (export/official import, legacy .bin weights);
# the exported `gseps_torch.py` is a standalone PyTorch file shipped to users.
TORCH_ONLY = {"torch", "gseps_torch"}


def _name(req: str) -> str:
  return re.split(r"[<>=!\[ ;]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def _pyproject():
  return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _lock() -> dict[str, str]:
  pins = {}
  for line in (REPO / "requirements.txt").read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if line:
      name, version = line.split("==")
      pins[_name(name)] = version.strip()
  return pins


def _imports(path: pathlib.Path):
  """(top-level module, imported at module level?) for every import in a file."""
  tree = ast.parse(path.read_text(), filename=str(path))
  top_level = {id(n) for n in tree.body}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [node.module]
    else:
      continue
    for n in names:
      yield n.split(".")[0], id(node) in top_level


def _third_party_imports():
  out = {}
  for path in sorted((REPO / "gseps_jax").rglob("*.py")):
    if "torch_export" in path.parts:
      continue
    for mod, at_top in _imports(path):
      if mod in sys.stdlib_module_names or mod in ("gseps_jax", "configs", "__future__"):
        continue
      out.setdefault(mod, []).append((path.relative_to(REPO), at_top))
  return out


def test_core_dependencies_cover_every_import():
  declared = {_name(r) for r in _pyproject()["dependencies"]}
  dists = importlib.metadata.packages_distributions()
  imports = _third_party_imports()
  assert "jax" in imports and "orbax" in imports  # the scan sees the package
  missing = []
  for mod, where in imports.items():
    if mod in TORCH_ONLY:
      continue
    provided_by = {_name(d) for d in dists.get(mod, [])}
    if not provided_by & declared:
      missing.append(f"{mod} (imported in {where[0][0]}; installed by {sorted(provided_by)})")
  assert not missing, "not declared in pyproject.toml dependencies: " + "; ".join(missing)


def test_torch_is_an_extra_imported_lazily():
  declared = {_name(r) for r in _pyproject()["dependencies"]}
  assert "torch" not in declared
  extras = _pyproject()["optional-dependencies"]
  assert any(_name(r) == "torch" for r in extras["torch"])
  assert {"torch", "pytest", "pytest-xdist"} <= {_name(r) for r in extras["test"]}
  eager = [str(p) for mod, where in _third_party_imports().items() if mod in TORCH_ONLY
           for p, at_top in where if at_top]
  assert not eager, f"module-level torch imports break the core install: {eager}"


def test_lock_pins_every_declared_dependency():
  pins = _lock()
  project = _pyproject()
  reqs = list(project["dependencies"]) + [r for rs in project["optional-dependencies"].values()
                                          for r in rs]
  for req in reqs:
    name = _name(req)
    assert name in pins, f"{name} is declared in pyproject.toml but not pinned in requirements.txt"
    bound = re.search(r">=\s*([0-9][0-9.]*)", req)
    if bound:
      have = tuple(int(x) for x in pins[name].split("+")[0].split(".") if x.isdigit())
      want = tuple(int(x) for x in bound.group(1).split("."))
      assert have >= want, f"requirements.txt pins {name}=={pins[name]} below {req}"
  assert pins["torch"] == "2.13.0"  # the CPU wheel on these machines


def _readme_blocks():
  return re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_readme_installs_core_for_the_demo_and_extras_for_tests():
  blocks = _readme_blocks()
  demo = next(b for b in blocks if "gseps_jax.train" in b)
  tests = next(b for b in blocks if "pytest" in b)
  assert re.search(r"\./install\.sh(?! --)", demo), demo  # core only: no PyTorch download
  assert "./install.sh --test" in tests, tests
  ci = (REPO / ".ci" / "run").read_text()
  # CI installs what README's test command installs and runs its pytest command.
  assert "./install.sh --test" in ci
  readme_pytest = re.search(r"python -m pytest[^\n&]*", tests).group(0).strip()
  ci_pytest = re.search(r"python -m pytest[^\n]*", ci).group(0)
  assert ci_pytest.startswith(readme_pytest.rsplit(" tests", 1)[0]), (readme_pytest, ci_pytest)
  assert ci_pytest.rstrip().endswith("tests")
