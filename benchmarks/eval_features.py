r"""Which evaluation features retrieve better: ours (after the ReLU, views normalised then
summed) or the original's (the last BatchNorm's raw output, views summed, then normalised).

    python benchmarks/eval_features.py --data=workdirs/dtype_study/data \
        --runs=workdirs/dtype_study/float32-seed0-stage2,workdirs/dtype_study/float32-seed1-stage2

Evaluates each run's final checkpoint (configs/demo.py:stage2) on the test split with
`eval.features` in {after_relu, original} and `eval.text_shift_sum` off and on (images always
flip-summed), and prints mean ± standard deviation over the runs of R@1 both ways and rsum.
"""

from __future__ import annotations

import argparse
import os

import numpy as np


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", required=True, help="the synthetic dataset's folder")
  parser.add_argument("--runs", required=True, help="comma-separated Stage II workdirs")
  args = parser.parse_args()
  from instance_loss_jax.cli import runner  # pylint: disable=g-import-not-at-top
  from instance_loss_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  from instance_loss_jax.config import load_config  # pylint: disable=g-import-not-at-top
  runner.configure_logging()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  runs = args.runs.split(",")
  lines = [f"{len(runs)} runs; mean ± standard deviation (test split); the last column pairs "
           "each run with itself under after_relu without shift sum (our former default)", "",
           "| features | text shift sum | i2t R@1 | t2i R@1 | rsum | rsum - former, paired |",
           "|---|---|---|---|---|---|"]
  former = None
  for features in ("after_relu", "original"):
    for shift_sum in (False, True):
      config = load_config(os.path.join(root, "configs", "demo.py:stage2"), {
          "data.json": os.path.join(args.data, "dataset.json"),
          "data.image_root": os.path.join(args.data, "images"),
          "eval.features": features, "eval.text_shift_sum": shift_sum})
      got = [evaluator.evaluate(config, run, "test", write=False)["metrics"] for run in runs]
      stat = lambda key: (f"{np.mean([m[key] for m in got]):.1f} ± "
                          f"{np.std([m[key] for m in got], ddof=1) if len(got) > 1 else 0:.1f}")
      former = former or [m["rsum"] for m in got]
      paired = np.asarray([m["rsum"] for m in got]) - np.asarray(former)
      lines.append(f"| {features} | {'yes' if shift_sum else 'no'} | {stat('i2t_r1')} | "
                   f"{stat('t2i_r1')} | {stat('rsum')} | "
                   f"{' / '.join(f'{d:+.1f}' for d in paired)} |")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
