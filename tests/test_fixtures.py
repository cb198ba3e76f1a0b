"""The test suite is self-contained: no test reads outside the repository (a user's fresh clone
has no ../shared beside it), the real-text fixture is small, and generated test data is keyed by
the generator's code so a changed generator is never tested on data an older one built."""

import ast
import json
import re
import shutil
from pathlib import Path

import tiny

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


_SHARED = re.compile(r"(^|\.\./)shared(/|$)")  # "shared/...", "../shared"; not "/shared/run"


def outside_references(source: str) -> list[int]:
  """Lines of `source` whose CODE points outside the repository: a string literal naming a
  `shared/` folder, `.parents[k]` with k >= 2, or `.parent.parent.parent` (docstrings and
  comments, which may say where a fixture was copied from, are not code)."""
  tree = ast.parse(source)
  docstrings = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      body = node.body
      if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        docstrings.add(id(body[0].value))
  lines = []
  for node in ast.walk(tree):
    if (isinstance(node, ast.Constant) and isinstance(node.value, str)
        and id(node) not in docstrings and _SHARED.search(node.value)):
      lines.append(node.lineno)
    elif (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)
          and node.value.attr == "parents" and isinstance(node.slice, ast.Constant)
          and isinstance(node.slice.value, int) and node.slice.value >= 2):
      lines.append(node.lineno)
    elif (isinstance(node, ast.Attribute) and node.attr == "parent"
          and isinstance(node.value, ast.Attribute) and node.value.attr == "parent"
          and isinstance(node.value.value, ast.Attribute) and node.value.value.attr == "parent"):
      lines.append(node.lineno)
  return sorted(set(lines))


def test_outside_reference_detector():
  assert outside_references('P = Path(__file__).resolve().parents[2] / "shared/data/f30k"') == [1]
  assert outside_references('x = REPO.parent / "shared"') == [1]
  assert outside_references('x = p.parent.parent.parent') == [1]
  assert outside_references('"""Copied from ../shared/data/f30k."""\n# ../shared too\nx = 1') == []
  assert outside_references('x = Path(__file__).parents[1] / "data" / "f30k"') == []


def test_no_test_reads_outside_the_repository():
  offenders = []
  for f in sorted(TESTS.rglob("*.py")):
    if f.name == Path(__file__).name:  # its own detector cases
      continue
    lines = f.read_text().splitlines()
    for i in outside_references(f.read_text()):
      offenders.append(f"{f.relative_to(REPO)}:{i}: {lines[i - 1].strip()}")
  assert not offenders, "\n".join(offenders)


def test_real_text_fixture_is_small_and_consistent():
  d = TESTS / "data" / "f30k"
  size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
  assert size < 300_000, size
  caps = (d / "test_caps.txt").read_text().splitlines()
  ids = (d / "test_ids.txt").read_text().splitlines()
  dense = (d / "f30k_test.jsonl").read_text().splitlines()
  assert len(caps) == len(ids) == 5 * len(dense) >= 300
  mapping = json.loads((d / "id_mapping.json").read_text())
  assert set(mapping) == set(ids)


def test_generated_data_is_keyed_by_the_generator_code(tmp_path):
  for name in tiny.GENERATOR_FILES:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / name, tmp_path / name)
  assert tiny.generator_hash(tmp_path) == tiny.generator_hash()
  assert tiny.generator_hash() in tiny.DATA_DIR.name
  with open(tmp_path / tiny.GENERATOR_FILES[0], "a") as f:
    f.write("\n# a changed generator\n")
  assert tiny.generator_hash(tmp_path) != tiny.generator_hash()
