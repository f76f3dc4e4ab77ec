"""The documentation names only things that exist: every relative link of README.md, docs/*.md and
experiments/README.md resolves, every backticked repository path is a file or folder of the repository,
and every `python -m cispo_jax.<module>` is a module that can be run. A file that moves without its
docs following fails here, naming the page, the line and the reference.

`python tests/test_docs.py` prints what it checked."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGES = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(str(REPO / "docs" / "*.md"))),
         "experiments/README.md"]
TOP = ("cispo_jax/", "tests/", "benchmarks/", "experiments/", "docs/", ".ci/")
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`]+)`")
MODULE = re.compile(r"python -m (cispo_jax(?:\.[A-Za-z_][A-Za-z0-9_]*)*)")
# a backticked path: a repository folder, then path characters (globs allowed); or a bare *.py name
PATH = re.compile(r"^(?:\.\./)*(?:%s)[\w./*<>-]*$" % "|".join(re.escape(t) for t in TOP))
BARE_PY = re.compile(r"^[\w]+\.py$")
NESTED = re.compile(r"^[\w.-]+/[\w./-]*\.(?:py|gin|md)$")  # model/attention.py: inside the package
OUTPUTS = ("--out", "--out_dir", "--root", "--run_dir", ">")
FENCE = re.compile(r"^\s*```")


def _basenames() -> set[str]:
  names = set()
  for root, dirs, files in os.walk(REPO):
    dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("runs", "__pycache__", "node_modules")]
    names.update(files)
  return names


def _exists(page: Path, ref: str) -> bool:
  """ref relative to the page's folder, or to the repository root (docs name paths from the root)."""
  ref = ref.split("#")[0].rstrip("/:,.")
  if "<" in ref:  # a placeholder (experiments/<your>.gin): its folder must exist
    ref = ref[:ref.index("<")].rsplit("/", 1)[0]
  for base in (page.parent, REPO, REPO / "cispo_jax"):
    if glob.glob(str(base / ref)):
      return True
  return False


def _module_exists(name: str) -> bool:
  path = REPO.joinpath(*name.split("."))
  return path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()


def problems(pages=PAGES, repo_files=None) -> list[str]:
  """'page:line: what' for each reference that names nothing."""
  repo_files = _basenames() if repo_files is None else repo_files
  found = []
  for name in pages:
    page = REPO / name
    lines, fenced = page.read_text(encoding="utf-8").splitlines(), False
    prose = []  # the page with its fenced blocks blanked (a code span may run over a line break)
    for line in lines:
      fenced ^= bool(FENCE.match(line))
      prose.append("" if fenced or FENCE.match(line) else line)
    for i, line in enumerate(lines, 1):
      for link in LINK.findall(line):
        if not re.match(r"^[a-z]+:", link) and not link.startswith("#") and not _exists(page, link):
          found.append(f"{name}:{i}: link ({link}) names no file")
      for mod in MODULE.findall(line):
        if not _module_exists(mod):
          found.append(f"{name}:{i}: `python -m {mod}`: no such module (no {mod.replace('.', '/')}.py "
                       "or __main__.py)")
    text = "\n".join(prose)
    for m in CODE.finditer(text):
      i = text.count("\n", 0, m.start()) + 1
      tokens = m.group(1).split()
      for prev, token in zip([""] + tokens, tokens):
        token = token.strip("(),;:'\"")
        if prev in OUTPUTS or token.split("=")[0] in OUTPUTS:  # a command's output: made when it runs
          continue
        if (PATH.match(token) or NESTED.match(token)) and not _exists(page, token):
          found.append(f"{name}:{i}: `{token}` is not a path of the repository")
        elif BARE_PY.match(token) and token not in repo_files:
          found.append(f"{name}:{i}: `{token}`: no file of that name in the repository")
  return found


def test_docs_name_only_what_exists():
  assert problems() == []


def test_a_moved_file_is_caught(tmp_path):
  """The checker itself: a page naming a file that is not there, a bad link and a missing module fail."""
  page = tmp_path / "page.md"
  page.write_text("The loop is in `cispo_jax/trainer.py`; see [the guide](docs/nowhere.md), `model/hf_io.py`.\n"
                  "Run `python -m cispo_jax.no_such_command`. Settings: `evaluation.py`.\n"
                  "Fine: `cispo_jax/trainer/loop.py`, [losses](docs/losses.md), `python -m cispo_jax.train`.\n")
  found = problems([str(page)])
  assert len(found) == 5, found
  assert any("`model/hf_io.py`" in f for f in found)
  assert any("page.md:1: `cispo_jax/trainer.py`" in f for f in found)
  assert any("link (docs/nowhere.md)" in f for f in found)
  assert any("cispo_jax.no_such_command" in f for f in found)
  assert any("`evaluation.py`: no file" in f for f in found)


if __name__ == "__main__":
  print(f"{len(PAGES)} pages: {', '.join(PAGES)}")
  for p in problems():
    print(p)


def test_the_configuration_table_lists_every_field():
  """docs/configuration.md's table names every field of every config class it lists, and no field that is gone."""
  import dataclasses

  from cispo_jax import cli

  text = (REPO / "docs" / "configuration.md").read_text()
  rows = {m.group(1): set(m.group(2).split()) for m in re.finditer(r"^\| `(\w+)` \|[^|]*\| `([^`]*)` \|$", text, re.M)}
  assert rows, "no table rows found"
  for name, listed in rows.items():
    fields = {f.name for f in dataclasses.fields(cli.CONFIG_CLASSES[name])} - set(cli.SECTIONS)  # RLConfig's sections
    assert listed == fields, (name, "missing:", sorted(fields - listed), "gone:", sorted(listed - fields))
