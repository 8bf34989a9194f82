"""The TFDS builders and `data.prepare`: each dataset's files in their real layout (written
here), prepared in the ArrayRecord format and read back record by record against the sources
(the files' bytes, the JSON, and the JSON readers of data/records.py for labels and tokens)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from instance_loss_jax.data import prepare, records, synthetic, tfds_datasets, tfds_source
from instance_loss_jax.errors import DataError

from test_data import train_batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image(path, k, fmt):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(k)
  size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
  Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(path, fmt)


def write_karpathy(root, splits, coco=False, sentences_of=None):
  """dataset_flickr30k.json + flickr30k-images/, or dataset_coco.json + train2014/, val2014/.
  Five sentences an image, or `sentences_of[i]` for image i."""
  images = []
  for i, split in enumerate(splits):
    folder = ("train2014" if split in ("train", "restval") else "val2014") if coco else ""
    name = f"COCO_{folder}_{i:012d}.jpg" if coco else f"{1000 + i}.jpg"
    _image(os.path.join(root, folder or "flickr30k-images", name), i, "JPEG")
    sentences = [dict(tokens=["A", "Dog", str(i), f"w{j}"], raw=f"A Dog {i}, w{j}.",
                      imgid=i, sentid=10 * i + j) for j in range((sentences_of or {}).get(i, 5))]
    if i == 1:  # a sentence with raw text only: the readers tokenize it
      sentences[0] = dict(raw="Raw only, no tokens!")
    entry = dict(filename=name, imgid=i, split=split, sentences=sentences)
    if coco:
      entry.update(filepath=folder, cocoid=500000 + i)
    images.append(entry)
  name = "dataset_coco.json" if coco else "dataset_flickr30k.json"
  with open(os.path.join(root, name), "w", encoding="utf-8") as f:
    json.dump(dict(images=images, dataset="coco" if coco else "flickr30k"), f)
  return os.path.join(root, name), root if coco else os.path.join(root, "flickr30k-images")


def write_cuhk_pedes(root):
  """reid_raw.json + imgs/<camera set>/... (PNG and JPEG, as in the release)."""
  entries = []
  people = [(11, "train"), (11, "train"), (4, "train"), (11, "train"), (8, "val"), (8, "val"),
            (2, "test"), (9, "test"), (2, "test")]
  for i, (pid, split) in enumerate(people):
    rel = f"CUHK01/{i:07d}.png" if i % 2 else f"test_query/p{pid}_s{i}.jpg"
    _image(os.path.join(root, "imgs", rel), i, "PNG" if i % 2 else "JPEG")
    entries.append(dict(split=split, id=pid, file_path=rel, processed_tokens=[],
                        captions=[f"A woman in a RED coat {i}.", "She wears black shoes"]))
  with open(os.path.join(root, "reid_raw.json"), "w", encoding="utf-8") as f:
    json.dump(entries, f)
  return os.path.join(root, "reid_raw.json"), os.path.join(root, "imgs")


def write_source(dataset, root):
  """The dataset's files in `root`; (annotation file, image root) for the JSON readers."""
  if dataset == "flickr30k":
    return write_karpathy(root, ["train", "val", "train", "test", "train", "val", "test"])
  if dataset == "mscoco":
    return write_karpathy(root, ["train", "restval", "val", "test", "restval", "train", "test",
                                 "val"], coco=True)
  if dataset == "cuhk_pedes":
    return write_cuhk_pedes(root)
  synthetic.generate(root, num_images=20, seed=1, image_size=32, w2v_dim=4, w2v_epochs=1)
  return os.path.join(root, "dataset.json"), os.path.join(root, "images")


def read_back(dataset, data_dir, split, config=tfds_datasets.IMAGES):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder_from_directory(prepare.version_dir(dataset, data_dir, config))
  decoders = {"image": tfds.decode.SkipDecoding()} if config == tfds_datasets.IMAGES else None
  source = builder.as_data_source(split, decoders=decoders)
  return [source[k] for k in range(len(source))]


