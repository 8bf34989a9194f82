"""Prepared TFDS datasets (data/prepare.py), read by record number with ArrayRecord's reader.

A split's captions and labels come whole from the small `captions` config; an image is read
only when the pipeline needs it, from the `images` config, by its record number. An image is
named by a string, as a file is by its path, so every consumer (the tf.data pipelines, the
evaluation's HTML page, export and search) takes both:

    <data_dir>/<name>/images/<version>#<split>/<record>/<filename>

ArrayRecord's reader opens local files and gs:// objects itself (Riegeli's GCS reader, through
google-cloud-cpp: `CLOUD_STORAGE_EMULATOR_ENDPOINT` points it at an emulator); the dataset's two
JSON files are read through our path layer. TensorFlow's own GCS client is not used.

Why not TFDS's own `builder_from_directory(...).as_data_source(split)`: it reads the same records
through the same ArrayRecord reader, then decodes every feature in Python; reading encoded
images by record it ran at half our rate (benchmarks/RESULTS.md, "Our record reader against
TFDS's own data source"). The tests read the records back with it, as an independent reference.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from typing import Any

from instance_loss_jax import paths
from instance_loss_jax.errors import DataError

IMAGES, CAPTIONS = "images", "captions"  # the configs; data/tfds_datasets.py builds both
VERSION = "1.0.0"
_REF = re.compile(r"^(?P<dir>.+)#(?P<split>[\w-]+)/(?P<k>\d+)/(?P<filename>.*)$")


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a dataset's files sit in its manual_dir."""
  builder: str  # the TFDS dataset name
  json: str  # the annotation file
  image_folder: str  # the folder the annotation's image paths start from ("": manual_dir)
  splits: tuple[str, ...]
  kind: str  # "karpathy" or "cuhk_pedes"


SOURCES = {
    "flickr30k": Source("flickr30k_karpathy", "dataset_flickr30k.json", "flickr30k-images",
                        ("train", "val", "test"), "karpathy"),
    "mscoco": Source("mscoco_karpathy", "dataset_coco.json", "",
                     ("train", "restval", "val", "test"), "karpathy"),
    "cuhk_pedes": Source("cuhk_pedes", "reid_raw.json", "imgs", ("train", "val", "test"),
                         "cuhk_pedes"),
    "synthetic": Source("synthetic_scenes", "dataset.json", "images", ("train", "val", "test"),
                        "karpathy"),
}


# Which --dataset of data/prepare.py writes each TFDS name.
_PREPARED_BY = {source.builder: dataset for dataset, source in SOURCES.items()}


def tfds_name(name: str) -> str:
  """The TFDS name of `name`, which may be prepare's --dataset key (synthetic ->
  synthetic_scenes) or the TFDS name itself."""
  return SOURCES[name].builder if name in SOURCES else name


def prepared_names(data_dir: str) -> list[str]:
  """The TFDS datasets prepared under `data_dir` (both configs' info files there)."""
  root = paths.path(data_dir)
  if not root.is_dir():
    return []
  return sorted(d.name for d in root.iterdir() if all(
      paths.path(paths.join(version_dir(data_dir, d.name, c), "dataset_info.json")).is_file()
      for c in (IMAGES, CAPTIONS)))


def version_dir(data_dir: str, name: str, config: str) -> str:
  return paths.join(data_dir, name, config, VERSION)


def _info(data_dir: str, name: str, config: str) -> dict:
  info_file = paths.join(version_dir(data_dir, name, config), "dataset_info.json")
  if not paths.path(info_file).is_file():
    dataset = _PREPARED_BY.get(name, "DATASET")
    there = prepared_names(data_dir)
    raise DataError(
        f"TFDS dataset {name} ({config}) is not prepared under data.tfds_data_dir={data_dir}: "
        f"no {info_file}. Prepare it with `python -m instance_loss_jax.cli.prepare "
        f"--dataset={dataset} --manual_dir=DIR_WITH_ITS_FILES --data_dir={data_dir}` "
        "(docs/data.md)" + (f"; prepared there: {', '.join(there)} (data.tfds_name)"
                            if there else ""))
  try:
    return json.loads(paths.path(info_file).read_text())
  except json.JSONDecodeError as e:
    raise DataError(f"{info_file}: not valid JSON ({e})") from None


