r"""The demo config's loss curves and results with compute_dtype float32 and bfloat16.

    python benchmarks/dtype_curve.py [--workdir=workdirs/dtype_curve]

Trains configs/demo.py Stage I then Stage II (from its own Stage I) once per dtype on the
synthetic dataset, same seed and data, and writes `loss.png` (the logged training loss of both)
and `report.md` (loss at a few steps, test R@1, wall time) into the workdir. On a CPU without
bfloat16 units this measures the effect on learning, not on speed.
"""

from __future__ import annotations

import argparse
import os
import time

DTYPES = ("float32", "bfloat16")


def loss_curve(workdir: str) -> list[tuple[int, float]]:
  """(step, train/loss) from a run's TensorBoard events."""
  import tensorflow as tf
  points = {}
  events = os.path.join(workdir, "tensorboard")
  for name in sorted(os.listdir(events)):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(events, name)):
      for value in event.summary.value:
        if value.tag == "train/loss":
          points[event.step] = float(tf.make_ndarray(value.tensor))
  return sorted(points.items())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="workdirs/dtype_curve")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from instance_loss_jax import cli, evaluation, trainer
  from instance_loss_jax.ablate import load_config
  from instance_loss_jax.data import synthetic
  cli.quiet_library_logs()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  data = os.path.join(args.workdir, "data")
  if not os.path.isfile(os.path.join(data, "dataset.json")):
    synthetic.generate(data, 800, seed=0, image_size=64, w2v_dim=32)
  rows = {}
  for dtype in DTYPES:
    for stage in (1, 2):
      run = os.path.join(args.workdir, f"{dtype}-stage{stage}")
      settings = {"data.json": os.path.join(data, "dataset.json"),
                  "data.image_root": os.path.join(data, "images"),
                  "data.word2vec": os.path.join(data, "word2vec.bin"),
                  "compute_dtype": dtype, "seed": args.seed, "log_every": 10}
      if stage == 2:
        settings["init_from"] = os.path.join(args.workdir, f"{dtype}-stage1")
      start = time.time()
      results = trainer.train_and_evaluate(
          load_config(os.path.join(root, "configs", "demo.py"), stage, settings), run)
      rows[(dtype, stage)] = dict(seconds=time.time() - start, metrics=results["metrics"],
                                  curve=loss_curve(run))

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for ax, stage in zip(axes, (1, 2)):
    for dtype in DTYPES:
      steps, losses = zip(*rows[(dtype, stage)]["curve"])
      ax.plot(steps, losses, label=dtype)
    ax.set(title=f"demo, Stage {'I' * stage}", xlabel="step", ylabel="training loss")
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(args.workdir, "loss.png"), dpi=110)

  lines = ["| dtype | stage | mean loss, steps " + ", ".join(
      f"{a}-{b}" for a, b in _windows(rows[("float32", 1)]["curve"])) +
           " | test i2t R@1 | t2i R@1 | S | wall s |", "|---|---|---|---|---|---|---|"]
  for (dtype, stage), row in rows.items():
    lines.append(_line(dtype, "I" * stage, row["curve"], row["metrics"], f"{row['seconds']:.0f}"))
  # Is a bfloat16 gap from training or from evaluating in bfloat16? Its final checkpoint again,
  # evaluated in float32.
  for stage in (1, 2):
    config = load_config(os.path.join(root, "configs", "demo.py"), stage, {
        "data.json": os.path.join(data, "dataset.json"),
        "data.image_root": os.path.join(data, "images"), "compute_dtype": "float32"})
    run = os.path.join(args.workdir, f"bfloat16-stage{stage}")
    metrics = evaluation.evaluate(config, run, "test", write=False)["metrics"]
    lines.append(_line("bfloat16, evaluated in float32", "I" * stage, None, metrics, "-"))
  report = "\n".join(lines) + "\n"
  with open(os.path.join(args.workdir, "report.md"), "w", encoding="utf-8") as f:
    f.write(report)
  print(report)


def _windows(curve, count=3, width=50):
  """`count` windows of `width` logged steps: the first, the middle and the last."""
  steps = [step for step, _ in curve]
  starts = [0, (len(steps) - width) // 2, len(steps) - width][:count]
  return [(steps[i], steps[i + width - 1]) for i in starts]


def _line(dtype, stage, curve, metrics, seconds):
  losses = "-" if curve is None else ", ".join(
      f"{sum(v for s, v in curve if a <= s <= b) / (b - a + 1):.3f}" for a, b in _windows(curve))
  return (f"| {dtype} | {stage} | {losses} | {metrics['i2t_r1']:.1f} | {metrics['t2i_r1']:.1f} | "
          f"{metrics['S']:.4f} | {seconds} |")


if __name__ == "__main__":
  main()