def expected(dataset, json_path, image_root, split):
  """What the records of `split` hold, from the sources without the builders' code."""
  with open(json_path, encoding="utf-8") as f:
    data = json.load(f)
  if dataset == "cuhk_pedes":
    entries = [e for e in data if e["split"] == split]
    read = records.read_cuhk_pedes(json_path, image_root, split)
    raws = [e["captions"] for e in entries]
    rels = [e["file_path"] for e in entries]
    ids = [i for i, e in enumerate(data) if e["split"] == split]
    groups = [e["id"] for e in entries]
  else:
    entries = [im for im in data["images"] if im["split"] == split]
    read = records.read_karpathy(json_path, image_root, split, train_splits=(split,))
    raws = [[s.get("raw") for s in im["sentences"]] for im in entries]
    rels = [os.path.join(im.get("filepath", ""), im["filename"]) for im in entries]
    ids = [im.get("cocoid", im["imgid"]) for im in entries]
    groups = ids
  return [dict(bytes=open(r.image_path, "rb").read(), filename=rel, id=i, group=g,
               label=r.label, tokens=r.captions, raw=raw)
          for r, rel, i, g, raw in zip(read, rels, ids, groups, raws)]


@pytest.mark.parametrize("dataset", ["flickr30k", "mscoco", "cuhk_pedes", "synthetic"])
def test_prepared_records_equal_the_sources(dataset, tmp_path):
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "tfds")
  json_path, image_root = write_source(dataset, manual)
  done = prepare.prepare(dataset, manual, data_dir, num_shards=2)
  assert not done.reused and done.path == prepare.dataset_dir(dataset, data_dir)
  source = tfds_datasets.SOURCES[dataset]
  assert list(done.splits) == list(source.splits)
  for split in source.splits:
    got, want = read_back(dataset, data_dir, split), expected(dataset, json_path, image_root,
                                                              split)
    captions = read_back(dataset, data_dir, split, tfds_datasets.CAPTIONS)
    assert len(captions) == len(got)
    for c, g in zip(captions, got):  # the same records without the image
      assert sorted(c) == sorted(set(g) - {"image"})
      for key in c:
        if key != "captions":
          assert c[key] == g[key], key
      assert {k: list(v) for k, v in c["captions"].items()} == {
          k: list(v) for k, v in g["captions"].items()}
    assert done.splits[split][:2] == (len(want), 2)
    assert len(got) == len(want), split
    for k, (g, w) in enumerate(zip(got, want)):
      where = f"{split}[{k}]"
      assert g["image"] == w["bytes"], where  # as stored, not re-encoded
      assert g["image/filename"].decode() == w["filename"], where
      assert (g["image/id"], g["group/id"], g["label"]) == (w["id"], w["group"], w["label"])
      assert [t.decode() for t in g["captions"]["text"]] == [
          raw if raw is not None else " ".join(tokens)
          for raw, tokens in zip(w["raw"], w["tokens"])], where
      assert [tuple(t.decode().split()) for t in g["captions"]["tokens"]] == list(w["tokens"])
  # Files: images, 2 shards per split; captions, 1 per split; TFDS's two JSON files each.
  assert done.files == 3 * len(source.splits) + 4
  again = prepare.prepare(dataset, manual, data_dir)
  assert again.reused and again.splits == done.splits and again.bytes == done.bytes


def test_missing_files_are_counted_and_nothing_is_written(tmp_path):
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "tfds")
  write_source("flickr30k", manual)
  os.remove(os.path.join(manual, "flickr30k-images", "1002.jpg"))
  os.remove(os.path.join(manual, "flickr30k-images", "1005.jpg"))
  with pytest.raises(DataError) as e:
    prepare.prepare("flickr30k", manual, data_dir)
  first = os.path.join(manual, "flickr30k-images", "1002.jpg")
  assert str(e.value) == f"manual_dir {manual}: 2 of 7 image files missing, the first: {first}"
  assert not os.path.exists(data_dir)
  write_source("flickr30k", manual)
  with pytest.raises(DataError, match=r"^num_shards=3: more than the 2 images of split 'val'$"):
    prepare.prepare("flickr30k", manual, data_dir, num_shards=3)
  assert not os.path.exists(data_dir)

  os.remove(os.path.join(manual, "dataset_flickr30k.json"))
  with pytest.raises(DataError, match=r"dataset_flickr30k.json not found .*docs/data.md"):
    prepare.prepare("flickr30k", manual, data_dir)
  with open(os.path.join(manual, "dataset_flickr30k.json"), "w") as f:
    f.write('{"images": [')
  with pytest.raises(DataError, match=r"dataset_flickr30k.json: not valid JSON"):
    prepare.prepare("flickr30k", manual, data_dir)
  assert not os.path.exists(data_dir)


