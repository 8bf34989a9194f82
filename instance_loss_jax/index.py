"""Use a trained run: embed a gallery into an index, then search it with text or an image.

    from instance_loss_jax import Index
    index = Index.from_run("runs/f30k-2", images="photos/")      # or split="test", captions=FILE
    index.save("photos.index")
    for hit in Index.load("photos.index").search_text("a dog runs on the beach", k=5):
      print(hit.rank, f"{hit.score:.3f}", hit.item)

An index is a directory: `embeddings.npy` ([N, D], L2-normalised, float16 or float32),
`items.json` (image paths or captions, row by row) and `index.json` (kind, run, step,
vocabulary fingerprint). Queries are embedded by the run's own model, found through the index's
record. Search is a blocked top-k on the device (`top_k`): memory stays bounded whatever the
gallery's size.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from typing import Any

import numpy as np

from instance_loss_jax import paths
from instance_loss_jax.data import records, tfds_source
from instance_loss_jax.errors import RetrievalError
from instance_loss_jax.inference import Run, load_run, top_k

log = logging.getLogger(__name__)

INDEX_FILE, EMBEDDINGS_FILE, ITEMS_FILE = "index.json", "embeddings.npy", "items.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
KINDS = ("images", "captions")


def image_files(images: str) -> list[str]:
  """A folder's JPEG/PNG files (sorted), or the files a glob pattern matches; an image of a
  prepared TFDS dataset by its name (data/tfds_source.py) as it is."""
  if tfds_source.is_image_ref(images):
    return [images]
  root = paths.path(images)
  if any(c in images for c in "*?["):  # a glob: its folder, then the pattern
    folder, pattern = images.rsplit("/", 1) if "/" in images else (".", images)
    found = [os.fspath(p) for p in paths.path(folder).glob(pattern)]
  elif root.is_dir():
    found = [os.fspath(p) for p in root.iterdir()]
  else:
    found = [images] if root.exists() else []
  found = sorted(p for p in found if p.lower().endswith(IMAGE_SUFFIXES))
  if not found:
    raise RetrievalError(f"{images}: no JPEG or PNG file there")
  return found


@dataclasses.dataclass(frozen=True)
class Hit:
  rank: int  # 1-based
  score: float  # cosine similarity
  item: str  # image path or caption
  row: int  # row in the index


@dataclasses.dataclass
class Index:
  """Embeddings of a gallery (images or captions) with what each row is and the run that made
  them. Build with `from_run`, keep with `save` / `load`, query with `search_text` (an image
  index) or `search_image` (a caption index)."""
  embeddings: np.ndarray  # [N, D], L2-normalised
  items: list[str]
  kind: str  # "images" or "captions"
  run: dict[str, Any]  # workdir, step, vocab (fingerprint)
  model: Run | None = dataclasses.field(default=None, repr=False, compare=False)

  @classmethod
  def from_run(cls, workdir: str, images: str | None = None, split: str | None = None,
               captions: str | None = None, step: int | None = None,
               overrides: dict[str, Any] | None = None, dtype: str = "float16",
               split_kind: str = "images") -> "Index":
    """Embeds one gallery with the run's checkpoint (`inference.load_run`: by default the best
    by validation rsum, else the newest): a folder or glob of images, a dataset split (the
    run's recorded dataset, its fields changed by `overrides`, e.g. {"data.json": ...}), or a
    text file of sentences (one per line)."""
    if sum(x is not None for x in (images, split, captions)) != 1:
      raise RetrievalError("give exactly one gallery: images, split or captions")
    model = load_run(workdir, step, overrides=overrides)
    if images is not None:
      kind, items = "images", image_files(images)
    elif captions is not None:
      kind, items = "captions", _read_lines(captions)
    else:
      kind, items = split_kind, _split_items(model.config, split, split_kind)
    if kind == "images":
      # Stored absolute: `search` runs from any directory and reads these files to inline the
      # thumbnails of its HTML page (relative to export's directory they would not be found).
      items = [paths.absolute(p) for p in items]
    log.info("embedding %d %s with %s step %d", len(items), kind, workdir, model.step)
    emb = (model.embed_image_files(items) if kind == "images"
           else model.embed_sentences(items)[0])
    return cls(emb.astype(dtype), list(items), kind, model.record(), model)

  def save(self, path: str) -> str:
    paths.path(path).mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, self.embeddings)
    paths.write_bytes(paths.join(path, EMBEDDINGS_FILE), buffer.getvalue())
    paths.write_text(paths.join(path, ITEMS_FILE), json.dumps(self.items))
    # Written last: an index with this file is complete.
    paths.write_text(paths.join(path, INDEX_FILE), json.dumps(dict(
        kind=self.kind, count=len(self.items), dim=int(self.embeddings.shape[1]),
        dtype=str(self.embeddings.dtype), run=self.run), indent=1))
    return path

  @classmethod
  def load(cls, path: str) -> "Index":
    files = [paths.join(path, name) for name in (INDEX_FILE, EMBEDDINGS_FILE, ITEMS_FILE)]
    missing = [f for f in files if not paths.path(f).exists()]
    if missing:
      raise RetrievalError(f"{path}: not an index (missing {', '.join(missing)})")
    try:
      record = json.loads(paths.path(files[0]).read_text())
      embeddings = np.load(io.BytesIO(paths.path(files[1]).read_bytes()))
      items = json.loads(paths.path(files[2]).read_text())
    except (json.JSONDecodeError, ValueError, OSError) as e:
      raise RetrievalError(f"{path}: unreadable index ({e})") from None
    if record.get("kind") not in KINDS or len(items) != len(embeddings):
      raise RetrievalError(f"{path}: inconsistent index ({record.get('kind')!r}, "
                           f"{len(items)} items, {len(embeddings)} embeddings)")
    return cls(embeddings, items, record["kind"], record["run"])

  def _model(self, workdir: str | None = None) -> Run:
    if self.model is None or (workdir and workdir != self.model.workdir):
      # Queries are embedded as the gallery was (an index from before eval.features: after
      # the ReLU).
      self.model = load_run(workdir or self.run["workdir"], self.run["step"], overrides={
          "eval.features": self.run.get("features", "after_relu")})
      if self.model.vocab.fingerprint != self.run["vocab"]:
        raise RetrievalError(f"the run's vocabulary ({self.model.workdir}) is not the one this "
                             "index was made with")
    return self.model

  def search_embeddings(self, queries, k: int = 10) -> list[list[Hit]]:
    scores, rows = top_k(queries, self.embeddings, min(k, len(self.items)))
    return [[Hit(r + 1, float(s), self.items[i], int(i)) for r, (s, i) in enumerate(zip(ss, ii))]
            for ss, ii in zip(scores, rows)]

  def search_text(self, query: str, k: int = 10, workdir: str | None = None):
    """Images of this index most similar to a sentence: (hits, the query's unknown words)."""
    if self.kind != "images":
      raise RetrievalError("a text query searches an image index; this one holds captions")
    emb, unknown = self._model(workdir).embed_sentences([query])
    return self.search_embeddings(emb, k)[0], unknown[0]

  def search_image(self, path: str, k: int = 10, workdir: str | None = None) -> list[Hit]:
    """Captions of this index most similar to an image file."""
    if self.kind != "captions":
      raise RetrievalError("an image query searches a caption index; this one holds images")
    paths = image_files(path)
    return self.search_embeddings(self._model(workdir).embed_image_files(paths[:1]), k)[0]


def _read_lines(path: str) -> list[str]:
  if not paths.path(path).is_file():
    raise RetrievalError(f"{path}: no such file")
  lines = [line.strip() for line in paths.path(path).read_text().splitlines() if line.strip()]
  if not lines:
    raise RetrievalError(f"{path}: no sentence in it")
  return lines


def _split_items(config, split: str, kind: str) -> list[str]:
  recs = records.read_split(config, split)
  if kind == "images":
    return [r.image_path for r in recs]
  return [" ".join(c) for r in recs for c in r.captions]