def shard_files(data_dir: str, name: str, config: str, split: str, info=None) -> list[str]:
  """A split's record files in order (record k of the split is the k-th over them). `info`:
  the dataset_info.json's contents, if the caller has them."""
  info = info if info is not None else _info(data_dir, name, config)
  splits = {s["name"]: s for s in info["splits"]}
  if split not in splits:
    raise DataError(f"TFDS dataset {name} under {data_dir} has no split '{split}' (it has "
                    f"{', '.join(splits)})")
  count = len(splits[split]["shardLengths"])
  template = splits[split].get("filepathTemplate",
                               "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
  folder = version_dir(data_dir, name, config)
  return [paths.join(folder, template.format(
      DATASET=name, SPLIT=split, FILEFORMAT=info.get("fileFormat", "array_record"),
      SHARD_X_OF_Y=f"{i:05d}-of-{count:05d}", SHARD_INDEX=f"{i:05d}", NUM_SHARDS=f"{count:05d}"))
      for i in range(count)]


class Readers:
  """ArrayRecord's random-access readers of prepared splits, each opened once, and the datasets'
  info files, each read once: owned by what reads a dataset (a pipeline, a page, an index),
  and gone with it. Thread-safe: tf.data's threads read records through one."""

  def __init__(self):
    self._lock = threading.Lock()
    self._sources: dict[tuple[str, ...], Any] = {}
    self._infos: dict[tuple[str, str, str], dict] = {}
    self._splits: dict[tuple[str, str], Any] = {}  # (images folder, split) -> its reader

  def info(self, data_dir: str, name: str, config: str) -> dict:
    key = (data_dir, name, config)
    with self._lock:
      if key not in self._infos:
        self._infos[key] = _info(data_dir, name, config)
      return self._infos[key]

  def data_source(self, files: list[str]):
    """ArrayRecord's random-access reader over `files`."""
    key = tuple(files)
    with self._lock:
      if key not in self._sources:
        # Imported here: array_record's reader (C++, with its GCS client) only where a
        # prepared dataset is read.
        from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
        self._sources[key] = array_record_data_source.ArrayRecordDataSource(list(files))
      return self._sources[key]

  def split_source(self, folder: str, split: str):
    """The images of one split of an images config folder (<data_dir>/<name>/images/<version>),
    found once: every image read of the split looks it up here (the pipelines' hot path)."""
    source = self._splits.get((folder, split))  # a dict read: safe without the lock
    if source is None:
      name_dir = paths.path(folder).parent.parent
      data_dir, name = str(name_dir.parent), name_dir.name
      source = self.data_source(shard_files(data_dir, name, IMAGES, split,
                                            self.info(data_dir, name, IMAGES)))
      self._splits[(folder, split)] = source
    return source

  def record_of(self, ref: str) -> bytes:
    """The serialized example an image reference names (the image is its `image` feature).
    Called once per image read, from the pipelines' threads: the split's reader is looked up,
    not opened again."""
    m = _REF.match(ref)
    if m is None:
      raise DataError(f"{ref}: not a record of a prepared TFDS dataset")
    source = self.split_source(m["dir"], m["split"])
    k = int(m["k"])
    if k >= len(source):
      raise DataError(f"{ref}: split '{m['split']}' has {len(source)} records")
    return source[k]

  def image_bytes(self, ref: str) -> bytes:
    """The encoded image (as stored) of an image reference."""
    return _example(self.record_of(ref))["image"].bytes_list.value[0]

  def read_image(self, name: str) -> bytes:
    """An image's encoded bytes, by file path (local or gs://) or record reference."""
    return self.image_bytes(name) if is_image_ref(name) else paths.path(name).read_bytes()


def _example(serialized: bytes):
  # Imported here: TensorFlow's Example proto, for the readers of prepared datasets only.
  from tensorflow.core.example import example_pb2  # pylint: disable=g-import-not-at-top
  return example_pb2.Example.FromString(serialized).features.feature


def image_ref(data_dir: str, name: str, split: str, k: int, filename: str) -> str:
  return f"{version_dir(data_dir, name, IMAGES)}#{split}/{k}/{filename}"


def is_image_ref(name: str) -> bool:
  return _REF.match(name) is not None


def read_image(name: str) -> bytes:
  """An image's encoded bytes, by file path or record reference (a reader opened for it alone:
  one who reads many keeps a `Readers`)."""
  return Readers().read_image(name)


def read_split(data_dir: str, name: str, splits: tuple[str, ...], split_raw=None
               ) -> list[tuple[str, tuple[tuple[str, ...], ...], int]]:
  """(image reference, captions' tokens, label) of every image of `splits` (concatenated, in
  order; MSCOCO's training split: train and restval), from the captions config: the same tokens
  (the JSON readers') and labels as data/records.py's readers give. Labels number the classes
  (`group/id`: the image, or the person) in order of first appearance over the splits, as those
  readers do. `split_raw`: a tokenizer for the raw texts instead of the stored tokens."""
  out, labels = [], {}
  readers = Readers()
  for split in splits:
    files = shard_files(data_dir, name, CAPTIONS, split, readers.info(data_dir, name, CAPTIONS))
    readers.info(data_dir, name, IMAGES)  # the images must be there too
    source = readers.data_source(files)
    for k in range(len(source)):
      feature = _example(source[k])
      if split_raw is None:
        tokens = [t.decode("utf-8").split() for t in feature["captions/tokens"].bytes_list.value]
      else:
        tokens = [split_raw(t.decode("utf-8")) for t in feature["captions/text"].bytes_list.value]
      filename = feature["image/filename"].bytes_list.value[0].decode("utf-8")
      label = labels.setdefault(feature["group/id"].int64_list.value[0], len(labels))
      out.append((image_ref(data_dir, name, split, k, filename),
                  tuple(tuple(t) for t in tokens), label))
  if not out:
    raise DataError(f"TFDS dataset {name} under {data_dir}: split(s) {', '.join(splits)} empty")
  return out
