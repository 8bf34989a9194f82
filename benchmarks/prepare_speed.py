r"""How long `data.prepare` takes, and how big the prepared dataset is, on Flickr30k-like files.

    python benchmarks/prepare_speed.py --images=2000 --out=/tmp/prepare_bench

Writes `--images` JPEGs of 500x375 (Flickr30k's usual size; smooth colour fields with noise, so
they compress about as photographs do: ~60-130 KB at quality 90) with five captions each into
a Flickr30k manual_dir (dataset_flickr30k.json, flickr30k-images/; 80/10/10% splits), then runs
`prepare` once into a fresh local data_dir. Reports the source's bytes (images + JSON), the
prepared dataset's bytes and their ratio, the time, images/s, and the time against reading
every source file once in the same process (from the page cache: the files were just written). `make_flickr30k_like` is also
the fixture of the pipeline benchmarks that read the prepared records.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import numpy as np
from absl import app, flags
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)



def define_flags():
  """The script's flags, defined when it runs (importing it for make_flickr30k_like does not)."""
  flags.DEFINE_integer("images", 2000, "images in the fake Flickr30k")
  flags.DEFINE_string("out", "/tmp/prepare_bench", "working folder (manual/ and tfds/ inside)")
  flags.DEFINE_integer("num_shards", 0, "files per split (0: TFDS's choice)")


def make_flickr30k_like(manual_dir: str, num_images: int, seed: int = 0) -> int:
  """A Flickr30k manual_dir of `num_images` 500x375 JPEGs; returns the bytes written."""
  rng = np.random.default_rng(seed)
  folder = os.path.join(manual_dir, "flickr30k-images")
  os.makedirs(folder, exist_ok=True)
  yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
  images, total = [], 0
  for i in range(num_images):
    a, b, c = rng.uniform(-1, 1, (3, 3))
    field = np.stack([128 + 100 * np.sin(a[k] * xx / 60 + b[k] * yy / 45 + c[k] * 3)
                      for k in range(3)], -1)
    pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
    name = f"{1000000 + i}.jpg"
    Image.fromarray(pixels).save(os.path.join(folder, name), "JPEG", quality=90)
    total += os.path.getsize(os.path.join(folder, name))
    split = "test" if i % 10 == 0 else "val" if i % 10 == 1 else "train"
    sentences = [dict(tokens=f"a picture number {i} caption {j}".split(),
                      raw=f"A picture number {i}, caption {j}.", imgid=i, sentid=5 * i + j)
                 for j in range(5)]
    images.append(dict(filename=name, imgid=i, split=split, sentences=sentences))
  path = os.path.join(manual_dir, "dataset_flickr30k.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(dict(images=images, dataset="flickr30k"), f)
  return total + os.path.getsize(path)


def main(argv):
  del argv
  from instance_loss_jax.data import prepare  # pylint: disable=g-import-not-at-top  (TensorFlow)
  f = flags.FLAGS
  manual, data_dir = os.path.join(f.out, "manual"), os.path.join(f.out, "tfds")
  shutil.rmtree(f.out, ignore_errors=True)
  source_bytes = make_flickr30k_like(manual, f.images)
  # The reference, in the same process: reading every source file once (as the builder must).
  start = time.perf_counter()
  for dirpath, _, names in os.walk(manual):
    for name in names:
      with open(os.path.join(dirpath, name), "rb") as fh:
        fh.read()
  read_seconds = time.perf_counter() - start
  start = time.perf_counter()
  done = prepare.prepare("flickr30k", manual, data_dir, f.num_shards)
  seconds = time.perf_counter() - start
  result = dict(images=f.images, source_mib=round(source_bytes / 2**20, 1),
                prepared_mib=round(done.bytes / 2**20, 1),
                ratio=round(done.bytes / source_bytes, 4), files=done.files,
                seconds=round(seconds, 2), images_per_s=round(f.images / seconds, 1),
                read_seconds=round(read_seconds, 3), vs_read=round(seconds / read_seconds, 1))
  print(done.table())
  print(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  app.run(main)
