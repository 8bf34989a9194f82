"""Several runs' evaluation results side by side, as one markdown table.

    python -m instance_loss_jax.cli.compare "Stage I=RUN1/eval/test-100.json" "Stage II=..."

Each argument is NAME=PATH of a JSON file the evaluation wrote (local or an object store).
"""

import json
import sys

from instance_loss_jax import paths
from instance_loss_jax.evaluation.tables import comparison_table


def print_comparison(argv: list[str]) -> None:
  named = {}
  for arg in argv:
    name, path = arg.split("=", 1)
    named[name] = json.loads(paths.path(path).read_text())
  print(comparison_table(named))


def run():
  """Entry point: the arguments after the program name."""
  print_comparison(sys.argv[1:])


if __name__ == "__main__":
  run()
