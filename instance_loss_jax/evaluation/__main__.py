"""`python -m instance_loss_jax.evaluation NAME=RESULTS.json ...`: several runs' results (the
evaluation's JSON files) as one markdown table."""

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


if __name__ == "__main__":
  print_comparison(sys.argv[1:])
