"""The inference layer, shared by the evaluation, the trainer's validation and the Index: a run
config's inference-mode embedding functions on a mesh (`EmbedFns`), embedding rows in fixed-size
batches, a blocked top-k search whose device memory does not grow with the gallery, and one way
to load a trained run (`load_run`: its config, vocabulary, checked checkpoint and variables)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from instance_loss_jax import paths, sharding
from instance_loss_jax.workdir import checkpoint
from instance_loss_jax.config import apply_overrides, run_config
from instance_loss_jax.data import records
from instance_loss_jax.data.vocab import Vocabulary
from instance_loss_jax.errors import CheckpointError
from instance_loss_jax.models import build_model, l2_normalize

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EmbedFns:
  """A model's inference-mode embedding functions on one mesh (big_vision's predict_fn): the
  evaluation and the Index receive them instead of building their own, and each pair is
  compiled once however often it is called.

  images(variables, images [rows, s, s, 3], flip_average) and texts(variables, tokens
  [rows, max_len], summand=False) take variables from `place` and return [rows, D] on the
  mesh; `rows`, the batch every call gets, is `eval.batch_size` rounded down to a multiple of
  the mesh's devices (at least one row each).
  """
  images: Callable[..., jax.Array]
  texts: Callable[..., jax.Array]
  mesh: jax.sharding.Mesh
  rows: int

  def place(self, variables: dict[str, Any]) -> dict[str, Any]:
    return place_variables(variables, self.mesh)

  def embed_images(self, placed, batches: Iterable[np.ndarray], total: int,
                   flip_average: bool) -> np.ndarray:
    """[total, D] L2-normalised embeddings of numpy image batches (any sizes)."""
    return embed_chunks(batches, total, "images", self.rows,
                        lambda x: self.images(placed, x, flip_average))

  def embed_tokens(self, placed, tokens: np.ndarray, summand: bool = False) -> np.ndarray:
    """[n, D] embeddings of token rows: L2-normalised, or with `summand` one view's summand."""
    return embed_chunks([tokens], len(tokens), "captions", self.rows,
                        lambda x: self.texts(placed, x, summand))


