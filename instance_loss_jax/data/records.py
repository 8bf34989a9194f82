"""Dataset readers: Karpathy-split JSON (Flickr30k, MSCOCO), CUHK-PEDES; prepared TFDS datasets
through data/tfds_source.py.

Every reader returns `Record`s of one form. `label` is the instance-loss class: the image's index
within its split for Flickr30k/MSCOCO, the person's index (ids remapped to 0..K-1 per split) for
CUHK-PEDES. Captions are token lists, lower-cased.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Iterable, Sequence

from instance_loss_jax import paths
from instance_loss_jax.data import tfds_source
from instance_loss_jax.errors import DataError

SPLITS = ("train", "val", "test")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


@dataclasses.dataclass(frozen=True)
class Record:
  image_path: str
  captions: tuple[tuple[str, ...], ...]
  label: int
  split: str


def tokenize(text: str) -> tuple[str, ...]:
  """Lower-cased words and numbers, as the Karpathy `tokens` fields are."""
  return tuple(_WORD.findall(text.lower()))


def tokenizer(data) -> Callable[[str], tuple[str, ...]]:
  """How captions and queries are split into words, as `config.data.tokenizer` says: "words"
  (`tokenize`; a Karpathy JSON's own `tokens` where it has them), or "original", the authors'
  MATLAB preparation: strsplit on `data.original_delimiters` and spaces, runs of them collapsed,
  case kept (their dictionary is GoogleNews', which is case-sensitive)."""
  if data.tokenizer != "original":
    return tokenize
  pattern = re.compile("[" + re.escape(data.original_delimiters + " ") + "]+")
  return lambda text: tuple(t for t in pattern.split(text) if t)


def field(entry: dict[str, Any], key: str, where: str):
  if not isinstance(entry, dict) or key not in entry:
    raise DataError(f"{where}: missing field '{key}'")
  return entry[key]


def _labelled(path: str, items: Sequence[tuple[str, tuple, Any, str]], split: str,
              check_files: bool) -> list[Record]:
  """Records of one split; `items` are (image_path, captions, group key, where)."""
  group_ids: dict[Any, int] = {}
  records, missing = [], []
  for image_path, captions, group, where in items:
    # One request per image on an object store: there the pipeline names an unreadable file.
    if check_files and not paths.is_remote(image_path) and not os.path.isfile(image_path):
      missing.append(f"{where} ({image_path})")
    label = group_ids.setdefault(group, len(group_ids))
    records.append(Record(image_path, captions, label, split))
  if missing:
    raise DataError(f"{len(missing)} image file(s) of split '{split}' not found, e.g. "
                    + "; ".join(missing[:5]))
  if not records:
    raise DataError(f"{path}: split '{split}' is empty")
  return records


def read_karpathy(path: str, image_root: str, split: str, train_splits: Iterable[str] = ("train",),
                  check_files: bool = True, split_raw=None) -> list[Record]:
  """One split of a Karpathy JSON. `split="train"` takes every split in `train_splits` (MSCOCO:
  train + restval); each image is its own class. `split_raw`: a tokenizer for every sentence's
  `raw` text instead of its `tokens` (data.tokenizer="original")."""
  data = paths.read_json(path, DataError)
  images = field(data, "images", path)
  wanted = set(train_splits) if split == "train" else {split}
  items = []
  for i, image in enumerate(images):
    where = f"{path}: images[{i}]"
    if field(image, "split", where) not in wanted:
      continue
    captions = tuple(tokens for _, tokens in karpathy_captions(image, where, split_raw))
    items.append((os.path.join(image_root, karpathy_file(image, where)), captions, i, where))
  return _labelled(path, items, split, check_files)


def karpathy_file(image: dict[str, Any], where: str) -> str:
  """An image's path under the image root: `filepath/filename` (MSCOCO) or `filename`."""
  return os.path.join(image.get("filepath", ""), field(image, "filename", where))


def karpathy_captions(image: dict[str, Any], where: str,
                      split_raw=None) -> list[tuple[str, tuple[str, ...]]]:
  """(raw text, tokens) of each sentence: the JSON's `tokens` lower-cased, or the raw text
  tokenized where a sentence has none; with `split_raw`, the raw text split by it."""
  captions = []
  for j, sentence in enumerate(field(image, "sentences", where)):
    if split_raw is not None:
      raw = field(sentence, "raw", f"{where}.sentences[{j}]")
      captions.append((raw, tuple(split_raw(raw))))
      continue
    tokens = sentence.get("tokens") if isinstance(sentence, dict) else None
    raw = sentence.get("raw") if isinstance(sentence, dict) else None
    if tokens is None:
      raw = field(sentence, "raw", f"{where}.sentences[{j}]")
      tokens = tokenize(raw)
    tokens = tuple(t.lower() for t in tokens)
    captions.append((" ".join(tokens) if raw is None else raw, tokens))
  return captions


def read_cuhk_pedes(path: str, image_root: str, split: str, check_files: bool = True,
                    split_raw=tokenize) -> list[Record]:
  """One split of CUHK-PEDES `reid_raw.json`: the class is the person `id`; `split_raw` splits
  the captions."""
  data = paths.read_json(path, DataError)
  if not isinstance(data, list):
    raise DataError(f"{path}: expected a list of entries")
  items = []
  for i, entry in enumerate(data):
    where = f"{path}: [{i}]"
    if field(entry, "split", where) != split:
      continue
    captions = tuple(tuple(split_raw(c)) for c in field(entry, "captions", where))
    items.append((os.path.join(image_root, field(entry, "file_path", where)), captions,
                  field(entry, "id", where), where))
  return _labelled(path, items, split, check_files)


def first_captions(recs: Sequence[Record], per_image: int) -> list[Record]:
  """Each record with its first `per_image` captions, in the file's order (0: all of them)."""
  if per_image <= 0:
    return list(recs)
  return [dataclasses.replace(r, captions=r.captions[:per_image]) for r in recs]


def read_split(config, split: str, check_files: bool = True) -> list[Record]:
  """The records of `split` for a run's `config.data`."""
  d = config.data
  needed = ("tfds_data_dir", "tfds_name") if d.format == "tfds" else ("json", "image_root")
  unset = [f"data.{k}" for k in needed if not d[k]]
  if unset and d.format == "tfds":
    raise DataError(
        f"{' and '.join(unset)} not set (--config.{unset[0]}=...): data.format=tfds reads a "
        "dataset prepared by `python -m instance_loss_jax.cli.prepare` (docs/data.md); "
        "--config.data.format=karpathy (or cuhk_pedes) with data.json and data.image_root reads "
        "the files as published")
  if unset:
    hint = ""
    if d.tfds_data_dir:
      hint = (f"; data.tfds_data_dir is set, but data.format={d.format!r}: to read a prepared "
              "TFDS dataset, --config.data.format=tfds with data.tfds_name")
    raise DataError(f"{' and '.join(unset)} not set (--config.{unset[0]}=PATH): the dataset's "
                    f"files are not known{hint}")
  original = tokenizer(d) if d.tokenizer == "original" else None  # else each source's own
  if d.format == "karpathy":
    return read_karpathy(d.json, d.image_root, split, tuple(d.train_splits), check_files,
                         original)
  if d.format == "cuhk_pedes":
    return read_cuhk_pedes(d.json, d.image_root, split, check_files, original or tokenize)
  if d.format == "tfds":
    parts = tuple(d.train_splits) if split == "train" else (split,)
    return [Record(ref, captions, label, split) for ref, captions, label in
            tfds_source.read_split(d.tfds_data_dir, tfds_source.tfds_name(d.tfds_name), parts,
                                   original)]
  raise DataError(f"data.format={d.format!r}: unknown")
