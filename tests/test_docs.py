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


def _commands_named():
  """(argv, where) of every `python benchmarks/X.py [MODE]` and `python -m instance_loss_jax...`
  in README.md, docs/ and benchmarks/RESULTS.md, each once."""
  found = {}
  for page in PAGES + [os.path.join("benchmarks", "RESULTS.md")]:
    text = _read(page)
    for script, mode in re.findall(r"python3? (benchmarks/[\w/.-]+\.py)(?: ([a-z][a-z_]*)\b)?",
                                   text):
      found.setdefault((script,) + ((mode,) if mode else ()), page)
    for module in re.findall(r"python3? -m (instance_loss_jax[\w.]*\w)", text):
      found.setdefault(("-m", module), page)
  return found


def test_every_command_the_docs_name_answers_help():
  """`--help` of each command as the pages write it, its mode included: a removed script, mode
  or module fails (run at once, a few seconds in all)."""
  import sys  # pylint: disable=g-import-not-at-top
  found = _commands_named()
  assert len(found) >= 25
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  running = [(argv, page, subprocess.Popen([sys.executable, *argv, "--help"], cwd=ROOT, env=env,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True))
             for argv, page in sorted(found.items())]
  failed = []
  for argv, page, proc in running:
    out, err = proc.communicate(timeout=300)
    # absl's --help exits with status 1, argparse's with 0; neither prints a traceback.
    if proc.returncode not in (0, 1) or "Traceback" in err or not out.strip():
      failed.append(f"{page}: python {' '.join(argv)} --help: exit {proc.returncode}: "
                    f"{err.strip().splitlines()[-1] if err.strip() else ''}")
  assert not failed, "\n".join(failed)