def make_embed_fns(config: ml_collections.ConfigDict, mesh=None) -> EmbedFns:
  """Inference-mode (no dropout, running BN statistics) feature extractors over `mesh` (default:
  this process's devices), the batch split over the devices.

  An embedding is the L2-normalised sum of per-view summands: with `flip_average`, the image's
  and its mirror's; a caption's shift offsets are summed by the caller (`summand=True` returns
  the summand). `config.eval.features` says what a summand is: "after_relu", the head's output
  after its last ReLU, L2-normalised; "original", the last BatchNorm's raw output before that
  ReLU, as the original's test scripts read (docs/design.md).
  """
  model = build_model(config)
  mesh = mesh if mesh is not None else sharding.make_mesh(jax.local_devices())
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.AXIS))
  original = config.eval.features == "original"

  def view_summand(variables, x, method):
    features = model.apply(variables, x, final_relu=not original, method=method)
    return features.astype(jnp.float32) if original else l2_normalize(features)

  def image_embedding(variables, images, flip_average):
    total = view_summand(variables, images, "image_features")
    if flip_average:
      total = total + view_summand(variables, images[:, :, ::-1], "image_features")
    return l2_normalize(total)

  def text_embedding(variables, tokens, as_summand):
    one = view_summand(variables, tokens, "text_features")
    return one if as_summand else l2_normalize(one)

  images_fn = jax.jit(image_embedding, static_argnums=(2,), out_shardings=rows)
  texts_fn = jax.jit(text_embedding, static_argnums=(2,), out_shardings=rows)
  put = lambda x: jax.device_put(np.asarray(x), rows)
  return EmbedFns(images=lambda v, x, flip: images_fn(v, put(x), flip),
                  texts=lambda v, x, summand=False: texts_fn(v, put(x), summand),
                  mesh=mesh, rows=max(1, config.eval.batch_size // mesh.size) * mesh.size)


def place_variables(variables: dict[str, Any], mesh=None) -> dict[str, Any]:
  """Host variables replicated on `mesh` (default: this process's devices) for the embed
  functions; W_share, which they do not use, stays behind."""
  mesh = mesh if mesh is not None else sharding.make_mesh(jax.local_devices())
  params = {k: v for k, v in variables["params"].items() if k != sharding.W_SHARE}
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.device_put({"params": params, "batch_stats": variables["batch_stats"]}, replicated)


def embed_chunks(chunks, total: int, what: str, size: int, embed):
  """Embeds numpy chunks of rows in batches of `size` (the last one padded)."""
  out, done, started = [], 0, time.time()
  for chunk in chunks:
    for lo in range(0, len(chunk), size):
      rows = chunk[lo:lo + size]
      padded = np.zeros((size,) + rows.shape[1:], rows.dtype)
      padded[:len(rows)] = rows
      out.append(np.asarray(embed(padded))[:len(rows)])
      done += len(rows)
    log.info("embedded %d/%d %s (%.0f/s)", done, total, what,
             done / max(time.time() - started, 1e-9))
  return np.concatenate(out)


@functools.partial(jax.jit, static_argnames=("k",))
def _merge_block(queries, block, valid, offset, best_scores, best_index, *, k):
  scores = queries @ block.astype(jnp.float32).T
  scores = jnp.where(jnp.arange(block.shape[0]) < valid, scores, -jnp.inf)
  scores, index = jax.lax.top_k(scores, min(k, block.shape[0]))
  index = jnp.where(jnp.isneginf(scores), -1, index + offset)  # padding rows are no hit
  scores = jnp.concatenate([best_scores, scores], axis=1)
  index = jnp.concatenate([best_index, index], axis=1)
  scores, pick = jax.lax.top_k(scores, k)
  return scores, jnp.take_along_axis(index, pick, axis=1)


def top_k(queries, gallery, k: int = 10, block_rows: int = 65536):
  """The k most similar gallery rows (dot product) of each query: (scores [Q, k], rows [Q, k]).

  The gallery (numpy, any float dtype, in host memory or memory-mapped) goes to the device one
  block of `block_rows` rows at a time; each block's top-k (jax.lax.top_k) is merged into the
  running one, so device memory holds one block and Q x block scores whatever the gallery's
  size. Rows beyond the gallery (k > N) come back with score -inf and row -1.
  """
  queries = jnp.asarray(np.asarray(queries, np.float32))
  n = len(gallery)
  block_rows = max(1, min(block_rows, n))
  best_scores = jnp.full((queries.shape[0], k), -jnp.inf, jnp.float32)
  best_index = jnp.full((queries.shape[0], k), -1, jnp.int32)
  for lo in range(0, n, block_rows):
    block = np.asarray(gallery[lo:lo + block_rows])
    valid = len(block)
    if valid < block_rows:  # one shape for every block: one compile
      block = np.concatenate([block, np.zeros((block_rows - valid,) + block.shape[1:],
                                              block.dtype)])
    best_scores, best_index = _merge_block(queries, block, valid, lo, best_scores, best_index,
                                           k=k)
    # Dispatch is asynchronous: without this wait every block would be copied in before the
    # first is scored, and memory would grow with the gallery.
    best_scores.block_until_ready()
  return np.asarray(best_scores), np.asarray(best_index)


@dataclasses.dataclass
class Run:
  """A trained run ready to embed (`load_run`): its config as built, its vocabulary, the
  checkpoint step chosen, that step's variables placed for `embed_fns`."""
  workdir: str
  config: ml_collections.ConfigDict
  vocab: Vocabulary
  step: int
  embed_fns: EmbedFns
  variables: dict[str, Any]

  def record(self) -> dict[str, Any]:
    """What an index keeps of the run that embedded it."""
    # The workdir made absolute: the index is searched from any folder.
    return dict(workdir=paths.absolute(self.workdir), step=self.step,
                vocab=self.vocab.fingerprint, features=self.config.eval.features)

  def embed_sentences(self, sentences: Sequence[str]) -> tuple[np.ndarray, list[list[str]]]:
    """L2-normalised embeddings of free-text sentences and each one's unknown words."""
    rows, unknown = self.vocab.encode_sentences(sentences, self.config.model.text.max_len,
                                                records.tokenizer(self.config.data))
    return self.embed_fns.embed_tokens(self.variables, rows), unknown

  def embed_image_files(self, files: Sequence[str]) -> np.ndarray:
    """L2-normalised features of image files (the evaluation's: whole image, mirror averaged
    when the run's eval.flip_average)."""
    # Imported here: tf.data (TensorFlow, seconds to import) reads image files; a text search
    # never loads it.
    from instance_loss_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    ds = pipeline.eval_image_files(files, self.config, self.embed_fns.rows)
    return self.embed_fns.embed_images(
        self.variables, (b["images"] for b in pipeline.numpy_batches(ds, files)), len(files),
        bool(self.config.eval.flip_average))


def load_run(workdir: str, step: int | None = None, *, prefer: str = "best",
             config: ml_collections.ConfigDict | None = None,
             overrides: dict[str, Any] | None = None, mgr=None, devices=None) -> Run:
  """A trained run's checkpoint, checked against the config it is read with, on `devices`
  (default: this process's).

  config: the config to read it with (the evaluation binary's), else the run's recorded one;
  then `overrides` ({"dotted.field": value}). The vocabulary, class count and input convention
  come from the run (`config.run_config`), and the checkpoint's metadata must match the result
  (a mismatch is refused, its differences listed). step: `checkpoint.resolve_step`'s `step` and
  `prefer` ("best": by validation rsum when the run validated, else the newest). mgr: the
  workdir's checkpoint manager if the caller holds one (the trainer).
  """
  mgr = checkpoint.reader(workdir) if mgr is None else mgr
  if mgr is None:
    raise CheckpointError(f"no checkpoint in {paths.join(workdir, checkpoint.CHECKPOINT_DIR)}")
  what = f"run {workdir}"
  step = checkpoint.resolve_step(mgr, step, prefer, what)
  if config is None:
    config = checkpoint.read_config(workdir)
  if overrides:
    config = apply_overrides(config, overrides)
  vocab = Vocabulary.load(workdir)
  saved = checkpoint.read_meta(mgr, step)  # read once: the class count, then the check
  config = run_config(config, vocab.size, config.num_classes or saved["num_classes"],
                      saved.get("input"))
  checkpoint.check_meta(saved, checkpoint.run_meta(config, vocab.fingerprint),
                        f"{what}: {mgr.directory}/{step}")
  embed_fns = make_embed_fns(config, sharding.make_mesh(devices or jax.local_devices()))
  return Run(workdir, config, vocab, step,
             # The embeddings use neither W_share nor the optimiser state: neither is read.
             embed_fns, embed_fns.place(checkpoint.restore_variables(mgr, step,
                                                                     w_share=False)))
