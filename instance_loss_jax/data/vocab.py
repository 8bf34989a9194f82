"""The word vocabulary: training-caption words that word2vec knows (no UNK), index 0 = padding.

A run writes its vocabulary to `<workdir>/vocab.json`; evaluation and Stage II reuse that file,
and a checkpoint is refused when its recorded vocabulary fingerprint differs.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import tempfile
from typing import Iterable, Sequence

import numpy as np

from instance_loss_jax import paths
from instance_loss_jax.data.records import DataError, Record, tokenize
from instance_loss_jax.errors import RetrievalError

VOCAB_FILE = "vocab.json"


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  words: tuple[str, ...]  # word i has index i + 1; 0 is padding
  source: str = ""  # where the words came from (word2vec file or "counts")

  @property
  def size(self) -> int:
    """Embedding rows, padding included."""
    return len(self.words) + 1

  @property
  def fingerprint(self) -> str:
    return hashlib.sha256("\n".join(self.words).encode("utf-8")).hexdigest()[:16]

  def index(self) -> dict[str, int]:
    return {w: i + 1 for i, w in enumerate(self.words)}

  def encode_sentences(self, sentences: Sequence[str], max_len: int,
                       split=tokenize) -> tuple[np.ndarray, list[list[str]]]:
    """Token rows [n, max_len] of free-text queries (left-aligned, as the evaluation embeds
    captions) and each sentence's words that the vocabulary does not know; `split`: the run's
    tokenizer (records.tokenizer). A sentence with no known word is an error naming it: its
    embedding would be the padding's."""
    index = self.index()
    rows = np.zeros((len(sentences), max_len), np.int32)
    unknown = []
    for i, sentence in enumerate(sentences):
      words = split(sentence)
      known = encode(index, words, max_len)
      unknown.append([w for w in words if w not in index])
      if not known:
        what = f"none of its words ({', '.join(words)})" if words else "it has no word"
        raise RetrievalError(f"query {sentence!r}: {what} in the run's vocabulary "
                             f"({len(self.words)} words)")
      rows[i, :len(known)] = known
    return rows, unknown

  def save(self, directory: str) -> str:
    return paths.write_text(paths.join(directory, VOCAB_FILE), json.dumps(dict(
        words=list(self.words), source=self.source, fingerprint=self.fingerprint)))

  @classmethod
  def load(cls, directory: str) -> "Vocabulary":
    path = paths.join(directory, VOCAB_FILE)
    if not paths.path(path).is_file():
      raise DataError(f"{path}: no vocabulary (written by the training run into its workdir)")
    try:
      data = json.loads(paths.path(path).read_text())
      vocab = cls(tuple(data["words"]), data.get("source", ""))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise DataError(f"{path}: not a vocabulary file ({e!r})") from None
    if data.get("fingerprint", vocab.fingerprint) != vocab.fingerprint:
      raise DataError(f"{path}: its words do not match its recorded fingerprint")
    return vocab


def load_word2vec(path: str):
  """gensim KeyedVectors from the word2vec binary (.bin, .bin.gz: GoogleNews), word2vec text
  (.txt, .vec) or gensim's own format (anything else)."""
  # Imported here: gensim (and SciPy) take seconds to import, only for a word2vec file.
  from gensim.models import KeyedVectors  # pylint: disable=g-import-not-at-top
  if not paths.path(path).is_file():
    raise DataError(f"{path}: word2vec file not found")
  try:
    with tempfile.TemporaryDirectory() as tmp:
      local = paths.local_copy(path, tmp)  # gensim reads local files (and gensim's format too)
      if path.endswith((".bin", ".bin.gz")):
        return KeyedVectors.load_word2vec_format(local, binary=True)
      if path.endswith((".txt", ".vec", ".txt.gz")):
        return KeyedVectors.load_word2vec_format(local, binary=False)
      return KeyedVectors.load(local)
  except Exception as e:  # gensim raises many types for a bad file
    raise DataError(f"{path}: cannot be read as word2vec vectors ({e!r})") from None


def _training_words(records: Iterable[Record]) -> collections.Counter:
  return collections.Counter(w for r in records for c in r.captions for w in c)


def from_word2vec(records: Sequence[Record], keyed_vectors, source: str) -> Vocabulary:
  """Training words the vectors know, most frequent first (ties alphabetical)."""
  counts = _training_words(records)
  known = [w for w in counts if w in keyed_vectors.key_to_index]
  if not known:
    raise DataError(f"{source}: knows none of the {len(counts)} training words")
  return Vocabulary(tuple(sorted(known, key=lambda w: (-counts[w], w))), source)


def from_counts(records: Sequence[Record], min_count: int) -> Vocabulary:
  """The no-word2vec option: training words seen at least `min_count` times."""
  counts = _training_words(records)
  words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
  if not words:
    raise DataError(f"no training word occurs {min_count} times (data.min_word_count)")
  return Vocabulary(tuple(words), f"counts>={min_count}")


def embedding_matrix(vocab: Vocabulary, keyed_vectors, dim: int) -> np.ndarray:
  """[vocab.size, dim] float32: word2vec rows, zeros for padding."""
  if keyed_vectors.vector_size != dim:
    raise DataError(f"{vocab.source}: vectors have {keyed_vectors.vector_size} dimensions, "
                    f"model.text.word_dim is {dim}: set --config.model.text.word_dim="
                    f"{keyed_vectors.vector_size}, or give vectors of {dim} (the synthetic "
                    f"generator's: --w2v_dim={dim})")
  table = np.zeros((vocab.size, dim), np.float32)
  for i, word in enumerate(vocab.words):
    table[i + 1] = keyed_vectors[word]
  return table


def encode(vocab_index: dict[str, int], caption: Sequence[str], max_len: int) -> list[int]:
  """Known words' indices, unknown words dropped, the first `max_len` kept."""
  return [vocab_index[w] for w in caption if w in vocab_index][:max_len]
