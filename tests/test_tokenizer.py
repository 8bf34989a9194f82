"""The authors' tokenisation (`data.tokenizer="original"`), as their MATLAB data preparation
does it: strsplit(line, {'-', ' ', '.', ',', '(', ')'}, 'CollapseDelimiters', true) (MSCOCO's
also on '?'), case kept; unknown words dropped and the first L known kept by the encoder."""

import json
import os

import numpy as np
import pytest

from helpers import tiny_config
from instance_loss_jax.data import prepare, records, tfds_source
from instance_loss_jax.data import vocab as vocab_lib


def matlab_strsplit(line, delimiters):
  """MATLAB's strsplit(line, delimiters, 'CollapseDelimiters', true), written out character by
  character (not a regular expression); MATLAB keeps an empty first or last token, which the
  authors' dictionary lookup then skips, so empty tokens are dropped here."""
  tokens, current = [], ""
  for ch in line:
    if ch in delimiters:
      tokens.append(current)
      current = ""
    else:
      current += ch
  tokens.append(current)
  return [t for t in tokens if t]


@pytest.mark.parametrize("line", [
    "A man's dog-house (red), 2.5 m.", "  Two  people--talk...", "Is it a cat? Yes, it is.",
    "(x)", "", "UPPER lower MiXeD", "tab\tkept"])
@pytest.mark.parametrize("delimiters", ["-.,()", "-.,()?"])
def test_original_tokenizer_is_matlabs_strsplit(line, delimiters):
  config = tiny_config(**{"data.tokenizer": "original",
                          "data.original_delimiters": delimiters})
  split = records.tokenizer(config.data)
  assert list(split(line)) == matlab_strsplit(line, set(delimiters) | {" "})


def test_original_tokens_reach_the_vocabulary_records_and_queries(tmp_path):
  images = []
  for i, split in enumerate(["train", "train", "test", "val"]):
    raw = [f"A Dog-house {i}, (red).", f"Why? The Dog {i}."]
    images.append(dict(filename=f"{i}.png", imgid=i, split=split, sentences=[
        dict(raw=r, tokens=records.tokenize(r)) for r in raw]))
    from PIL import Image
    os.makedirs(tmp_path / "images", exist_ok=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / f"{i}.png")
  (tmp_path / "dataset.json").write_text(json.dumps(dict(images=images)))
  files = {"data.json": str(tmp_path / "dataset.json"),
           "data.image_root": str(tmp_path / "images")}
  words = tiny_config(**files)
  original = tiny_config(**files, **{"data.tokenizer": "original"})
  assert records.read_split(words, "train")[0].captions[0] == ("a", "dog", "house", "0", "red")
  train = records.read_split(original, "train")
  assert train[0].captions == (("A", "Dog", "house", "0", "red"), ("Why?", "The", "Dog", "0"))
  with_question = tiny_config(**files, **{"data.tokenizer": "original",
                                          "data.original_delimiters": "-.,()?"})
  assert records.read_split(with_question, "train")[0].captions[1] == ("Why", "The", "Dog", "0")
  # The same from a prepared TFDS dataset (its stored tokens are the default tokenizer's; the
  # raw text is tokenised again).
  data_dir = str(tmp_path / "tfds")
  (tmp_path / "images").rename(tmp_path / "imgs")
  os.makedirs(tmp_path / "manual")
  os.rename(tmp_path / "imgs", tmp_path / "manual" / "images")
  os.rename(tmp_path / "dataset.json", tmp_path / "manual" / "dataset.json")
  prepare.prepare("synthetic", str(tmp_path / "manual"), data_dir)
  as_tfds = tiny_config(**{"data.format": "tfds", "data.tfds_data_dir": data_dir,
                           "data.tfds_name": tfds_source.SOURCES["synthetic"].builder,
                           "data.tokenizer": "original"})
  assert [r.captions for r in records.read_split(as_tfds, "train")] == [r.captions for r in train]
  # A free-text query is split the run's way: case kept, so "dog" is not "Dog".
  vocab = vocab_lib.Vocabulary(("Dog", "The", "A"))
  rows, unknown = vocab.encode_sentences(["The dog-Dog (A)"], 8, records.tokenizer(original.data))
  np.testing.assert_array_equal(rows[0, :3], [2, 1, 3])
  assert unknown == [["dog"]]
