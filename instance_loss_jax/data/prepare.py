r"""Prepare one dataset as a TFDS dataset in the ArrayRecord format, to a local or gs:// data_dir.

    python -m instance_loss_jax.cli.prepare --dataset=flickr30k|mscoco|cuhk_pedes|synthetic \
        --manual_dir=DIR_WITH_THE_FILES --data_dir=LOCAL_OR_GS_DIR

(this module is the binary's library).

ArrayRecord gives random access: a host reads record k of a split without the ones before it.
Its writer writes local files only, so for an object store the dataset is built in a local
staging folder and then uploaded, `dataset_info.json` last: TFDS treats a version folder without
it as not prepared, so an upload cut short is never read as a dataset. On a local disk TFDS
builds in a temporary `incomplete.*` folder and renames it when done, and deletes it on failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile
import time

import tensorflow_datasets as tfds

from instance_loss_jax import paths
from instance_loss_jax.data import tfds_datasets, tfds_source
from instance_loss_jax.errors import DataError

INFO_FILE = "dataset_info.json"  # TFDS writes it last; its presence means "prepared"
# Beside the two configs: what the dataset was prepared from (`source_record`), compared with the
# files at hand each time the prepared dataset would be reused.
SOURCE_FILE = "source.json"


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What was written (or found already prepared)."""
  path: str  # <data_dir>/<TFDS name>, holding the two configs' version folders
  splits: dict[str, tuple[int, int, int]]  # split -> the images config's (records, shards, bytes)
  files: int
  bytes: int
  seconds: float
  reused: bool

  def table(self) -> str:
    rows = [f"| {s} | {n:,} | {k} | {b / 2**20:,.1f} |" for s, (n, k, b) in self.splits.items()]
    total = sum(n for n, _, _ in self.splits.values())
    shards = sum(k for _, k, _ in self.splits.values())
    size = sum(b for _, _, b in self.splits.values())
    return "\n".join(["| split | images | shards | MiB of records |", "|---|---:|---:|---:|",
                      *rows, f"| all | {total:,} | {shards} | {size / 2**20:,.1f} |"])


def dataset_dir(dataset: str, data_dir: str) -> str:
  return paths.join(data_dir, tfds_datasets.SOURCES[dataset].builder)


def version_dir(dataset: str, data_dir: str, config: str = tfds_datasets.IMAGES) -> str:
  """<data_dir>/<TFDS name>/<config>/<version>: TFDS's layout."""
  return tfds_source.version_dir(data_dir, tfds_datasets.SOURCES[dataset].builder, config)


def _built(folder: str) -> bool:
  return paths.path(paths.join(folder, INFO_FILE)).is_file()


def is_prepared(dataset: str, data_dir: str) -> bool:
  return all(_built(version_dir(dataset, data_dir, c)) for c in tfds_datasets.CONFIGS)


def split_sizes(folder: str) -> dict[str, tuple[int, int, int]]:
  """split -> (records, shards, bytes), from TFDS's info file (through our path layer)."""
  info = paths.read_json(paths.join(folder, INFO_FILE), DataError)
  return {s["name"]: (sum(int(n) for n in s["shardLengths"]), len(s["shardLengths"]),
                      int(s.get("numBytes", 0))) for s in info["splits"]}


def _summary(dataset: str, data_dir: str, seconds: float, reused: bool) -> Prepared:
  files = [f for c in tfds_datasets.CONFIGS
           for f in paths.path(version_dir(dataset, data_dir, c)).iterdir()]
  return Prepared(dataset_dir(dataset, data_dir), split_sizes(version_dir(dataset, data_dir)),
                  len(files), sum(f.stat().length for f in files), seconds, reused)


def source_record(dataset: str, manual_dir: str, splits) -> dict:
  """What a prepared dataset is made of: its annotation file's SHA-256, and the count and total
  size of its image files (`splits`: read_manual_dir's)."""
  source = tfds_datasets.SOURCES[dataset]
  annotation = paths.path(paths.join(manual_dir, source.json)).read_bytes()
  folder = tfds_datasets.image_folder(dataset, manual_dir)
  size = (os.path.getsize if not paths.is_remote(folder)
          else lambda p: paths.path(p).stat().length)
  files = [os.path.join(folder, image.filename) for images in splits.values()
           for image in images]
  return dict(annotation=source.json, sha256=hashlib.sha256(annotation).hexdigest(),
              images=len(files), image_bytes=int(sum(size(f) for f in files)))


