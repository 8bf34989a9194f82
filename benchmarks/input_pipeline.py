r"""Training input pipeline throughput on realistic JPEGs (about 500x375), per CPU core.

    python benchmarks/input_pipeline.py [--num_files=256] [--batches=40]

Writes JPEGs of smooth random scenes (so they compress like photos), then times the training
pipeline (decode + crop + resize to 224 + flip + normalise + caption choice + position shift)
once with one tf.data thread and once with every core.
"""

import argparse
import os
import tempfile
import time

import numpy as np
import tensorflow as tf
from PIL import Image

from instance_loss_jax.config import base_config
from instance_loss_jax.data import pipeline, records
from instance_loss_jax.data.vocab import Vocabulary


def write_jpegs(directory, count, rng):
  paths = []
  for i in range(count):
    small = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
    noise = rng.integers(-12, 12, (375, 500, 3))
    image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
    path = os.path.join(directory, f"{i}.jpg")
    image.save(path, quality=90)
    paths.append(path)
  return paths


def images_per_second(split, config, threads, batches):
  ds = pipeline.train_dataset(split, config, num_devices=1)
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  options.autotune.cpu_budget = threads
  ds = ds.with_options(options)
  iterator = iter(ds)
  for _ in range(5):  # warm-up
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * config.batch_size / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--num_files", type=int, default=256)
  parser.add_argument("--batches", type=int, default=40)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  config = base_config()
  config.batch_size = 32
  with tempfile.TemporaryDirectory() as tmp:
    paths = write_jpegs(tmp, args.num_files, rng)
    words = tuple(f"w{i}" for i in range(100))
    recs = [records.Record(p, tuple(tuple(rng.choice(words, 12)) for _ in range(5)), i, "train")
            for i, p in enumerate(paths)]
    split = pipeline.encode_split(recs, Vocabulary(words), config.model.text.max_len, True)
    one = images_per_second(split, config, 1, args.batches)
    cores = os.cpu_count()
    every = images_per_second(split, config, cores, args.batches)
  print(f"500x375 JPEG -> 224x224 train pipeline: {one:.1f} images/s with 1 thread; "
        f"{every:.1f} images/s with {cores} threads ({every / cores:.1f} per core)")


if __name__ == "__main__":
  main()
