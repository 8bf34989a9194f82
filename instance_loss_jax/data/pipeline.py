"""tf.data input pipelines: training batches for the train step and evaluation batches.

Training is a pure function of (seed, process, element number): element k of a host's stream is
image `index_shuffle(k mod n, seed=(seed, epoch, process))` of that host's shard, with its
caption choice, crop, flip and position shift drawn from stateless seeds folded from k. So batch
s is the same whenever it is produced, and a resumed run starts its stream at s * batch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from instance_loss_jax.config import uses_mined_negatives
from instance_loss_jax.data import tfds_source
from instance_loss_jax.data.records import DataError, Record
from instance_loss_jax.data.vocab import Vocabulary, encode

log = logging.getLogger(__name__)



def keep_tensorflow_off_accelerators() -> None:
  """The input pipeline is CPU work: TensorFlow must not take the GPUs JAX uses (its memory
  pools would). Called where TensorFlow is first put to work (a run, a dataset), not at import:
  importing this module changes nothing in the process. Once TensorFlow has started, its
  devices cannot change: then this does nothing (a CPU-only TensorFlow has none anyway)."""
  try:
    if tf.config.get_visible_devices("GPU"):
      tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TensorFlow already initialised by the caller: its choice stands
    pass


@dataclasses.dataclass(frozen=True)
class EncodedSplit:
  """A split's images and captions as arrays (captions left-aligned, 0 = padding)."""
  image_paths: np.ndarray  # [N] str
  labels: np.ndarray  # [N] int32
  caption_start: np.ndarray  # [N] int32: first caption row of each image
  caption_count: np.ndarray  # [N] int32
  tokens: np.ndarray  # [M, L] int32
  lengths: np.ndarray  # [M] int32
  caption_image: np.ndarray  # [M] int32: the image of each caption
  num_empty_captions: int  # captions with no known word (left out of training)

  @property
  def num_images(self) -> int:
    return len(self.image_paths)