def test_a_build_that_fails_midway_leaves_no_dataset(tmp_path, monkeypatch):
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "tfds")
  write_source("cuhk_pedes", manual)
  generate = tfds_datasets._CaptionedImages._generate_examples

  def failing(self, folder, images):
    for k, example in enumerate(generate(self, folder, images)):
      if k == 2:
        raise OSError("disk gone")
      yield example

  monkeypatch.setattr(tfds_datasets._CaptionedImages, "_generate_examples", failing)
  with pytest.raises(OSError, match="disk gone"):
    prepare.prepare("cuhk_pedes", manual, data_dir)
  assert not prepare.is_prepared("cuhk_pedes", data_dir)
  # No record file, no info file, no incomplete.* folder; TFDS's list of the builder's configs
  # stays (<name>/.config/metadata.json), and the empty folders.
  leftovers = [os.path.relpath(os.path.join(d, n), data_dir)
               for d, _, files in os.walk(data_dir) for n in files]
  assert leftovers == [os.path.join("cuhk_pedes", ".config", "metadata.json")], leftovers
  assert sorted(os.listdir(os.path.join(data_dir, "cuhk_pedes"))) == [".config", "captions"]
  assert os.listdir(os.path.join(data_dir, "cuhk_pedes", "captions")) == []
  monkeypatch.undo()
  assert not prepare.prepare("cuhk_pedes", manual, data_dir).reused
  assert len(read_back("cuhk_pedes", data_dir, "train")) == 4


@pytest.mark.slow  # two launches of the binary, TensorFlow imported in each
def test_the_command_reports_figures_and_names_a_missing_file(tmp_path):
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "tfds")
  write_source("cuhk_pedes", manual)
  command = [sys.executable, "-m", "instance_loss_jax.cli.prepare", "--dataset=cuhk_pedes",
             f"--manual_dir={manual}", f"--data_dir={data_dir}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                        check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"cuhk_pedes: {prepare.dataset_dir('cuhk_pedes', data_dir)} prepared in" in done.stdout
  assert "| train | 4 | 1 |" in done.stdout and "| all | 9 | 3 |" in done.stdout
  assert done.stdout.strip().splitlines()[-1] == (
      f"Train and evaluate on it with: --config.data.format=tfds "
      f"--config.data.tfds_data_dir={data_dir} --config.data.tfds_name=cuhk_pedes")

  os.remove(os.path.join(manual, "imgs", "CUHK01", "0000003.png"))
  command[-1] = f"--data_dir={tmp_path / 'other'}"
  done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                        check=False)
  ours = [line for line in done.stderr.splitlines() if line.startswith("error:")]
  missing = os.path.join(manual, "imgs", "CUHK01", "0000003.png")
  assert done.returncode == 1 and ours == [
      f"error: manual_dir {manual}: 1 of 9 image files missing, the first: {missing}"], done.stderr
  assert "Traceback" not in done.stderr and not os.path.exists(tmp_path / "other")


# ------------------------------------------------------------------- the pipelines on records


@pytest.fixture(scope="module")
def both_forms(tmp_path_factory):
  """The synthetic scenes as JSON + folder and as a prepared TFDS dataset (2 shards a split),
  with a config for each."""
  from helpers import tiny_config  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("both")
  out, data_dir = str(root / "synthetic"), str(root / "tfds")
  synthetic.generate(out, num_images=40, seed=3, image_size=48, w2v_dim=16, w2v_epochs=2)
  prepare.prepare("synthetic", out, data_dir, num_shards=2)
  files = {"data.json": os.path.join(out, "dataset.json"),
           "data.image_root": os.path.join(out, "images"),
           "data.word2vec": os.path.join(out, "word2vec.bin")}
  as_json = tiny_config(**files)
  as_tfds = tiny_config(**files, **{"data.format": "tfds", "data.tfds_data_dir": data_dir,
                                    "data.tfds_name": "synthetic_scenes"})
  return as_json, as_tfds