def _check_source(dataset: str, manual_dir: str, data_dir: str) -> None:
  """Refuses to reuse a prepared dataset whose recorded source differs from manual_dir's files
  (a dataset prepared before records were kept is reused as it is)."""
  recorded_file = paths.path(paths.join(dataset_dir(dataset, data_dir), SOURCE_FILE))
  if not recorded_file.is_file():
    return
  recorded = json.loads(recorded_file.read_text())
  now = source_record(dataset, manual_dir, tfds_datasets.read_manual_dir(dataset, manual_dir))
  if now != recorded:
    changed = [f"{k} {recorded.get(k)!r} then, {now[k]!r} now" for k in now
               if recorded.get(k) != now[k]]
    raise DataError(f"{dataset_dir(dataset, data_dir)} was prepared from other files than "
                    f"{manual_dir} holds ({'; '.join(changed)}): prepare again with "
                    "--overwrite to rebuild it from them")


def _upload(local_folder: str, remote_folder: str) -> None:
  """Copies a finished version folder, streaming each file; the info file goes last."""
  remote = paths.path(remote_folder)
  if remote.exists():  # what an earlier upload left unfinished: no info file, so not a dataset
    remote.rmtree()
  names = sorted(os.listdir(local_folder), key=lambda n: (n == INFO_FILE, n))
  for name in names:
    _copy(os.path.join(local_folder, name), remote / name)


def _copy(local_file: str, remote_file) -> None:
  with open(local_file, "rb") as src, remote_file.open("wb") as dst:
    shutil.copyfileobj(src, dst, length=16 << 20)


def prepare(dataset: str, manual_dir: str, data_dir: str, num_shards: int = 0,
            staging_dir: str | None = None, overwrite: bool = False) -> Prepared:
  """Builds `dataset` from `manual_dir` into `data_dir` (once: a prepared one is reused, if it
  was prepared from the same files; else refused, unless `overwrite`, which removes it first).

  num_shards: files per split (0: TFDS's choice, about one per GiB). staging_dir: where a
  gs:// data_dir's dataset is built before the upload (default: the system's temporary folder;
  it needs the dataset's size free).
  """
  if dataset not in tfds_datasets.BUILDERS:
    raise ValueError(f"dataset {dataset!r}: one of {', '.join(tfds_datasets.BUILDERS)}")
  start = time.perf_counter()
  target = paths.path(dataset_dir(dataset, data_dir))
  splits = None
  if overwrite and target.exists():
    splits = tfds_datasets.read_manual_dir(dataset, manual_dir)  # there before the old goes
    target.rmtree()
  if is_prepared(dataset, data_dir):
    _check_source(dataset, manual_dir, data_dir)
    return _summary(dataset, data_dir, time.perf_counter() - start, reused=True)
  # Before TFDS creates anything: a missing file is reported with nothing written.
  splits = splits or tfds_datasets.read_manual_dir(dataset, manual_dir)
  record = source_record(dataset, manual_dir, splits)
  smallest = min(splits, key=lambda s: len(splits[s]))
  if num_shards > len(splits[smallest]):
    raise DataError(f"num_shards={num_shards}: more than the {len(splits[smallest])} images of "
                    f"split '{smallest}'")
  remote = paths.is_remote(data_dir)
  with tempfile.TemporaryDirectory(prefix="prepare-", dir=staging_dir) as staging:
    build_dir = os.path.join(staging, "data") if remote else data_dir
    for config in tfds_datasets.CONFIGS:  # the small captions first
      if _built(version_dir(dataset, data_dir, config)):  # an earlier run did it
        continue
      builder = tfds_datasets.BUILDERS[dataset](config=config, data_dir=build_dir,
                                                file_format="array_record")
      builder.manual_splits = splits
      # TFDS prints "Downloading and preparing dataset Unknown size ..." and "Dataset ...
      # downloaded and prepared" to stdout although nothing is downloaded; the binary prints its
      # own summary. (Its progress bars, on stderr, stay.)
      with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(
            download_dir=os.path.join(staging, "downloads"),  # nothing is downloaded
            download_config=tfds.download.DownloadConfig(
                manual_dir=manual_dir,
                num_shards=(num_shards or None) if config == tfds_datasets.IMAGES else None,
                compute_stats=tfds.download.ComputeStatsMode.SKIP))
      if remote:
        _upload(version_dir(dataset, build_dir, config), version_dir(dataset, data_dir, config))
  paths.write_text(paths.join(dataset_dir(dataset, data_dir), SOURCE_FILE),
                   json.dumps(record, indent=1))
  return _summary(dataset, data_dir, time.perf_counter() - start, reused=False)
