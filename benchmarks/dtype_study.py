r"""bfloat16 against float32 on the demo: which computations cost accuracy, over seeds.

    python benchmarks/dtype_study.py --workdir=workdirs/dtype_study --seeds=0,1,2 \
        --variants="float32;bfloat16;bfloat16:w_share;bfloat16:batch_norm"

A variant is `float32`, `bfloat16`, or `bfloat16:PART,PART` with those `float32_parts` computed
in float32 (config.py). Each variant and seed trains configs/demo.py Stage I, then Stage II from
its own Stage I, on the synthetic dataset of launch/demo.sh, and is evaluated on the test split.
Writes `report.md` (mean and standard deviation over seeds of the test R@1 both ways and S, the
last-50-step training loss, wall time) and `loss.png` (each variant's seed-mean loss curves).
Runs that finished are read back, so an interrupted study resumes. On a CPU this measures the
effect on learning, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def loss_curve(workdir: str) -> list[tuple[int, float]]:
  """(step, train/loss) from a run's TensorBoard events."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  points = {}
  events = os.path.join(workdir, "tensorboard")
  for name in sorted(os.listdir(events)):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(events, name)):
      for value in event.summary.value:
        if value.tag == "train/loss":
          points[event.step] = float(tf.make_ndarray(value.tensor))
  return sorted(points.items())


def parse_variant(spec: str) -> dict:
  dtype, _, parts = spec.partition(":")
  return {"compute_dtype": dtype, "float32_parts": tuple(p for p in parts.split(",") if p)}


def run_variant(root, workdir, data, spec, seed):
  """Both stages of one variant and seed; returns {stage: {metrics, curve, seconds}}."""
  from instance_loss_jax import trainer  # pylint: disable=g-import-not-at-top
  from instance_loss_jax.config import load_config  # pylint: disable=g-import-not-at-top
  out = {}
  name = spec.replace(":", "-").replace(",", "+")
  for stage in (1, 2):
    run = os.path.join(workdir, f"{name}-seed{seed}-stage{stage}")
    done = os.path.join(run, "study.json")
    if os.path.isfile(done):
      with open(done, encoding="utf-8") as f:
        out[stage] = json.load(f)
      continue
    settings = {"data.json": os.path.join(data, "dataset.json"),
                "data.image_root": os.path.join(data, "images"),
                "data.word2vec": os.path.join(data, "word2vec.bin"),
                "seed": seed, "log_every": 10, **parse_variant(spec)}
    if stage == 2:
      settings["init_from"] = os.path.join(workdir, f"{name}-seed{seed}-stage1")
    start = time.time()
    results = trainer.train_and_evaluate(
        load_config(os.path.join(root, "configs", f"demo.py:stage{stage}"), settings), run)
    out[stage] = dict(metrics=results["metrics"], curve=loss_curve(run),
                      seconds=time.time() - start)
    with open(done, "w", encoding="utf-8") as f:
      json.dump(out[stage], f)
  return out


def _stat(values, digits=1):
  values = np.asarray(values, float)
  return f"{values.mean():.{digits}f} ± {values.std(ddof=1) if len(values) > 1 else 0:.{digits}f}"


def report(rows, seeds) -> str:
  lines = [f"Seeds {seeds}; mean ± standard deviation over seeds (test split, Stage II's "
           "result after both stages in the variant's precision).", "",
           "| variant | test i2t R@1 | t2i R@1 | S | Stage I loss, last 50 | Stage II loss, last "
           "50 | Stage I i2t/t2i R@1 | wall s (both stages) |",
           "|---|---|---|---|---|---|---|---|"]
  for spec, runs in rows.items():
    m2 = [r[2]["metrics"] for r in runs]
    m1 = [r[1]["metrics"] for r in runs]
    last = lambda stage: [np.mean([v for _, v in r[stage]["curve"][-5:]]) for r in runs]
    lines.append(
        f"| {spec} | {_stat([m['i2t_r1'] for m in m2])} | {_stat([m['t2i_r1'] for m in m2])} | "
        f"{_stat([m['S'] for m in m2], 4)} | {_stat(last(1), 3)} | {_stat(last(2), 3)} | "
        f"{_stat([m['i2t_r1'] for m in m1])} / {_stat([m['t2i_r1'] for m in m1])} | "
        f"{np.mean([r[1]['seconds'] + r[2]['seconds'] for r in runs]):.0f} |")
  return "\n".join(lines) + "\n"


def plot(rows, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  for ax, stage in zip(axes, (1, 2)):
    for spec, runs in rows.items():
      curves = [dict(r[stage]["curve"]) for r in runs]
      steps = sorted(set.intersection(*(set(c) for c in curves)))
      ax.plot(steps, [np.mean([c[s] for c in curves]) for s in steps], label=spec, lw=1)
    ax.set(title=f"demo, Stage {'I' * stage} (mean over seeds)", xlabel="step",
           ylabel="training loss")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="workdirs/dtype_study")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--variants", default="float32;bfloat16")
  args = parser.parse_args()
  from instance_loss_jax.cli import runner  # pylint: disable=g-import-not-at-top
  from instance_loss_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  runner.configure_logging()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  data = os.path.join(args.workdir, "data")
  if not os.path.isfile(os.path.join(data, "dataset.json")):
    synthetic.generate(data, 800, seed=0, image_size=64, w2v_dim=32)  # launch/demo.sh's data
  seeds = [int(s) for s in args.seeds.split(",")]
  rows = {spec: [run_variant(root, args.workdir, data, spec, seed) for seed in seeds]
          for spec in args.variants.split(";")}
  text = report(rows, seeds)
  with open(os.path.join(args.workdir, "report.md"), "w", encoding="utf-8") as f:
    f.write(text)
  plot(rows, os.path.join(args.workdir, "loss.png"))
  print(text)


if __name__ == "__main__":
  main()