def _encoded(config, split, vocab=None):
  from instance_loss_jax.data import pipeline, vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  recs = records.read_split(config, split)
  if vocab is None:
    vocab = vocab_lib.from_word2vec(recs, vocab_lib.load_word2vec(config.data.word2vec), "w2v")
  return recs, vocab, pipeline.encode_split(recs, vocab, config.model.text.max_len,
                                            for_training=split == "train")


def test_records_and_files_give_the_same_vocabulary_batches_and_images(both_forms):
  from instance_loss_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  as_json, as_tfds = both_forms
  recs_j, vocab_j, train_j = _encoded(as_json, "train")
  recs_t, vocab_t, train_t = _encoded(as_tfds, "train")
  assert vocab_t.words == vocab_j.words
  assert [(r.captions, r.label) for r in recs_t] == [(r.captions, r.label) for r in recs_j]
  assert all(tfds_source.is_image_ref(r.image_path) for r in recs_t)
  for key in ("labels", "caption_start", "caption_count", "tokens", "lengths"):
    np.testing.assert_array_equal(getattr(train_t, key), getattr(train_j, key), err_msg=key)
  # Training batches: one host; each of two hosts; and resumed at step 5 (the stream reads only
  # records from there on).
  for kwargs, n in (({}, 6), ({"process_index": 0, "process_count": 2}, 3),
                    ({"process_index": 1, "process_count": 2}, 3), ({"start_step": 5}, 2)):
    for a, b in zip(train_batches(as_json, train_j, n, **kwargs),
                    train_batches(as_tfds, train_t, n, **kwargs)):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{kwargs} {key}")
  # Evaluation images, in order.
  _, _, test_j = _encoded(as_json, "test", vocab_j)
  _, _, test_t = _encoded(as_tfds, "test", vocab_j)
  a = list(pipeline.eval_images(test_j, as_json, 3).as_numpy_iterator())
  b = list(pipeline.eval_images(test_t, as_tfds, 3).as_numpy_iterator())
  assert len(a) == len(b) == 2
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["images"], y["images"])
    np.testing.assert_array_equal(x["index"], y["index"])
  # The evaluation page's thumbnails read the same bytes.
  for ref, path in zip(test_t.image_paths, test_j.image_paths):
    assert tfds_source.read_image(ref) == open(path, "rb").read()


def test_an_unprepared_dataset_says_which_command_prepares_it(both_forms, tmp_path):
  _, as_tfds = both_forms
  config = as_tfds.copy_and_resolve_references()
  config.data.tfds_data_dir = str(tmp_path / "empty")
  with pytest.raises(DataError, match=(
      r"TFDS dataset synthetic_scenes \(captions\) is not prepared under "
      r"data.tfds_data_dir=.*empty: no .*dataset_info.json. Prepare it with `python -m "
      r"instance_loss_jax.cli.prepare --dataset=synthetic --manual_dir=DIR_WITH_ITS_FILES "
      r"--data_dir=.*empty`")):
    records.read_split(config, "train")
  config = as_tfds.copy_and_resolve_references()
  config.data.train_splits = ("train", "restval")
  with pytest.raises(DataError, match=r"has no split 'restval' \(it has train, val, test\)"):
    records.read_split(config, "train")


def test_cuhk_pedes_is_person_retrieval_in_both_forms():
  from instance_loss_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  assert tfds_source.SOURCES["cuhk_pedes"].builder == config_lib.CUHK_PEDES_TFDS_NAME
  for path, person in (("configs/cuhk_pedes.py", True), ("configs/flickr30k.py", False),
                       ("configs/mscoco.py", False)):
    config = config_lib.load_config(os.path.join(ROOT, path + ":stage1"))
    assert config.data.format == "tfds"  # the prepared form by default
    assert config_lib.person_retrieval(config.data) == person
    config.data.format = "cuhk_pedes" if person else "karpathy"  # the files as published
    assert config_lib.person_retrieval(config.data) == person


