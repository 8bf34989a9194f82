"""Readers, vocabulary, tf.data pipelines and the synthetic dataset, on files the tests write."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from helpers import tiny_config
from instance_loss_jax.data import pipeline, records, synthetic
from instance_loss_jax.data import vocab as vocab_lib
from instance_loss_jax.data.records import DataError


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synthetic"))
  summary = synthetic.generate(out, num_images=40, seed=3, image_size=48, w2v_dim=16,
                               w2v_epochs=2)
  return out, summary


def synth_config(out, **overrides):
  config = tiny_config(**overrides)
  config.data.json = os.path.join(out, "dataset.json")
  config.data.image_root = os.path.join(out, "images")
  config.data.word2vec = os.path.join(out, "word2vec.bin")
  config.model.text.word_dim = 16
  return config


def write_image(path, size=(50, 40), fmt="PNG"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(len(path))
  Image.fromarray(rng.integers(0, 255, size[::-1] + (3,), dtype=np.uint8)).save(path, fmt)


# ---------------------------------------------------------------------------------- readers


def test_karpathy_coco_layout_and_restval(tmp_path):
  images = []
  for i, split in enumerate(["train", "restval", "val", "test", "restval", "train"]):
    folder = "train2014" if split in ("train", "restval") else "val2014"
    write_image(str(tmp_path / folder / f"{i}.jpg"), fmt="JPEG")
    sentences = [dict(tokens=["A", "dog", str(i)], raw=f"A dog {i}")] * 2
    if i == 0:
      sentences = [dict(raw="Raw only, no tokens!")]
    images.append(dict(filename=f"{i}.jpg", filepath=folder, split=split, sentences=sentences))
  path = tmp_path / "dataset_coco.json"
  path.write_text(json.dumps(dict(images=images)))
  train = records.read_karpathy(str(path), str(tmp_path), "train", ("train", "restval"))
  assert [r.label for r in train] == [0, 1, 2, 3]
  assert train[1].image_path == str(tmp_path / "train2014" / "1.jpg")
  assert train[0].captions == (("raw", "only", "no", "tokens"),)
  assert train[2].captions[0] == ("a", "dog", "4")
  assert {r.split for r in train} == {"train"}
  test = records.read_karpathy(str(path), str(tmp_path), "test")
  assert len(test) == 1 and test[0].label == 0
  flickr_train = records.read_karpathy(str(path), str(tmp_path), "train")
  assert len(flickr_train) == 2  # without restval


def test_cuhk_pedes_labels_are_person_ids(tmp_path):
  entries = []
  for i, (pid, split) in enumerate([(7, "train"), (7, "train"), (3, "train"), (9, "test"),
                                    (9, "test"), (5, "val")]):
    write_image(str(tmp_path / "imgs" / f"{i}.png"))
    entries.append(dict(split=split, captions=[f"A man in a RED coat {i}.", "Black shoes"],
                        file_path=f"imgs/{i}.png", id=pid, processed_tokens=[]))
  path = tmp_path / "reid_raw.json"
  path.write_text(json.dumps(entries))
  train = records.read_cuhk_pedes(str(path), str(tmp_path), "train")
  assert [r.label for r in train] == [0, 0, 1]
  assert train[0].captions[0] == ("a", "man", "in", "a", "red", "coat", "0")
  test = records.read_cuhk_pedes(str(path), str(tmp_path), "test")
  assert [r.label for r in test] == [0, 0]


def test_synthetic_dataset(synth):
  out, summary = synth
  data = json.load(open(os.path.join(out, "dataset.json")))
  assert len(data["images"]) == 40
  assert (summary["train"], summary["val"], summary["test"]) == (32, 4, 4)
  raw = [tuple(s["raw"] for s in im["sentences"]) for im in data["images"]]
  assert all(len(set(r)) == 5 for r in raw)  # five different captions per image
  assert len(set(frozenset(r) for r in raw)) == 40  # every scene described uniquely
  config = synth_config(out)
  train = records.read_split(config, "train")
  assert len(train) == 32 and [r.label for r in train] == list(range(32))
  kv = vocab_lib.load_word2vec(config.data.word2vec)  # the word2vec binary format
  assert kv.vector_size == 16 and "circle" in kv.key_to_index or "circles" in kv.key_to_index


# ---------------------------------------------------------------------------------- vocab


def fake_records(captions_per_image):
  return [records.Record(f"{i}.png", tuple(tuple(c.split()) for c in caps), i, "train")
          for i, caps in enumerate(captions_per_image)]


def keyed_vectors(words, dim=4):
  from gensim.models import KeyedVectors
  kv = KeyedVectors(dim)
  kv.add_vectors(words, np.arange(len(words) * dim, dtype=np.float32).reshape(-1, dim))
  return kv


def test_vocabulary_keeps_known_training_words(tmp_path):
  recs = fake_records([["a red circle", "a zzyzx circle"], ["two red squares"]])
  kv = keyed_vectors(["circle", "red", "a", "squares", "blue", "two"])
  # Both of gensim's formats load: word2vec binary and gensim's own.
  kv.save_word2vec_format(str(tmp_path / "w.bin"), binary=True)
  kv.save(str(tmp_path / "w.kv"))
  for name in ("w.bin", "w.kv"):
    loaded = vocab_lib.load_word2vec(str(tmp_path / name))
    vocab = vocab_lib.from_word2vec(recs, loaded, name)
    assert set(vocab.words) == {"a", "red", "circle", "two", "squares"}  # no zzyzx, no blue
    table = vocab_lib.embedding_matrix(vocab, loaded, 4)
    np.testing.assert_array_equal(table[0], 0.0)  # padding row
    for i, word in enumerate(vocab.words):
      np.testing.assert_array_equal(table[i + 1], kv[word])
  index = vocab.index()
  assert vocab_lib.encode(index, "a zzyzx red circle".split(), 2) == [index["a"], index["red"]]
  vocab.save(str(tmp_path))
  assert vocab_lib.Vocabulary.load(str(tmp_path)) == vocab


def test_vocabulary_without_word2vec():
  recs = fake_records([["a red circle", "a red square"], ["a blue circle"]])
  assert set(vocab_lib.from_counts(recs, 2).words) == {"a", "red", "circle"}
  with pytest.raises(DataError, match="min_word_count"):
    vocab_lib.from_counts(recs, 10)


def test_captions_without_known_words_are_counted_and_left_out():
  recs = fake_records([["a red circle", "zzz qqq"], ["qqq"], ["red red"]])
  vocab = vocab_lib.Vocabulary(("a", "red", "circle"))
  train = pipeline.encode_split(recs, vocab, 8, for_training=True)
  assert train.num_empty_captions == 2
  assert train.num_images == 2 and list(train.labels) == [0, 2]  # image 1 had none left
  assert list(train.caption_count) == [1, 1]
  evaluation = pipeline.encode_split(recs, vocab, 8, for_training=False)
  assert evaluation.num_images == 3 and len(evaluation.tokens) == 4
  np.testing.assert_array_equal(evaluation.tokens[1], 0)
  with pytest.raises(DataError, match="no usable image/caption pair"):
    pipeline.encode_split(fake_records([["zzz"]]), vocab, 8, for_training=True)


# ---------------------------------------------------------------------------------- pipeline


def test_position_shift_keeps_words_in_order_and_reaches_every_offset():
  import tensorflow as tf
  max_len, words = 8, [5, 6, 7]
  tokens = tf.constant(words + [0] * (max_len - len(words)), tf.int32)
  offsets = set()
  for s in range(200):
    out = pipeline.position_shift(tokens, 3, tf.constant([s, 1], tf.int64), max_len, True)
    out = out.numpy()
    nonzero = np.flatnonzero(out)
    assert list(out[nonzero]) == words and nonzero[-1] - nonzero[0] == 2  # contiguous
    offsets.add(int(nonzero[0]))
  assert offsets == set(range(max_len - len(words) + 1))
  same = pipeline.position_shift(tokens, 3, tf.constant([0, 1], tf.int64), max_len, False)
  np.testing.assert_array_equal(same, tokens)


def test_random_crop_box_stays_inside_and_follows_the_ranges():
  import tensorflow as tf
  config = tiny_config()
  h, w = 375, 500
  areas = []
  for s in range(100):
    seeds = tf.random.experimental.stateless_split(tf.constant([s, 0], tf.int64), 7)
    top, left, ch, cw = pipeline.random_crop_box(h, w, seeds, config.data).numpy()
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
    assert 3 / 4 - 0.02 <= cw / ch <= 4 / 3 + 0.02
    areas.append(ch * cw)
  # The largest crop of aspect r in a 375 x 500 image has area <= 375 * 375 * r.
  assert min(areas) >= 0.64 * 375 * 375 * 0.75 * 0.95 and max(areas) <= 375 * 500


def train_batches(config, split, n, **kwargs):
  it = pipeline.numpy_batches(pipeline.train_dataset(split, config, 2, **kwargs),
                              split.image_paths)
  return [next(it) for _ in range(n)]


def test_train_batches_shapes_values_determinism_and_resume(synth):
  out, _ = synth
  config = synth_config(out)
  recs = records.read_split(config, "train")
  vocab = vocab_lib.from_word2vec(recs, vocab_lib.load_word2vec(config.data.word2vec), "w2v")
  split = pipeline.encode_split(recs, vocab, config.model.text.max_len, for_training=True)
  first = train_batches(config, split, 10)
  batch = first[0]
  assert batch["images"].shape == (8, 32, 32, 3) and batch["images"].dtype == np.float32
  assert batch["tokens"].shape == (8, 8) and batch["labels"].shape == (8,)
  mean = np.asarray(config.data.mean_rgb, np.float32)
  assert batch["images"].min() >= -mean.max() - 1e-3
  assert batch["images"].max() <= 255 - mean.min() + 1e-3
  # One epoch = 32 images = 4 batches of 8: every training image exactly once.
  epoch = np.concatenate([b["labels"].ravel() for b in first[:4]])
  assert sorted(epoch) == list(range(32))
  # Deterministic for a seed; a resumed stream gives the batches an unbroken one gave.
  again = train_batches(config, split, 10)
  resumed = train_batches(config, split, 3, start_step=7)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  for a, b in zip(first[7:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  other_seed = train_batches(synth_config(out, seed=1), split, 1)[0]
  assert not np.array_equal(other_seed["labels"], batch["labels"])
  # Every label's tokens are one of that image's captions (position shift aside).
  for b in first:
    for tokens, label in zip(b["tokens"].reshape(-1, 8), b["labels"].ravel()):
      start, count = split.caption_start[label], split.caption_count[label]
      words = tokens[tokens > 0]
      assert any(np.array_equal(words, row[row > 0])
                 for row in split.tokens[start:start + count])


def test_mined_candidate_pools_follow_seed_and_step_and_resume(synth):
  out, _ = synth
  config = synth_config(out, stage=2, **{"loss.lambdas": (1.0, 1.0, 1.0),
                                         "loss.negatives": "mined", "loss.num_mined": 12})
  recs = records.read_split(config, "train")
  vocab = vocab_lib.from_word2vec(recs, vocab_lib.load_word2vec(config.data.word2vec), "w2v")
  split = pipeline.encode_split(recs, vocab, config.model.text.max_len, for_training=True)
  first = train_batches(config, split, 6)
  assert first[0]["mined_tokens"].shape == (12, 8) and first[0]["mined_labels"].shape == (12,)
  # Each candidate is a stored caption, moved to a random position, with its image's label.
  offsets = set()
  for b in first:
    for tokens, label in zip(b["mined_tokens"], b["mined_labels"]):
      words, start = tokens[tokens > 0], int(np.argmax(tokens > 0))
      offsets.add(start)
      np.testing.assert_array_equal(tokens[start:start + len(words)], words)  # contiguous
      rows = [i for i, row in enumerate(split.tokens) if np.array_equal(row[row > 0], words)]
      assert rows and label in split.labels[split.caption_image[rows]]
  assert len(offsets) > 1
  assert not np.array_equal(first[0]["mined_tokens"], first[1]["mined_tokens"])
  # A resumed run draws the pools an unbroken one drew at the same steps.
  resumed = train_batches(config, split, 2, start_step=4)
  for a, b in zip(first[4:], resumed):
    for key in ("mined_tokens", "mined_labels"):
      np.testing.assert_array_equal(a[key], b[key])
  # Two hosts hold the two halves of the one-host pool; another seed draws another pool.
  hosts = [train_batches(config, split, 2, process_index=p, process_count=2) for p in (0, 1)]
  for step in range(2):
    np.testing.assert_array_equal(
        np.concatenate([h[step]["mined_tokens"] for h in hosts]), first[step]["mined_tokens"])
  other = train_batches(synth_config(out, seed=1, **{"loss.negatives": "mined", "stage": 2,
                                                     "loss.lambdas": (1.0, 1.0, 1.0),
                                                     "loss.num_mined": 12}), split, 1)[0]
  assert not np.array_equal(other["mined_tokens"], first[0]["mined_tokens"])


def test_flip_is_a_mirror(synth):
  import tensorflow as tf
  out, _ = synth
  config = synth_config(out)
  contents = tf.io.read_file(os.path.join(out, "images", "000000.png"))
  config.data.flip = False
  unflipped, flipped = set(), set()
  for s in range(12):
    seeds = tf.random.experimental.stateless_split(tf.constant([s, 0], tf.int64), 7)
    plain = pipeline.train_image(contents, seeds, 32, config.data).numpy()
    config.data.flip = True
    maybe = pipeline.train_image(contents, seeds, 32, config.data).numpy()
    config.data.flip = False
    if np.array_equal(plain, maybe):
      unflipped.add(s)
    else:
      np.testing.assert_array_equal(plain[:, ::-1], maybe)
      flipped.add(s)
  assert unflipped and flipped


def test_host_shards_are_disjoint_and_complete():
  for n, hosts in [(10, 1), (10, 2), (11, 4), (3, 3)]:
    shards = [pipeline.host_shard(n, p, hosts) for p in range(hosts)]
    joined = np.concatenate(shards)
    assert sorted(joined) == list(range(n)) and len(set(joined)) == n


def test_eval_datasets_cover_everything_in_order(synth):
  out, _ = synth
  config = synth_config(out)
  recs = records.read_split(config, "test")
  vocab = vocab_lib.from_word2vec(records.read_split(config, "train"),
                                  vocab_lib.load_word2vec(config.data.word2vec), "w2v")
  split = pipeline.encode_split(recs, vocab, 8, for_training=False)
  batches = list(pipeline.eval_images(split, config, batch_size=3).as_numpy_iterator())
  assert list(np.concatenate([b["index"] for b in batches])) == list(range(4))
  assert batches[0]["images"].shape == (3, 32, 32, 3)
  assert len(split.tokens) == 20
  assert list(split.caption_image) == [i for i in range(4) for _ in range(5)]


# ---------------------------------------------------------------------------------- bad input


def test_bad_files_are_named(tmp_path):
  write_image(str(tmp_path / "ok.png"))
  good = dict(filename="ok.png", split="train", sentences=[dict(tokens=["a"])])
  path = tmp_path / "d.json"
  path.write_text(json.dumps(dict(images=[good, dict(filename="gone.png", split="train",
                                                     sentences=[])])))
  with pytest.raises(DataError, match=r"1 image file\(s\).*images\[1\].*gone.png"):
    records.read_karpathy(str(path), str(tmp_path), "train")
  path.write_text(json.dumps(dict(images=[good, dict(filename="ok.png", sentences=[])])))
  with pytest.raises(DataError, match=r"d.json: images\[1\]: missing field 'split'"):
    records.read_karpathy(str(path), str(tmp_path), "train")
  path.write_text(json.dumps(dict(images=[good])))
  with pytest.raises(DataError, match="d.json: split 'val' is empty"):
    records.read_karpathy(str(path), str(tmp_path), "val")
  path.write_text("{not json")
  with pytest.raises(DataError, match="d.json: not valid JSON"):
    records.read_karpathy(str(path), str(tmp_path), "train")
  with pytest.raises(DataError, match="nothere.json: no such file"):
    records.read_karpathy(str(tmp_path / "nothere.json"), str(tmp_path), "train")
  with pytest.raises(DataError, match="w2v.bin: word2vec file not found"):
    vocab_lib.load_word2vec(str(tmp_path / "w2v.bin"))


def test_corrupt_image_is_named(tmp_path):
  config = tiny_config()
  paths = []
  for i in range(8):
    write_image(str(tmp_path / f"{i}.png"))
    paths.append(str(tmp_path / f"{i}.png"))
  with open(paths[5], "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n garbage")
  recs = [records.Record(p, (("a", "b"),), i, "train") for i, p in enumerate(paths)]
  split = pipeline.encode_split(recs, vocab_lib.Vocabulary(("a", "b")), 8, for_training=True)
  with pytest.raises(DataError, match="5.png"):
    train_batches(config, split, 2)
