"""The layout's rules, checked: imports only point down (the import-linter contracts in pyproject.toml), and
the package's files and functions stay short enough to read at once.

`python tests/test_layout.py` prints every file over 300 lines and every function over 40, longest first.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cispo_jax"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60  # without its docstring: a long explanation is not a long function


def function_sizes(path: pathlib.Path):
  """(lines without the docstring, 'path:line name') of every function and method in one file."""
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      lines = node.end_lineno - node.lineno + 1
      doc = node.body[0]
      if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
        lines -= doc.end_lineno - doc.lineno + 1
      yield lines, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"


def sizes():
  files = [(len(p.read_text().splitlines()), str(p.relative_to(ROOT))) for p in sorted(PACKAGE.rglob("*.py"))]
  functions = [f for p in sorted(PACKAGE.rglob("*.py")) for f in function_sizes(p)]
  return sorted(files, reverse=True), sorted(functions, reverse=True)


def test_imports_only_point_down():
  """lint-imports with the contracts of pyproject.toml (layers, and no jax under analysis/ and config/)."""
  run = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                        "sys.exit(lint_imports_command())"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
  assert "0 broken" in run.stdout


def test_files_and_functions_are_short():
  files, functions = sizes()
  assert [f for f in files if f[0] > MAX_FILE_LINES] == []
  assert [f for f in functions if f[0] > MAX_FUNCTION_LINES] == []


if __name__ == "__main__":
  files, functions = sizes()
  print(f"{len(files)} files, {sum(n for n, _ in files)} lines; the longest: {files[0][0]} ({files[0][1]})")
  for n, name in files:
    if n > 300:
      print(f"  {n:4d}  {name}")
  print(f"{len(functions)} functions; over 40 lines (docstring excluded):")
  for n, name in functions:
    if n > 40:
      print(f"  {n:4d}  {name}")
