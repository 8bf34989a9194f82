"""Storage faults in words: what a failed checkpoint save or an unreadable checkpoint is
reported as; going on from the newest checkpoint every process can read, the unreadable ones
moved aside (never deleted). docs/training.md, "Storage faults", has the table.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

import jax
import numpy as np
from jax.experimental import multihost_utils

from instance_loss_jax import paths
from instance_loss_jax.errors import CheckpointError, StorageError, UnreadableCheckpoint

log = logging.getLogger(__name__)

UNREADABLE_SUFFIX = ".unreadable"
READ, UNREADABLE, REFUSED = 0, 1, 2  # one process's verdict on one checkpoint
MESSAGE_BYTES = 1024  # of each process's reason, as gathered


def cause(error: BaseException) -> str:
  """The reason under an error from Orbax, TensorStore or gcsfs: the operating system's words
  where an errno is given ('No space left on device', 'Permission denied'), else the first
  line (and the object store's explanation under gcsfs's status line)."""
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
  lines = [line for line in str(error).strip().splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  if isinstance(error, OSError) and len(lines) > 1:
    # gcsfs's form, "Forbidden: <request URL>" over the store's own words: keep both.
    return f"{lines[0]}: {lines[1]}"[:400]
  # TensorStore appends the store's whole answer ("[http_response_body=...]"): its message is
  # already in the line.
  return re.sub(r"\s*\[http_response_body=.*$", "", lines[0])[:300]


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


def newest_readable(mgr, read, what: str):
  """(step, read(step)) for the newest step of `mgr` that `read` can read on every process.
  Steps newer than it that could not be read (UnreadableCheckpoint, on any process) are then
  moved aside by process 0 (`move_aside`), each logged in one line with the reason. When no
  step can be read, nothing is moved (the same failure on every step says more about the
  reader than the files) and one CheckpointError names each.

  Each process reads its own shards, so a damaged file may fail one process only: after each
  try, every process learns every verdict (`_gathered`, a collective) and they all go on to
  the same step. `read` must therefore not wait for the other processes itself (see
  checkpoint._restore_item). A refusal (CheckpointError: the checkpoint does not fit the run)
  stops every process."""
  unreadable = []  # (step, reason) of the steps newer than the one read
  for step in sorted(mgr.all_steps(), reverse=True):
    result, verdict, refusal = None, (READ, ""), None
    try:
      result = read(step)
    except UnreadableCheckpoint as e:
      verdict = (UNREADABLE, str(e))
    except CheckpointError as e:
      verdict, refusal = (REFUSED, str(e)), e
    verdicts = _gathered(*verdict)
    if refusal is not None:
      raise refusal
    refused = [i for i, (status, _) in enumerate(verdicts) if status == REFUSED]
    if refused:
      raise CheckpointError(f"{what}: {verdicts[refused[0]][1]} (on process {refused[0]})")
    failed = [(i, reason) for i, (status, reason) in enumerate(verdicts) if status == UNREADABLE]
    if not failed:
      _move_all_aside(mgr, unreadable, what)
      return step, result
    reason = failed[0][1]
    if len(verdicts) > 1:
      reason += f" (on process{'es' if len(failed) > 1 else ''} "
      reason += ", ".join(str(i) for i, _ in failed) + ")"
    unreadable.append((step, reason))
  if not unreadable:
    raise CheckpointError(f"{what}: no checkpoint in {mgr.directory}")
  raise CheckpointError(f"{what}: no checkpoint in {mgr.directory} can be read (none moved): "
                        + "; ".join(reason for _, reason in unreadable))


def _move_all_aside(mgr, unreadable: list[tuple[int, str]], what: str) -> None:
  """Process 0 moves the unreadable steps aside; every process then reloads the step list."""
  if not unreadable:
    return
  verdict = (READ, "")
  for step, reason in unreadable:
    if jax.process_index() != 0:
      log.warning("%s: %s; process 0 moves it aside", what, reason)
      continue
    try:
      moved = move_aside(str(mgr.directory), step)
    except Exception as e:  # pylint: disable=broad-exception-caught  (gcsfs's are not OSErrors)
      verdict = (UNREADABLE, f"{what}: {reason}; moving it aside failed: {cause(e)}")
      break
    log.warning("%s: %s; moved to %s", what, reason, moved)
  verdicts = _gathered(*verdict)  # also the barrier: no process lists the steps before the moves
  if verdicts[0][0] != READ:
    raise StorageError(verdicts[0][1])
  mgr.reload()


def _gathered(status: int, message: str) -> list[tuple[int, str]]:
  """Every process's (status, message), in process order. A collective: every process calls it
  the same number of times. The messages (cut to MESSAGE_BYTES) travel only when a status is
  not READ."""
  if jax.process_count() == 1:
    return [(status, message)]
  statuses = multihost_utils.process_allgather(np.int32(status))
  if not statuses.any():
    return [(READ, "")] * len(statuses)
  return [(int(s), m) for s, m in zip(statuses, gather_text(message))]


def gather_text(text: str, size: int = MESSAGE_BYTES) -> list[str]:
  """Every process's `text` (cut to `size` bytes of UTF-8), in process order: a collective,
  which every process calls the same number of times. The one way text crosses processes here
  (the verdicts on a checkpoint; the writer claim's refusal)."""
  if jax.process_count() == 1:
    return [text]
  data = np.zeros(size, np.uint8)
  encoded = text.encode("utf-8")[:size]
  data[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  return [bytes(m).rstrip(b"\0").decode("utf-8", errors="replace")
          for m in np.asarray(multihost_utils.process_allgather(data))]
