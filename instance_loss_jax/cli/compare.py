"""Several runs' evaluation results side by side, as one markdown table.

    python -m instance_loss_jax.cli.compare "Stage I=RUN1/eval/test-100.json" "Stage II=..."

Each argument is NAME=PATH of a JSON file the evaluation wrote (local or an object store).
"""

import argparse
import sys

from instance_loss_jax import paths
from instance_loss_jax.evaluation.tables import comparison_table


def read_named(args: list[str]) -> dict:
  """{NAME: the evaluation's results} of NAME=PATH arguments; a bad one raises ValueError
  naming it."""
  named = {}
  for arg in args:
    name, sep, path = arg.partition("=")
    if not sep or not name or not path:
      raise ValueError(f"{arg!r}: expected NAME=PATH of an evaluation's JSON file")
    results = paths.read_json(path, ValueError, what="not an evaluation's JSON")
    if not isinstance(results, dict) or "metrics" not in results:
      raise ValueError(f"{path}: not an evaluation's JSON (no metrics)")
    named[name] = results
  return named


def print_comparison(argv: list[str]) -> None:
  print(comparison_table(read_named(argv)))


def run():
  """Entry point: the arguments after the program name."""
  parser = argparse.ArgumentParser(
      prog="python -m instance_loss_jax.cli.compare",
      description=__doc__.split("\n\n", maxsplit=1)[0],
      epilog="Each argument is NAME=PATH of a JSON file the evaluation wrote.")
  parser.add_argument("runs", nargs="+", metavar="NAME=PATH")
  args = parser.parse_args(sys.argv[1:])
  try:
    print_comparison(args.runs)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  run()
