"""Tests of the code base's layout rules (the README's "Architecture" section states them).

* No function or method of the library is longer than MAX_FUNCTION_LINES: long functions are where
  the training loop, the reports and the CLIs used to hide several jobs at once.
* The library, configs and docs name only tfmochi's own documents: facts the code relies on are
  written in docs/ or in the docstring, never in a file outside the project.
* docs/TPU.md installs tfmochi with --no-deps beside tensorflow-tpu, then its dependencies by hand:
  those lines name every requirement of setup.cfg but TensorFlow.
"""
import ast
import configparser
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60
# tfmochi's own docs/ALGORITHMS.md is cited with its folder; a bare ALGORITHMS.md is the outside one.
OUTSIDE_DOCUMENTS = re.compile(r"ECOSYSTEM\.md|STYLE\.md|shared/docs|(?<!docs/)ALGORITHMS(\.md| ?§)")


def _functions(path: pathlib.Path):
  tree = ast.parse(path.read_text(), filename=str(path))
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_long_functions_in_the_library():
  long = [f"{path.relative_to(ROOT)}:{line} {name} ({length} lines)"
          for path in sorted((ROOT / "tfmochi").rglob("*.py"))
          for name, line, length in _functions(path) if length > MAX_FUNCTION_LINES]
  assert not long, "functions over %d lines:\n%s" % (MAX_FUNCTION_LINES, "\n".join(long))


def test_the_checker_sees_a_long_function(tmp_path):
  path = tmp_path / "m.py"
  path.write_text("def f():\n" + "  x = 1\n" * MAX_FUNCTION_LINES + "\ndef g():\n  return 1\n")
  assert [(name, length) for name, _, length in _functions(path)] == [
      ("f", MAX_FUNCTION_LINES + 1), ("g", 2)]


@pytest.mark.parametrize("folder", ["tfmochi", "configs", "docs", "export", "tests"])
def test_only_tfmochi_documents_are_cited(folder):
  cited = []
  for path in sorted((ROOT / folder).rglob("*")):
    if path.is_file() and path.suffix in (".py", ".flags", ".md", ".sh", ".cfg"):
      if path.name == "test_layout.py":
        continue
      for number, line in enumerate(path.read_text().splitlines(), 1):
        if OUTSIDE_DOCUMENTS.search(line):
          cited.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
  assert not cited, "documents outside tfmochi cited:\n" + "\n".join(cited)


def _requirement_names(text: str) -> set[str]:
  return {re.split(r"[<>=~! ]", r.strip(), maxsplit=1)[0].lower()
          for r in text.splitlines() if r.strip() and not r.strip().startswith("#")}


def test_the_tpu_guide_installs_every_dependency_but_tensorflow():
  setup = configparser.ConfigParser()
  setup.read(ROOT / "setup.cfg")
  wanted = _requirement_names(setup["options"]["install_requires"]) - {"tensorflow"}
  guide = (ROOT / "docs" / "TPU.md").read_text().replace("\\\n", " ")
  lines = [line for line in guide.splitlines() if "pip install" in line and '"keras>=' in line]
  assert len(lines) >= 2, "docs/TPU.md: the dependency lines of section 4 and the Spot loop"
  for line in lines:
    assert _requirement_names("\n".join(re.findall(r'"([^"]+)"', line))) == wanted, line