def encode_split(records: Sequence[Record], vocab: Vocabulary, max_len: int,
                 for_training: bool) -> EncodedSplit:
  """Encodes captions. Training leaves out captions with no known word (and images left with
  none); evaluation keeps every caption, an unknown-only one as all padding."""
  index = vocab.index()
  paths, labels, starts, counts, rows, caption_image = [], [], [], [], [], []
  empty = 0
  for record in records:
    encoded = [encode(index, c, max_len) for c in record.captions]
    empty += sum(not e for e in encoded)
    if for_training:
      encoded = [e for e in encoded if e]
      if not encoded:
        continue
    starts.append(len(rows))
    counts.append(len(encoded))
    caption_image.extend([len(paths)] * len(encoded))
    rows.extend(encoded)
    paths.append(record.image_path)
    labels.append(record.label)
  if empty:
    log.warning("%d of %d captions have no word in the vocabulary%s", empty,
                sum(len(r.captions) for r in records),
                ": left out of training" if for_training else ": kept as padding only")
  if not paths or (for_training and not rows):
    raise DataError("no usable image/caption pair in the split "
                    f"({len(records)} records, {empty} captions without a known word)")
  tokens = np.zeros((len(rows), max_len), np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  return EncodedSplit(np.asarray(paths), np.asarray(labels, np.int32),
                      np.asarray(starts, np.int32), np.asarray(counts, np.int32), tokens,
                      np.asarray([len(r) for r in rows], np.int32),
                      np.asarray(caption_image, np.int32), empty)


def image_reader(example_name: str):
  """How the pipelines get an image's encoded bytes from its name (`example_name`: any image of
  the list, all of one kind): a file's with tf.io.read_file; a record's of a prepared TFDS
  dataset (data/tfds_source.py) with ArrayRecord's reader, in a numpy_function (the record's
  number is in its name, so only that record is read), its `image` feature parsed in the graph."""
  if not tfds_source.is_image_ref(example_name):
    return tf.io.read_file
  readers = tfds_source.Readers()  # this pipeline's: each split's reader opened once

  def read(name):
    serialized = tf.numpy_function(lambda n: readers.record_of(n.decode("utf-8")), [name],
                                   tf.string, stateful=False)
    serialized.set_shape([])
    return tf.io.parse_single_example(
        serialized, {"image": tf.io.FixedLenFeature([], tf.string)})["image"]

  return read


def _uniform(seed, minval=0.0, maxval=1.0):
  return tf.random.stateless_uniform([], seed, minval=minval, maxval=maxval)


def _decode(contents):
  return tf.io.decode_image(contents, channels=3, expand_animations=False)


def _normalise(image, data):
  image = (tf.cast(image, tf.float32) - tf.constant(data.mean_rgb, tf.float32)) / tf.constant(
      data.std_rgb, tf.float32)
  return image[..., ::-1] if data.bgr else image


def random_crop_box(height, width, seeds, data):
  """The original's crop, in source pixels: on the image resized to shorter side
  `resize_shorter`, aspect ratio log-uniform in `crop_aspect`, area a uniform fraction in
  `crop_area` of the largest crop of that aspect ratio, at a uniform position."""
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  scale = data.resize_shorter / tf.minimum(h, w)
  h, w = h * scale, w * scale
  ratio = tf.exp(_uniform(seeds[0], math.log(data.crop_aspect[0]), math.log(data.crop_aspect[1])))
  max_h = tf.minimum(h, w / ratio)
  side = tf.sqrt(_uniform(seeds[1], data.crop_area[0], data.crop_area[1]))
  crop_h, crop_w = max_h * side, max_h * ratio * side
  top, left = _uniform(seeds[2]) * (h - crop_h), _uniform(seeds[3]) * (w - crop_w)
  top, left, crop_h, crop_w = tf.unstack(
      tf.cast(tf.stack([top, left, crop_h, crop_w]) / scale, tf.int32))
  crop_h, crop_w = tf.clip_by_value(crop_h, 1, height), tf.clip_by_value(crop_w, 1, width)
  return tf.stack([tf.clip_by_value(top, 0, height - crop_h),
                   tf.clip_by_value(left, 0, width - crop_w), crop_h, crop_w])


def train_image(contents, seeds, size: int, data):
  """An encoded image's decode, random crop, resize to size x size, random flip, normalise."""
  def jpeg():  # read the size from the header, decode only the crop
    shape = tf.image.extract_jpeg_shape(contents)
    return tf.image.decode_and_crop_jpeg(
        contents, random_crop_box(shape[0], shape[1], seeds, data), channels=3)

  def other():  # PNG and the rest: decode once, then crop
    image = _decode(contents)
    shape = tf.shape(image)
    box = random_crop_box(shape[0], shape[1], seeds, data)
    return tf.image.crop_to_bounding_box(image, box[0], box[1], box[2], box[3])

  image = tf.image.resize(tf.cond(tf.io.is_jpeg(contents), jpeg, other), (size, size))
  if data.flip:
    image = tf.cond(_uniform(seeds[4]) < 0.5, lambda: image[:, ::-1], lambda: image)
  return _normalise(image, data)


def eval_image(contents, size: int, data):
  """The whole encoded image resized to size x size (the mirror is averaged in at embedding
  time)."""
  image = tf.image.resize(_decode(contents), (size, size))
  return _normalise(image, data)


def position_shift(tokens, length, seed, max_len: int, enabled: bool):
  """Moves a left-aligned sentence of `length` words to a uniform offset in {0..L-length}."""
  if not enabled:
    return tokens
  offset = tf.random.stateless_uniform([], seed, 0, max_len - length + 1, dtype=tf.int32)
  return tf.roll(tokens, offset, axis=0)


def host_shard(num_images: int, process_index: int, process_count: int) -> np.ndarray:
  """This host's image indices: every process_count-th, so the hosts' shards are disjoint and
  together complete."""
  return np.arange(process_index, num_images, process_count)


def train_dataset(split: EncodedSplit, config, num_devices: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
  """Endless batches {images, tokens, labels} of this host's batch_size / process_count rows
  (the train step assembles the hosts' rows into the global batch over `num_devices`); with
  mined negatives also {mined_tokens, mined_labels}, this host's rows of the step's candidate
  pool (`mined_candidates`)."""
  keep_tensorflow_off_accelerators()
  data, max_len, size = config.data, config.model.text.max_len, config.image_size
  host_batch = config.batch_size // process_count
  if config.batch_size % num_devices or num_devices % process_count:
    raise DataError(f"batch_size={config.batch_size} does not divide over {num_devices} "
                    f"devices of {process_count} hosts")
  shard = host_shard(split.num_images, process_index, process_count)
  if not len(shard):
    raise DataError(f"process {process_index} has no training image "
                    f"({split.num_images} images, {process_count} processes)")
  paths = tf.constant(split.image_paths[shard])
  read = image_reader(split.image_paths[0])
  labels = tf.constant(split.labels[shard])
  starts = tf.constant(split.caption_start[shard])
  counts = tf.constant(split.caption_count[shard])
  all_tokens, all_lengths = tf.constant(split.tokens), tf.constant(split.lengths)
  n = len(shard)

  def element(k):
    epoch, pos = k // n, k % n
    host_seed = tf.constant([config.seed, process_index], tf.int64)
    i = tf.random.experimental.index_shuffle(
        pos, tf.random.experimental.stateless_fold_in(host_seed, epoch),
        tf.constant(n - 1, tf.int64))
    seed = tf.random.experimental.stateless_fold_in(host_seed, k + (1 << 40))
    seeds = tf.random.experimental.stateless_split(seed, 7)
    caption = starts[i] + tf.cast(_uniform(seeds[5]) * tf.cast(counts[i], tf.float32), tf.int32)
    caption = tf.minimum(caption, starts[i] + counts[i] - 1)
    tokens = position_shift(all_tokens[caption], all_lengths[caption], seeds[6], max_len,
                            data.position_shift)
    return dict(images=train_image(read(paths[i]), seeds, size, data), tokens=tokens,
                labels=labels[i])

  ds = tf.data.Dataset.range(start_step * host_batch, 2**62)
  ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(host_batch, drop_remainder=True)
  if uses_mined_negatives(config):
    caption_labels = tf.constant(split.labels[split.caption_image])
    pools = tf.data.Dataset.range(start_step, 2**62).map(
        lambda step: mined_candidates(all_tokens, all_lengths, caption_labels, config, step,
                                      process_index, process_count))
    ds = tf.data.Dataset.zip(ds, pools).map(lambda batch, pool: {**batch, **pool})
  return ds.prefetch(data.prefetch)


def mined_candidates(tokens: tf.Tensor, lengths: tf.Tensor, caption_labels: tf.Tensor, config,
                     step, process_index: int = 0, process_count: int = 1) -> dict[str, tf.Tensor]:
  """This host's rows of step `step`'s candidate pool for mined negatives (docs/design.md):
  captions drawn uniformly from the whole training split (`tokens`, `lengths`, their images' labels
  `caption_labels`), each moved to a random position as the original did
  (`data.position_shift`). The pool is a function of (seed, step) alone: every host draws the
  whole pool and keeps its slice, so it does not depend on the number of hosts or devices (the
  train step splits the global pool over the devices)."""
  total = config.loss.num_mined
  if total % process_count:
    raise DataError(f"loss.num_mined={total} does not divide over {process_count} hosts")
  seed = tf.random.experimental.stateless_fold_in(
      tf.constant([config.seed, 1 << 20], tf.int64), tf.cast(step, tf.int64))
  draw, shift = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  rows = tf.random.stateless_uniform([total], draw, 0, tf.shape(tokens, tf.int64)[0],
                                     dtype=tf.int64)
  max_len = tokens.shape[1]
  lengths = tf.gather(lengths, rows)
  # Offsets uniform in {0..max_len - length}; rolling a left-aligned row moves only padding.
  offsets = tf.cast(tf.random.stateless_uniform([total], shift) *
                    tf.cast(max_len - lengths + 1, tf.float32), tf.int32)
  if not config.data.position_shift:
    offsets = tf.zeros_like(offsets)
  k = total // process_count
  rows, offsets = (x[process_index * k:(process_index + 1) * k] for x in (rows, offsets))
  positions = tf.math.floormod(tf.range(max_len)[None, :] - offsets[:, None], max_len)
  return dict(mined_tokens=tf.gather(tf.gather(tokens, rows), positions, batch_dims=1),
              mined_labels=tf.gather(caption_labels, rows))


def eval_image_files(paths: Sequence[str], config, batch_size: int) -> tf.data.Dataset:
  """Image files in order, batched, each with its row `index`: whole images resized to the
  model's input (the mirror is averaged in at embedding time)."""
  keep_tensorflow_off_accelerators()
  data, size = config.data, config.image_size
  images = tf.data.Dataset.from_tensor_slices(
      dict(path=np.asarray(paths), index=np.arange(len(paths), dtype=np.int32)))
  read = image_reader(paths[0]) if len(paths) else tf.io.read_file
  images = images.map(
      lambda x: dict(images=eval_image(read(x["path"]), size, data), index=x["index"]),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return images.batch(batch_size).prefetch(2)


def eval_images(split: EncodedSplit, config, batch_size: int) -> tf.data.Dataset:
  """Every image of the split once, in file order, batched, each with its row `index`."""
  return eval_image_files(split.image_paths, config, batch_size)


def unreadable_images(paths: Sequence[str], limit: int = 5) -> list[str]:
  """Files that TensorFlow cannot read or decode as images, with the reason (up to `limit`)."""
  bad = []
  readers = tfds_source.Readers()
  for path in paths:
    try:
      _decode(readers.image_bytes(path) if tfds_source.is_image_ref(path)
              else tf.io.read_file(path))
    except (tf.errors.OpError, ValueError, DataError, RuntimeError) as e:
      bad.append(f"{path}: {e.message if hasattr(e, 'message') else e}".splitlines()[0])
      if len(bad) >= limit:
        break
  return bad


def numpy_batches(ds: tf.data.Dataset, image_paths: Sequence[str]) -> Iterator[dict]:
  """Iterates `ds` as numpy; a decoding failure is re-raised naming the unreadable file(s)."""
  iterator = ds.as_numpy_iterator()
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      bad = unreadable_images(image_paths)
      detail = "; ".join(bad) if bad else e.message.splitlines()[0]
      raise DataError(f"input pipeline failed: {detail}") from None
    yield batch
