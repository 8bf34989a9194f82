r"""Reading a prepared dataset's images by record number: our reader (tfds_source.Readers, over
ArrayRecord's data source) against TFDS's own (`tfds.builder_from_directory(...).as_data_source`,
the image left encoded with `tfds.decode.SkipDecoding`), on local disk and on gs:// (the storage
emulator of tests/, through ArrayRecord's GCS client and gcsfs).

    python benchmarks/tfds_reader.py --images=1024 --gcs_reads=256

The data: `--images` Flickr30k-sized JPEGs (`prepare_speed.make_flickr30k_like`), prepared with
`data.prepare` into 2 shards per split. Each reader reads the training split's encoded images in
one random order (as a shuffled epoch does), alternately `--repeats` times; medians reported.
"Open" is the time to the first image of a fresh reader (the info files read, the shards
opened), then images/s over the rest. The bytes both give are checked equal.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks"), os.path.join(ROOT, "tests")]

flags.DEFINE_integer("images", 1024, "images in the fake Flickr30k (80% train)")
flags.DEFINE_string("out", "/tmp/tfds_reader", "working folder")
flags.DEFINE_integer("repeats", 3, "reads of the split per reader and store (medians reported)")
flags.DEFINE_integer("gcs_reads", 256, "images read per repeat on the emulator (0: no gs://)")

NAME = "flickr30k_karpathy"


@contextlib.contextmanager
def emulator():
  """The storage emulator of tests/ on a free port, with its clients' environment."""
  # pylint: disable=g-import-not-at-top
  from gcs_emulator import launch
  from helpers import free_port
  proc, url = launch(free_port(), "bench")
  os.environ.update({"STORAGE_EMULATOR_HOST": url, "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
                     "GOOGLE_CLOUD_PROJECT": "test"})
  try:
    yield "gs://bench/tfds"
  finally:
    proc.terminate()
    proc.wait(timeout=30)


def main(argv):
  del argv
  f = flags.FLAGS
  # Read once per process by etils/google-auth/gcsfs: gs:// through gcsfs (TensorFlow's GCS
  # client has no endpoint setting), as tests/conftest.py sets them.
  os.environ.update({"EPATH_USE_TF": "false", "NO_GCE_CHECK": "true",
                     "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"})
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from prepare_speed import make_flickr30k_like  # pylint: disable=g-import-not-at-top
  from instance_loss_jax.data import prepare, tfds_source  # pylint: disable=g-import-not-at-top

  manual, local = os.path.join(f.out, "manual"), os.path.join(f.out, "tfds")
  if not prepare.is_prepared("flickr30k", local):
    make_flickr30k_like(manual, f.images)
    prepare.prepare("flickr30k", manual, local, num_shards=2)

  def ours(data_dir):
    # An image is named by its reference (as the pipeline names it), parsed at every read.
    readers = tfds_source.Readers()
    return lambda k: readers.image_bytes(tfds_source.image_ref(data_dir, NAME, "train", k, ""))

  def theirs(data_dir):
    builder = tfds.builder_from_directory(
        tfds_source.version_dir(data_dir, NAME, tfds_source.IMAGES))
    source = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    return lambda k: source[k]["image"]

  readers = {"ours (Readers)": ours, "TFDS (as_data_source)": theirs}

  def measure(data_dir, count):
    n = len(tfds_source.read_split(local, NAME, ("train",)))
    order = np.random.default_rng(0).permutation(n)[:count]
    runs = {name: {"images_per_s": [], "open_s": []} for name in readers}
    for _ in range(f.repeats):
      got = {}
      for name, open_reader in readers.items():  # alternated: drift hits both alike
        start = time.perf_counter()
        read = open_reader(data_dir)
        first = read(order[0])
        runs[name]["open_s"].append(time.perf_counter() - start)
        start = time.perf_counter()
        got[name] = [first] + [read(k) for k in order[1:]]
        runs[name]["images_per_s"].append((len(order) - 1) / (time.perf_counter() - start))
      first, second = got.values()
      assert [bytes(x) for x in first] == [bytes(x) for x in second], "the readers disagree"
    out = {name: {k: round(statistics.median(v), 4 if k == "open_s" else 1)
                  for k, v in r.items()} for name, r in runs.items()}
    a, b = (out[name] for name in readers)
    out["TFDS / ours"] = {k: round(b[k] / a[k], 3) for k in a}
    out["runs"] = {name: {k: [round(x, 4) for x in v] for k, v in r.items()}
                   for name, r in runs.items()}
    return out

  n_train = len(tfds_source.read_split(local, NAME, ("train",)))
  results = {"local": measure(local, n_train)}
  if f.gcs_reads:
    with emulator() as store:
      os.makedirs(os.path.join(f.out, "staging"), exist_ok=True)
      prepare.prepare("flickr30k", manual, store, num_shards=2,
                      staging_dir=os.path.join(f.out, "staging"))
      results["gs:// (emulator)"] = measure(store, min(f.gcs_reads, n_train))
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  app.run(main)
