"""The package's imports run one way, from leaves up to the binaries (function-level imports
included), and loading a config file imports no framework."""

import ast
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "instance_loss_jax"

# Each module's layer: a module imports only from lower layers, or from its own subpackage in
# the same layer (data.pipeline -> data.records). Unlisted modules fail the test: a new module
# says where it belongs.
LAYERS = [
    ["errors", "paths"],
    ["config"],  # its run_config names local paths absolutely (paths)
    ["sharding", "models", "data"],
    ["workdir", "backbone", "matconvnet"],  # workdir: checkpoints, faults, the one writer
    ["training", "inference"],
    ["evaluation", "resume"],
    ["trainer", "index"],
    ["cli"],  # the binaries
    [""],  # the package's face
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
FRAMEWORKS = ("jax", "flax", "optax", "orbax", "tensorflow", "tensorflow_datasets", "torch")


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in (ROOT / PACKAGE).rglob("*.py")}


def _imports(path: pathlib.Path, modules) -> list[tuple[str, int, bool]]:
  """(imported package module, line, inside a function) for every import of the package."""
  out = []
  for node in ast.walk(ast.parse(path.read_text())):
    names = []
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
               for a in node.names]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
    out += [(name, node.lineno, node.col_offset > 0) for name in names]
  return out


def _layer_key(module: str) -> str:
  """'instance_loss_jax.data.vocab' -> 'data'; the package itself -> ''."""
  parts = module.split(".")[1:]
  return parts[0] if parts else ""


def test_every_import_goes_down_the_layers():
  modules = _modules()
  unplaced = sorted(m for m in modules if _layer_key(m) not in LAYER)
  assert not unplaced, f"modules in no layer of LAYERS: {unplaced}"
  wrong = []
  for module, path in sorted(modules.items()):
    for target, line, _ in _imports(path, modules):
      a, b = _layer_key(module), _layer_key(target)
      if LAYER[b] > LAYER[a] or (LAYER[b] == LAYER[a] and a != b):
        wrong.append(f"{module}:{line} imports {target} (layer {LAYER[b]} from layer {LAYER[a]})")
  assert not wrong, "\n".join(wrong)


def test_the_import_graph_has_no_cycle():
  modules = _modules()
  graph = {m: sorted({t for t, _, _ in _imports(p, modules) if t != m})
           for m, p in modules.items()}
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for t in graph.get(m, []):
      if state.get(t) == "open":
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
      if t not in state:
        visit(t)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)


def test_imports_inside_functions_say_why():
  """An import inside a function keeps a heavy dependency (TensorFlow, gensim, PyTorch) off a
  fast path; a comment on its line or just above says which (a pylint directive alone is no
  reason)."""
  silent = []
  for module, path in sorted(_modules().items()):
    lines = path.read_text().splitlines()
    for node in ast.walk(ast.parse(path.read_text())):
      if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.col_offset == 0:
        continue
      said = [lines[node.lineno - 1].partition("#")[2]]
      above = node.lineno - 2
      # The comments above it, across the imports of the same block.
      while above >= 0 and lines[above].strip().startswith(("#", "import ", "from ")):
        said.append(lines[above].partition("#")[2])
        above -= 1
      reasons = [s for s in said if s.strip() and not s.strip().startswith("pylint:")]
      if not reasons:
        silent.append(f"{module}:{node.lineno}: {lines[node.lineno - 1].strip()}")
  assert not silent, "\n".join(silent)


def test_config_files_load_without_any_framework():
  # The binaries' --help and flag errors, and any tool that reads a config, stay fast.
  code = f"""
import glob, json, sys
from instance_loss_jax.config import load_config
for path in sorted(glob.glob("configs/*.py")):
  for stage in ("stage1", "stage2"):
    load_config(f"{{path}}:{{stage}}")
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({FRAMEWORKS!r}))))
"""
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert json.loads(done.stdout) == [], done.stdout


def test_evaluation_outputs_import_no_framework():
  # Metrics, tables, plots and HTML pages are numpy, matplotlib and PIL: a tool that reads
  # results or draws a page does not wait for JAX or TensorFlow (evaluation/__init__ is a
  # docstring, so importing them does not bring in the evaluator).
  code = f"""
import json, sys
from instance_loss_jax.evaluation import metrics, pages, plots, tables
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({FRAMEWORKS!r}))))
"""
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert json.loads(done.stdout) == [], done.stdout


def test_importing_the_package_changes_nothing_in_the_process():
  """Importing the Index (JAX, Orbax, the pipeline, TensorFlow with it) leaves Orbax's global
  handler registry, TensorFlow's visible devices and the environment as they were: the setup
  happens where a run, a save or a dataset starts."""
  import subprocess  # pylint: disable=g-import-not-at-top  (only this test starts a process)
  import sys  # pylint: disable=g-import-not-at-top  (only this test starts a process)
  code = """
import os
import tensorflow as tf
calls = []
tf.config.set_visible_devices = lambda *a, **k: calls.append(a)
env = dict(os.environ)
from orbax.checkpoint._src.serialization import type_handler_registry as registry
import jax
before = registry.GLOBAL_TYPE_HANDLER_REGISTRY.get(jax.Array)
import instance_loss_jax.index, instance_loss_jax.data.pipeline, instance_loss_jax.trainer
after = registry.GLOBAL_TYPE_HANDLER_REGISTRY.get(jax.Array)
print(calls, after is before, dict(os.environ) == env)
"""
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env=dict(env, JAX_PLATFORMS="cpu"), timeout=300).stdout
  assert out.strip().splitlines()[-1] == "[] True True", out
