"""Storage faults in words: what a failed checkpoint save or an unreadable checkpoint is
reported as, and moving an unreadable checkpoint aside (never deleted). docs/training.md,
"Storage faults", has the table.
"""

from __future__ import annotations

import os
import re
import shutil

from instance_loss_jax import paths
from instance_loss_jax.errors import StorageError

UNREADABLE_SUFFIX = ".unreadable"


def cause(error: BaseException) -> str:
  """The reason under an error from Orbax or TensorStore: the operating system's words where
  an errno is given ('No space left on device', 'Permission denied'), else the first line."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.strerror:
      return error.strerror
    code = re.search(r"os_error_code='?(\d+)", str(error))  # TensorStore's form
    if code:
      return os.strerror(int(code.group(1)))
    if error.__cause__ is None and error.__context__ is None:
      break
    error = error.__cause__ or error.__context__
  lines = str(error).strip().splitlines() or [type(error).__name__]
  return lines[0][:300]


def save_failure(directory: str, step: int | None, error: BaseException,
                 kept: list[int]) -> StorageError:
  """One line for a save that failed: the step, the directory, the cause, the free space where
  it can be read, and what is kept. The step's half-written directory
  (`<step>.orbax-checkpoint-tmp`) is no step to any reader; Orbax's writer threads may still
  hold it, so it is left for the next run's manager to remove as it starts (Orbax's
  cleanup_tmp_directories), which gives its space back before the first save."""
  free = ""
  if not paths.is_remote(directory):
    try:
      free = f"; {shutil.disk_usage(directory).free / 2**20:.1f} MiB free there"
    except OSError:
      pass
  what = f"step {step}" if step is not None else "a checkpoint"
  if kept:
    after = (f"the checkpoints already written ({', '.join(map(str, kept))}) are intact; once "
             "it is mended, the same command resumes")
  else:
    after = "no checkpoint was written before it"
  return StorageError(f"saving {what} to {directory} failed: {cause(error)}{free}; {after}")


def move_aside(directory: str, step: int) -> str:
  """Renames `<directory>/<step>` to `<step>.unreadable` (`.unreadable.2`, ... when taken): no
  longer a step to Orbax, never deleted. Returns the new path."""
  root = paths.path(directory)
  target = root / f"{step}{UNREADABLE_SUFFIX}"
  n = 1
  while target.exists():
    n += 1
    target = root / f"{step}{UNREADABLE_SUFFIX}.{n}"
  (root / str(step)).rename(target)
  return str(target)
