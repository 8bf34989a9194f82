r"""How far bfloat16 compute moves the train step's losses from float32's, on the tiny Stage II
model of tests/test_train_step.py: the spread that test's tolerance is derived from.

    python benchmarks/bf16_spread.py [--seeds 16] [--steps 3]

For each seed, the same initial state and batches run in float32 and in bfloat16 compute
(`compute_dtype`); printed per loss and step: the median and the largest relative gap
|bf16 - f32| / |f32| over the seeds. The first step's gap is rounding alone (both start from
the same parameters); later steps add the divergence of two trajectories.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402

from helpers import host_train_state, random_batch, tiny_config  # noqa: E402
from test_train_step import STAGE2, STEPS_PER_EPOCH, run_steps  # noqa: E402

LOSSES = ("rank_loss", "visual_loss", "textual_loss")


def gaps(seed: int, steps: int) -> dict[str, list[float]]:
  """Relative gaps of bfloat16's losses to float32's, per loss and step, for one seed."""
  config = tiny_config(**STAGE2)
  batches = [random_batch(config, seed=seed * 100 + s) for s in range(steps)]
  init = host_train_state(config, jax.random.key(seed), STEPS_PER_EPOCH)
  devices = jax.local_devices()[:1]
  _, hist32 = run_steps(config, devices, batches, state=init)
  bf16 = config.copy_and_resolve_references()
  bf16.compute_dtype = "bfloat16"
  _, hist16 = run_steps(bf16, devices, batches, state=init)
  return {key: [abs(float(m16[key]) - float(m32[key])) / abs(float(m32[key]))
                for m16, m32 in zip(hist16, hist32)] for key in LOSSES}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", type=int, default=16)
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  runs = [gaps(seed, args.steps) for seed in range(args.seeds)]
  summary = {}
  for key in LOSSES:
    per_step = np.array([run[key] for run in runs])  # [seeds, steps]
    summary[key] = {"median": [float(f"{x:.3g}") for x in np.median(per_step, axis=0)],
                    "max": [float(f"{x:.3g}") for x in per_step.max(axis=0)]}
  print(json.dumps({"jax": jax.__version__, "python": sys.version.split()[0],
                    "seeds": args.seeds, "gaps_by_step": summary}, indent=1))


if __name__ == "__main__":
  main()
