r"""The training pipeline reading a prepared TFDS dataset (ArrayRecord) against the image folder.

    python benchmarks/tfds_pipeline.py --images=1024 --out=/tmp/tfds_pipeline

One process, the same data both ways: `--images` Flickr30k-sized JPEGs (500x375, quality 90;
`prepare_speed.make_flickr30k_like`) with a Karpathy JSON, and the same prepared with
`instance_loss_jax.cli.prepare` (one shard per split). For each form, alternately, `--repeats`
times (medians reported):

- images/s of `pipeline.train_dataset` (read, decode-and-crop, resize to 224, flip, normalise,
  caption choice, position shift; batches of 32) with 1 tf.data thread and with every core,
  `--batches` batches after 5 of warm-up;
- the time to the first batch of a stream resumed at step `--resume_step` (building the
  dataset included: what a restarted job waits for before its first step).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

flags.DEFINE_integer("images", 1024, "images in the fake Flickr30k (80% train)")
flags.DEFINE_string("out", "/tmp/tfds_pipeline", "working folder")
flags.DEFINE_integer("batches", 30, "measured batches per run")
flags.DEFINE_integer("repeats", 3, "runs per form and thread count (medians reported)")
flags.DEFINE_integer("resume_step", 100_000, "the step a resumed stream starts at")


def main(argv):
  del argv
  # Imported here: TensorFlow after absl has parsed the flags.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from prepare_speed import make_flickr30k_like  # pylint: disable=g-import-not-at-top
  from instance_loss_jax.config import base_config  # pylint: disable=g-import-not-at-top
  from instance_loss_jax.data import pipeline, prepare, records  # pylint: disable=g-import-not-at-top
  from instance_loss_jax.data.vocab import Vocabulary  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  manual, data_dir = os.path.join(f.out, "manual"), os.path.join(f.out, "tfds")
  if not prepare.is_prepared("flickr30k", data_dir):
    make_flickr30k_like(manual, f.images)
    prepare.prepare("flickr30k", manual, data_dir, num_shards=1)
  configs = {}
  for form in ("folder", "tfds"):
    c = base_config()
    c.batch_size = 32
    if form == "folder":
      c.data.json = os.path.join(manual, "dataset_flickr30k.json")
      c.data.image_root = os.path.join(manual, "flickr30k-images")
    else:
      c.data.format, c.data.tfds_data_dir, c.data.tfds_name = "tfds", data_dir, "flickr30k_karpathy"
    configs[form] = c
  recs = {form: records.read_split(c, "train") for form, c in configs.items()}
  vocab = Vocabulary(tuple(sorted({w for r in recs["folder"] for cap in r.captions for w in cap})))
  splits = {form: pipeline.encode_split(recs[form], vocab, c.model.text.max_len, True)
            for form, c in configs.items()}

  def rate(form, threads):
    ds = pipeline.train_dataset(splits[form], configs[form], num_devices=1)
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.autotune.cpu_budget = threads
    iterator = iter(ds.with_options(options))
    for _ in range(5):
      next(iterator)
    start = time.perf_counter()
    for _ in range(f.batches):
      next(iterator)
    return f.batches * 32 / (time.perf_counter() - start)

  def first_batch(form):
    start = time.perf_counter()
    next(iter(pipeline.train_dataset(splits[form], configs[form], num_devices=1,
                                     start_step=f.resume_step)))
    return time.perf_counter() - start

  cores = os.cpu_count()
  results = {form: {"1": [], str(cores): [], "first_batch_s": []} for form in configs}
  for _ in range(f.repeats):
    for form in configs:  # alternated, so drift in the machine's speed hits both alike
      results[form]["first_batch_s"].append(first_batch(form))
      for threads in (1, cores):
        results[form][str(threads)].append(rate(form, threads))
  summary = {form: {k: round(statistics.median(v), 3 if k == "first_batch_s" else 1)
                    for k, v in r.items()} for form, r in results.items()}
  summary["tfds / folder"] = {k: round(summary["tfds"][k] / summary["folder"][k], 3)
                              for k in summary["tfds"]}
  summary["runs"] = {form: {k: [round(x, 3) for x in v] for k, v in r.items()}
                     for form, r in results.items()}
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  app.run(main)
