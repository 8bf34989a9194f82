"""The README and docs/ as a user reads them: the commands they show exist, the links resolve,
and nothing points outside the repository."""

import importlib.util
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + [os.path.join("docs", n) for n in sorted(os.listdir(
    os.path.join(ROOT, "docs"))) if n.endswith(".md")]


def _read(page):
  with open(os.path.join(ROOT, page), encoding="utf-8") as f:
    return f.read()


@pytest.mark.parametrize("page", PAGES)
def test_python_m_commands_name_modules_that_run(page):
  modules = set(re.findall(r"python -m (instance_loss_jax[\w.]*)", _read(page)))
  for module in modules:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{page}: python -m {module}: no such module"
    with open(spec.origin, encoding="utf-8") as f:
      assert '__name__ == "__main__"' in f.read(), f"{page}: {module} is not runnable"


def test_readme_says_to_activate_the_environment_before_python_m():
  # The two set-up commands make .venv; every `python -m` after them needs it active.
  text = _read("README.md")
  first_command = text.index("python -m ")
  assert "source .venv/bin/activate" in text[:first_command]
  assert len(text.splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES)
def test_links_resolve_inside_the_repository(page):
  for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", _read(page)):
    if "://" in target:
      continue
    path = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), target))
    assert path.startswith(ROOT + os.sep), f"{page}: {target} is outside the repository"
    assert os.path.exists(path), f"{page}: {target} does not exist"


def test_no_tracked_file_cites_a_file_outside_the_repository():
  files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                         check=False).stdout.split()
  if not files:
    pytest.skip("not a git checkout")
  offenders = []
  for name in files:
    if name == "tests/test_docs.py" or name.endswith((".png", ".npy")):
      continue
    try:
      text = _read(name)
    except (UnicodeDecodeError, FileNotFoundError):
      continue
    if "SPEC.md" in text or "../shared" in text:
      offenders.append(name)
  assert not offenders, offenders
