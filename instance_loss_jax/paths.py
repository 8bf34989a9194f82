"""One path layer for every path a user gives us: local files and object stores (gs://, s3://)
alike, through etils.epath, which Orbax uses for its own directories too.

TensorFlow keeps its own file systems for what it reads and writes itself (tf.data's image files,
TensorBoard's event files); they understand gs:// as well.
"""

from __future__ import annotations

import json
import os

from etils import epath


def path(p) -> epath.Path:
  return epath.Path(p)


def is_remote(p) -> bool:
  return "://" in os.fspath(p)


def absolute(p) -> str:
  """A local path made absolute; an object-store URI as it is."""
  return os.fspath(p) if is_remote(p) else os.path.abspath(p)


def join(p, *parts) -> str:
  return os.fspath(epath.Path(p).joinpath(*parts))


def write_bytes(p, data: bytes) -> str:
  """Writes a file whole: on a local disk through a temporary file and a rename, so a reader
  never sees half of it; on an object store an object is replaced whole anyway."""
  target = epath.Path(p)
  if is_remote(p):
    target.write_bytes(data)
  else:
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
  return os.fspath(target)


def write_text(p, text: str) -> str:
  return write_bytes(p, text.encode("utf-8"))


def read_json(p, error: type[Exception], missing: str = "no such file",
              what: str = "not valid JSON"):
  """A JSON file's contents; `error` (the caller's kind: a DataError, a CheckpointError, ...)
  naming the file when it is missing (`p: missing`) or unreadable (`p: what (why)`)."""
  if not path(p).is_file():
    raise error(f"{p}: {missing}")
  try:
    return json.loads(path(p).read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise error(f"{p}: {what} ({e})") from None


def local_copy(p, directory: str) -> str:
  """`p` itself if local, else a copy in `directory` (for libraries that read local files
  only, such as gensim's word2vec loader)."""
  if not is_remote(p):
    return os.fspath(p)
  target = os.path.join(directory, epath.Path(p).name)
  with open(target, "wb") as f:
    f.write(epath.Path(p).read_bytes())
  return target
