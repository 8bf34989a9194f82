"""The paper's datasets as TFDS datasets, built once from the files a user has (manual download).

One builder per dataset: Flickr30k and MSCOCO (Karpathy splits; MSCOCO keeps `restval` as its
own split, trained on with `train`), CUHK-PEDES (`reid_raw.json`) and the built-in synthetic
scenes. Every builder writes the same features, one record per image, in the order of the
source file (no shuffling: record k of a split is its k-th image, so a reader that wants element
k of a stream computes which record that is, and reads only it):

  image           the image file's bytes as stored (JPEG or PNG, never re-encoded)
  image/filename  its path under the dataset's image folder
  image/id        the JSON's `cocoid`, else `imgid` (Karpathy); the entry's index (CUHK-PEDES)
  group/id        what the class is made from: the image id, or the person `id` on CUHK-PEDES
  label           the instance-loss class within the split: the image's index (Karpathy), the
                  person's index in order of first appearance (CUHK-PEDES), as the JSON readers
                  in data/records.py number them. MSCOCO's restval counts from 0 in its split.
  captions/text   every caption's raw text
  captions/tokens the same caption's tokens as the JSON readers make them, joined by spaces (the
                  Karpathy `tokens`, lower-cased), so a vocabulary built from either is the same

Each builder has two configs: `images` (every feature) and `captions` (all but the image, a few
MB), so that a reader gets a split's captions and labels, which it needs whole (the vocabulary,
the caption index, mined negatives), without reading its images; the images it then reads by
record number.

`data/prepare.py` runs a builder into a local or gs:// data_dir in the ArrayRecord format.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
# TensorFlow Datasets (and with it TensorFlow) is imported by this module only: the JSON readers
# and the pipeline do not need it.
import tensorflow_datasets as tfds

from instance_loss_jax import paths
from instance_loss_jax.data import records, tfds_source
from instance_loss_jax.errors import DataError

# Two configs of each dataset, record k of a split the same image in both (their names and the
# version: in tfds_source.py, which reads them without importing TFDS).
IMAGES, CAPTIONS, DATASET_VERSION = tfds_source.IMAGES, tfds_source.CAPTIONS, tfds_source.VERSION
SOURCES = tfds_source.SOURCES
CONFIGS = (CAPTIONS, IMAGES)  # in the order prepare.py builds them
DOCS = "docs/data.md"


@dataclasses.dataclass(frozen=True)
class Image:
  """One image of a split and its captions, before the bytes are read."""
  filename: str
  image_id: int
  group_id: int
  label: int
  captions: tuple[tuple[str, tuple[str, ...]], ...]  # (raw text, tokens)


def _karpathy(data: Any, where: str, splits: tuple[str, ...]) -> dict[str, list[Image]]:
  out = {s: [] for s in splits}
  for i, image in enumerate(records.field(data, "images", where)):
    at = f"{where}: images[{i}]"
    split = records.field(image, "split", at)
    if split not in out:
      raise DataError(f"{at}: split '{split}' is not one of {', '.join(splits)}")
    image_id = int(image.get("cocoid", image.get("imgid", i)))
    out[split].append(Image(records.karpathy_file(image, at), image_id, image_id,
                            len(out[split]), tuple(records.karpathy_captions(image, at))))
  return out


def _cuhk_pedes(data: Any, where: str, splits: tuple[str, ...]) -> dict[str, list[Image]]:
  if not isinstance(data, list):
    raise DataError(f"{where}: expected a list of entries")
  out = {s: [] for s in splits}
  labels = {s: {} for s in splits}
  for i, entry in enumerate(data):
    at = f"{where}: [{i}]"
    split = records.field(entry, "split", at)
    if split not in out:
      raise DataError(f"{at}: split '{split}' is not one of {', '.join(splits)}")
    person = int(records.field(entry, "id", at))
    label = labels[split].setdefault(person, len(labels[split]))
    captions = tuple((c, records.tokenize(c)) for c in records.field(entry, "captions", at))
    out[split].append(Image(records.field(entry, "file_path", at), i, person, label, captions))
  return out


def image_folder(dataset: str, manual_dir: str) -> str:
  folder = SOURCES[dataset].image_folder
  return paths.join(manual_dir, folder) if folder else os.fspath(manual_dir)


def read_manual_dir(dataset: str, manual_dir: str) -> dict[str, list[Image]]:
  """The images of every split, after checking that each image file is there.

  A missing annotation file or image raises one DataError line: the first missing file, and
  how many are missing, so a half-copied dataset is found before anything is written.
  """
  source = SOURCES[dataset]
  json_path = paths.join(manual_dir, source.json)
  if not paths.path(json_path).is_file():
    raise DataError(f"manual_dir {manual_dir}: {source.json} not found (the {dataset} "
                    f"annotation file; {DOCS} says where it comes from)")
  data = paths.read_json(json_path, DataError)
  read = _karpathy if source.kind == "karpathy" else _cuhk_pedes
  splits = read(data, json_path, source.splits)
  empty = [s for s, images in splits.items() if not images]
  if empty:
    raise DataError(f"{json_path}: no images in split(s) {', '.join(empty)}")
  folder = image_folder(dataset, manual_dir)
  exists = os.path.isfile if not paths.is_remote(folder) else lambda p: paths.path(p).is_file()
  wanted = [image.filename for images in splits.values() for image in images]
  missing = [f for f in wanted if not exists(os.path.join(folder, f))]
  if missing:
    raise DataError(f"manual_dir {manual_dir}: {len(missing)} of {len(wanted)} image files "
                    f"missing, the first: {os.path.join(folder, missing[0])}")
  return splits


def _features(with_image: bool) -> tfds.features.FeaturesDict:
  features = {
      "image/filename": tfds.features.Text(),
      "image/id": np.int64,
      "group/id": np.int64,
      "label": np.int64,
      "captions": tfds.features.Sequence(
          {"text": tfds.features.Text(), "tokens": tfds.features.Text()}),
  }
  if with_image:  # any encoding: the stored bytes are kept, decoded (JPEG or PNG) when read
    features["image"] = tfds.features.Image(shape=(None, None, 3))
  return tfds.features.FeaturesDict(features)


class _CaptionedImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """What the four builders share: only `DATASET` (a key of SOURCES) differs."""
  DATASET = ""
  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {DATASET_VERSION: "Records in source order; image bytes as stored."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name=IMAGES, description="Every feature, the image's bytes too."),
      tfds.core.BuilderConfig(
          name=CAPTIONS, description="Every feature but the image, record for record the same: "
          "a reader loads a split's captions and labels without reading its images."),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    source = SOURCES[self.DATASET]
    return tfds.core.DatasetInfo(
        builder=self, features=_features(self.builder_config.name == IMAGES),
        disable_shuffling=True,
        description=(f"{self.DATASET} for instance_loss_jax, built from {source.json} "
                     f"(splits: {', '.join(source.splits)}); see {DOCS}."))

  # read_manual_dir's result when the caller has it already (data/prepare.py checks the files
  # before TFDS starts, then builds two configs): the JSON is parsed and the files listed once.
  manual_splits = None

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    splits = self.manual_splits or read_manual_dir(self.DATASET, manual_dir)
    folder = image_folder(self.DATASET, manual_dir)
    return {name: self._generate_examples(folder, images) for name, images in splits.items()}

  def _generate_examples(self, folder, images):
    with_image = self.builder_config.name == IMAGES
    for k, image in enumerate(images):
      example = {
          "image/filename": image.filename,
          "image/id": image.image_id,
          "group/id": image.group_id,
          "label": image.label,
          "captions": {"text": [raw for raw, _ in image.captions],
                       "tokens": [" ".join(tokens) for _, tokens in image.captions]},
      }
      if with_image:
        example["image"] = paths.path(os.path.join(folder, image.filename)).read_bytes()
      yield k, example


class Flickr30kKarpathy(_CaptionedImages):
  """Flickr30k with the splits of a Karpathy JSON (5 captions per image)."""
  name = "flickr30k_karpathy"
  DATASET = "flickr30k"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "manual_dir holds dataset_flickr30k.json (Karpathy's splits) and flickr30k-images/ "
      f"(the Flickr30k images, from the dataset's authors on request). {DOCS}")


class MscocoKarpathy(_CaptionedImages):
  """MSCOCO 2014 with Karpathy's splits: train 82,783, restval 30,504, val and test 5,000."""
  name = "mscoco_karpathy"
  DATASET = "mscoco"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "manual_dir holds dataset_coco.json (Karpathy's splits), train2014/ and val2014/ (the "
      f"COCO 2014 images). {DOCS}")


class CuhkPedes(_CaptionedImages):
  """CUHK-PEDES person descriptions: a class is a person (11,003 training identities)."""
  name = "cuhk_pedes"
  DATASET = "cuhk_pedes"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "manual_dir holds reid_raw.json and imgs/ (the CUHK-PEDES release, from its authors on "
      f"request). {DOCS}")


class SyntheticScenes(_CaptionedImages):
  """The built-in synthetic scenes (`python -m instance_loss_jax.cli.synthetic`)."""
  name = "synthetic_scenes"
  DATASET = "synthetic"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "manual_dir is a directory the project's synthetic generator wrote (dataset.json and "
      f"images/). {DOCS}")


BUILDERS = {b.DATASET: b for b in (Flickr30kKarpathy, MscocoKarpathy, CuhkPedes,
                                   SyntheticScenes)}
