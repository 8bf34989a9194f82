r"""How far 8 devices' train step moves from 1 device's, on the tiny Stage II model of
tests/test_train_step.py (test_eight_devices_match_one_device): the spread its tolerance
(1e-3 of each tensor's scale) is set against.

    python benchmarks/device_count_spread.py [--seeds 4] [--steps 2]

For each seed (initial state and batches) and W_share layout, the same steps run on 8 and on
1 of the 8 host devices. Printed per step: the largest, over all tensors, of
(max|change8 - change1| - FLOOR) / max|change1|, the relative tolerance the test would need
with its absolute floor, where change is a tensor's move from the initial state (the
parameters and BN statistics) or the tensor itself (SGD's momentum); and the tensor where it
is largest. The floor (1e-5, the test's) is for tensors whose gradient is zero but for
rounding (the word embedding's bias, which a BatchNorm follows: its momentum is float noise of
~1e-6). Step 1 is float32 summation order alone; later steps add the divergence
of two trajectories (XLA:CPU vectorises for the host CPU, so the order differs between Intel
and AMD too).
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402

from helpers import host_train_state, random_batch, tiny_config  # noqa: E402
from test_train_step import STAGE2, STEPS_PER_EPOCH, run_steps  # noqa: E402


FLOOR = 1e-5


def spread(a, b, base):
  """(largest relative gap, its tensor) of a against b, both as changes from `base` (None:
  the tensors themselves)."""
  worst, where = 0.0, ""
  flat_b = jax.tree_util.tree_leaves(b)
  flat_base = jax.tree_util.tree_leaves(base) if base is not None else [0.0] * len(flat_b)
  for (path, x), y, z in zip(jax.tree_util.tree_leaves_with_path(a), flat_b, flat_base):
    dx, dy = np.asarray(x) - np.asarray(z), np.asarray(y) - np.asarray(z)
    scale = np.abs(dy).max()
    if scale == 0:
      continue
    gap = float(max(0.0, np.abs(dx - dy).max() - FLOOR) / scale)
    if gap > worst:
      worst, where = gap, jax.tree_util.keystr(path)
  return worst, where


def main():
  # Each run_steps call builds its step anew: identical programs are read back from this cache.
  import tempfile  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="jax_cache_"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", type=int, default=4)
  parser.add_argument("--steps", type=int, default=2)
  args = parser.parse_args()
  devices = jax.local_devices()
  rows = []
  for layout, classes in (("classes", 13), ("replicated", 16)):
    config = tiny_config(**STAGE2, **{"model.w_share_sharding": layout, "num_classes": classes,
                                      "batch_size": 8, "model.dropout": 0.5})
    for seed in range(args.seeds):
      init = host_train_state(config, jax.random.key(seed), STEPS_PER_EPOCH)
      state8 = state1 = init
      for step in range(1, args.steps + 1):
        batch = [random_batch(config, seed=100 * seed + step)]
        state8, _ = run_steps(config, devices[:8], batch, state=state8)
        state1, _ = run_steps(config, devices[:1], batch, state=state1)
        gaps = [spread(state8.params, state1.params, init.params),
                spread(state8.batch_stats, state1.batch_stats, init.batch_stats),
                spread(state8.opt_state, state1.opt_state, None)]
        worst = max(gaps)
        rows.append(dict(layout=layout, seed=seed, step=step, gap=worst[0], where=worst[1]))
        print(json.dumps(rows[-1]), flush=True)
  for step in range(1, args.steps + 1):
    gaps = [r["gap"] for r in rows if r["step"] == step]
    print(f"step {step}: largest relative gap {max(gaps):.2e} (median {np.median(gaps):.2e}) "
          f"over {len(gaps)} runs")


if __name__ == "__main__":
  main()
