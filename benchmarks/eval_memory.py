r"""Peak host memory (RSS) of the evaluation binary on a run whose W_share has many classes.

    python benchmarks/eval_memory.py --classes=500000 --workdir=/tmp/eval_memory
    python benchmarks/eval_memory.py --workdir=/tmp/eval_memory --before=/path/to/older/checkout

Builds (once, kept in --workdir) a run of the tests' small model with 2048-d heads, trained for
one epoch on the synthetic data, then written again as a new newest checkpoint whose W_share
and its momentum have `--classes` classes ([2048, classes] float32: 4 GB each at 500,000), its
metadata saying so. Then runs `python -m instance_loss_jax.cli.evaluate` on it
under `/usr/bin/time -v` and reports its maximum resident set size beside the checkpoint's
size on disk; with --before, the same binary of another checkout (PYTHONPATH) for comparison.
Building the 500,000-class checkpoint peaked at 21.7 GB of RSS on the 24 GB machine (W_share
and its momentum, 4 GB each, then Orbax's host copies while it writes them): run it with
nothing else running, or on a larger machine, or with --classes=250000. The evaluations it
measures stay far below that.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

flags.DEFINE_integer("classes", 500000, "W_share's classes in the inflated checkpoint")
flags.DEFINE_string("workdir", "/tmp/eval_memory", "where the data and the run are kept")
flags.DEFINE_list("before", [], "other checkouts whose evaluation binary to measure too")
FLAGS = flags.FLAGS
INFLATED_STEP = 1000


def build(workdir: str, classes: int) -> str:
  """The data and the run (reused if there); returns the run's workdir."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  from test_training import small_config
  from instance_loss_jax import trainer
  from instance_loss_jax.workdir import checkpoint
  from instance_loss_jax.data import synthetic

  data, run = os.path.join(workdir, "data"), os.path.join(workdir, "run")
  if not os.path.exists(os.path.join(data, "dataset.json")):
    synthetic.generate(data, num_images=40, seed=1, image_size=40, w2v_dim=16, w2v_epochs=2)
  if not checkpoint.manager(run).all_steps():
    config = small_config("stage2", data, **{"model.embed_dim": 2048, "eval.at_end": False,
                                             "optim.schedule": ((1, 1.0),)})
    trainer.train_and_evaluate(config, run)
  mgr = checkpoint.manager(run)
  if INFLATED_STEP in mgr.all_steps():
    return run
  step = mgr.latest_step()
  meta = checkpoint.read_meta(mgr, step)
  tree = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def inflate(path, x):
    if "w_share" not in jax.tree_util.keystr(path) or x.ndim != 2:
      return jax.device_put(x, one)
    if "trace" in jax.tree_util.keystr(path):  # the momentum
      return jnp.zeros((x.shape[0], classes), x.dtype, device=one)
    # One 4 GB array at 500,000 classes: drawn and scaled in one program, no temporary.
    draw = jax.jit(lambda key: 0.01 * jax.random.normal(key, (x.shape[0], classes), x.dtype))
    return draw(jax.random.key(0))

  tree = jax.tree_util.tree_map_with_path(inflate, tree)
  state = types.SimpleNamespace(**tree)
  checkpoint.save(mgr, INFLATED_STEP, state, dict(meta, num_classes=classes))
  mgr.wait_until_finished()
  del tree, state
  return run


def peak_rss_kb(checkout: str, run: str, data: str) -> tuple[int, str]:
  """The evaluation binary of `checkout` on `run`: (maximum RSS in KiB, its last output line)."""
  from test_training import flags_for, small_overrides  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=checkout, TF_CPP_MIN_LOG_LEVEL="2")
  done = subprocess.run(
      ["/usr/bin/time", "-v", sys.executable, "-m", "instance_loss_jax.cli.evaluate",
       "--config=configs/demo.py:stage2", f"--workdir={run}"] + flags_for(
           {**small_overrides(data), "model.embed_dim": 2048}),
      cwd=checkout, env=env, capture_output=True, text=True, check=False)
  if done.returncode:
    raise SystemExit(f"evaluate in {checkout} failed:\n{done.stderr[-3000:]}")
  rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
  return rss, done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def main(argv):
  del argv
  run = build(FLAGS.workdir, FLAGS.classes)
  step_dir = os.path.join(run, "checkpoints", str(INFLATED_STEP))
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(step_dir) for f in fs)
  print(f"checkpoint {step_dir}: {size / 2**30:.2f} GiB on disk, W_share {FLAGS.classes:,} "
        "classes x 2048")
  print("| checkout | evaluation's peak RSS |\n|---|---|")
  for checkout in [ROOT] + FLAGS.before:
    rss, _ = peak_rss_kb(checkout, run, os.path.join(FLAGS.workdir, "data"))
    print(f"| {checkout} | {rss / 2**20:.2f} GiB |", flush=True)


if __name__ == "__main__":
  app.run(main)
