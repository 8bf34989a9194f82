r"""Step time with a slow input, with and without `data.device_prefetch`.

    python benchmarks/device_prefetch.py                  # CPU: one device, a small model
    python benchmarks/device_prefetch.py --input_ms=40 --steps=60
    python benchmarks/device_prefetch.py --model=full --input_ms=0 --batch_size=32  # a GPU/TPU

A Stage I step on one device (`--model=small`: a narrow ResNet-14 at 64x64; `full`:
configs/flickr30k.py's, ResNet-50 at 224x224 and 29,783 classes), fed by a host iterator that
sleeps `input_ms` before each numpy batch (an input pipeline slower than the step; a sleep, like
tf.data's own threads, leaves the GIL free). Measured in one process, each a loop of `--steps`
steps after a warm-up (compile excluded), the modes alternated within each of `--repeats`
rounds, the median of each mode's loops:

- compute: the step alone, its batches placed beforehand;
- input: the iterator alone;
- prefetch 0 / 2: the trainer's pairing, `DevicePrefetch(batches, step.place, size)`, the loss
  read back on the host after every step (as a log line, a non-finite check or a checkpoint
  does) or every 50 (`--read_every`).

With the batches placed ahead, a step should take about max(input, compute); placed when the
step starts, input + compute whenever the loop waits on the step.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

flags.DEFINE_float("input_ms", 30.0, "host time per batch")
flags.DEFINE_integer("steps", 40, "steps per measured loop")
flags.DEFINE_integer("repeats", 3, "loops per mode (median reported)")
flags.DEFINE_integer("batch_size", 16, "global batch")
flags.DEFINE_list("read_every", ["1", "50"], "steps between host reads of the loss")
flags.DEFINE_enum("model", "small", ["small", "full"], "the model (see the docstring)")
flags.DEFINE_string("dtype", "float32", "compute_dtype")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top
  import jax
  from helpers import random_batch, tiny_config
  from instance_loss_jax import sharding, training as ts
  from instance_loss_jax.training.prefetch import DevicePrefetch

  from instance_loss_jax.config import load_config
  from instance_loss_jax.training import flops
  if FLAGS.model == "full":
    config = load_config(os.path.join(ROOT, "configs", "flickr30k.py:stage1"), {
        "batch_size": FLAGS.batch_size, "num_classes": 29783, "compute_dtype": FLAGS.dtype})
  else:
    config = tiny_config(batch_size=FLAGS.batch_size, num_classes=64, image_size=64,
                         compute_dtype=FLAGS.dtype, **{"model.image.width": 8})
  mesh = sharding.make_mesh(jax.devices()[:1])
  step = ts.make_train_step(config, 10, mesh)
  state = ts.create_train_state(config, jax.random.key(0), 10, mesh)
  host = [random_batch(config, seed=s) for s in range(4)]

  def slow_batches(n):
    for i in range(n):
      time.sleep(FLAGS.input_ms / 1000)
      yield host[i % len(host)]

  def loop(batches, n, read_every):
    nonlocal state
    start = time.perf_counter()
    for i in range(n):
      state, metrics = step(state, next(batches))
      if (i + 1) % read_every == 0 or i + 1 == n:
        float(metrics["loss"])
    return (time.perf_counter() - start) / n

  def prefetched(size, every):
    with DevicePrefetch(slow_batches(FLAGS.steps + size), step.place, size) as batches:
      return loop(batches, FLAGS.steps, every)

  placed = [step.place(b) for b in host]
  loop(iter(placed * 3), 8, 1)  # compile and warm up
  kind = jax.devices()[0].device_kind
  results = {"device": kind, "jax": jax.__version__, "model": FLAGS.model,
             "dtype": FLAGS.dtype, "input_ms": FLAGS.input_ms, "batch_size": FLAGS.batch_size,
             "steps": FLAGS.steps, "gflop_per_step": (step.flops(state, placed[0]) or 0) / 1e9}
  # The modes alternate within each repeat (compute, input, then every prefetch mode), so that
  # a drift of the machine's speed falls on all of them alike; each figure is the median of
  # its mode's repeats.
  modes = {"compute_ms": lambda: loop(iter(placed * FLAGS.steps), FLAGS.steps, 1),
           "input_alone_ms": lambda: _time_iter(slow_batches(FLAGS.steps), FLAGS.steps)}
  for every in map(int, FLAGS.read_every):
    for size in (0, 2):
      modes[f"read_every_{every}_prefetch_{size}_ms"] = functools.partial(
          prefetched, size, every)
  times = {name: [] for name in modes}
  for _ in range(FLAGS.repeats):
    for name, run in modes.items():
      times[name].append(run())
  results.update({name: 1000 * statistics.median(t) for name, t in times.items()})
  c, i = results["compute_ms"], results["input_alone_ms"]
  print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in results.items()}))
  print("\n| mode | ms/step | / max(input, compute) | / (input + compute) |\n|---|---|---|---|")
  print(f"| compute alone | {c:.1f} | | |\n| input alone | {i:.1f} | | |")
  for every in map(int, FLAGS.read_every):
    for size in (0, 2):
      t = results[f"read_every_{every}_prefetch_{size}_ms"]
      use = flops.utilisation(results["gflop_per_step"] * 1e9, 1000 / t, kind, FLAGS.dtype)
      rate = (f"; {use['tflops_per_device']:.3g} TFLOP/s" if use else "") + (
          f", MFU {100 * use['mfu']:.1f}%" if "mfu" in use else "")
      print(f"| loss read every {every}, device_prefetch {size}{rate} | {t:.1f} | "
            f"{t / max(i, c):.2f} | {t / (i + c):.2f} |")


def _time_iter(it, n):
  start = time.perf_counter()
  for _ in range(n):
    next(it)
  return (time.perf_counter() - start) / n


if __name__ == "__main__":
  app.run(main)