def test_the_evaluation_scores_each_images_first_five_captions_in_both_forms(tmp_path):
  """MSCOCO's Karpathy test split has images of six and seven sentences; the field scores five
  (each image's first five in the file's order). The JSON and the prepared records alike; 0
  scores all; person retrieval scores all."""
  from helpers import tiny_config  # pylint: disable=g-import-not-at-top
  from instance_loss_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  scored_records = evaluator.scored_records
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "tfds")
  json_path, image_root = write_karpathy(manual, ["train", "restval", "test", "test", "test",
                                                  "val"], coco=True, sentences_of={2: 7, 4: 6})
  prepare.prepare("mscoco", manual, data_dir, num_shards=1)
  as_json = tiny_config(**{"data.json": json_path, "data.image_root": image_root})
  as_tfds = tiny_config(**{"data.format": "tfds", "data.tfds_data_dir": data_dir,
                           "data.tfds_name": "mscoco_karpathy"})
  words = lambda i, j: ("a", "dog", str(i), f"w{j}")
  for config in (as_json, as_tfds):
    recs, total = scored_records(config, "test")
    assert total == 7 + 5 + 6
    assert [r.captions for r in recs] == [tuple(words(i, j) for j in range(5)) for i in (2, 3, 4)]
    with config.unlocked():
      config.eval.captions_per_image = 0
    recs, total = scored_records(config, "test")
    assert [len(r.captions) for r in recs] == [7, 5, 6] and total == 18
    assert recs[0].captions[5:] == (words(2, 5), words(2, 6))
  pedes_json, pedes_root = write_cuhk_pedes(str(tmp_path / "pedes"))
  pedes = tiny_config(**{"data.format": "cuhk_pedes", "data.json": pedes_json,
                         "data.image_root": pedes_root, "eval.captions_per_image": 1})
  recs, total = scored_records(pedes, "test")
  assert [len(r.captions) for r in recs] == [2, 2, 2] and total == 6


def test_prepare_refuses_stale_records_and_overwrite_rebuilds(tmp_path):
  """A dataset prepared from other files than manual_dir now holds (a sentence edited, an image
  replaced) is refused, not silently reused; --overwrite rebuilds it from them."""
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "tfds")
  json_path, image_root = write_source("flickr30k", manual)
  prepare.prepare("flickr30k", manual, data_dir, num_shards=1)
  assert prepare.prepare("flickr30k", manual, data_dir).reused  # the same files: reused
  with open(json_path, encoding="utf-8") as f:
    data = json.load(f)
  data["images"][0]["sentences"][1]["raw"] = "An edited sentence."
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump(data, f)
  with pytest.raises(DataError, match=r"flickr30k_karpathy was prepared from other files than "
                     r".*manual holds \(sha256 .*\): prepare again with --overwrite"):
    prepare.prepare("flickr30k", manual, data_dir)
  done = prepare.prepare("flickr30k", manual, data_dir, num_shards=1, overwrite=True)
  assert not done.reused
  texts = [t.decode() for t in read_back("flickr30k", data_dir, "train",
                                         tfds_datasets.CAPTIONS)[0]["captions"]["text"]]
  assert texts[1] == "An edited sentence."
  _image(os.path.join(image_root, "1001.jpg"), 99, "JPEG")  # another image, another size
  with pytest.raises(DataError, match=r"image_bytes \d+ then, \d+ now"):
    prepare.prepare("flickr30k", manual, data_dir)


def test_the_tfds_path_names_what_to_set(both_forms, tmp_path):
  """prepare's --dataset key works as data.tfds_name; a name not prepared lists those that are;
  data.tfds_data_dir without data.format=tfds says so."""
  as_json, as_tfds = both_forms
  config = as_tfds.copy_and_resolve_references()
  config.data.tfds_name = "synthetic"  # prepare's key for synthetic_scenes
  assert [r.captions for r in records.read_split(config, "test")] == [
      r.captions for r in records.read_split(as_json, "test")]
  config.data.tfds_name = "flickr30k_karpathy"
  with pytest.raises(DataError, match=r"not prepared under .*; prepared there: synthetic_scenes "
                     r"\(data.tfds_name\)"):
    records.read_split(config, "test")
  config = as_json.copy_and_resolve_references()
  config.data.json = ""
  config.data.tfds_data_dir = as_tfds.data.tfds_data_dir
  with pytest.raises(DataError, match=r"data.tfds_data_dir is set, but data.format='karpathy': "
                     r"to read a prepared TFDS dataset, --config.data.format=tfds"):
    records.read_split(config, "test")
