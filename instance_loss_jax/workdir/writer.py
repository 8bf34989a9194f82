"""One training job writes a workdir at a time: a claim file, `WRITER.json`, in the workdir.

A second training job started on a workdir that a live job writes (a SLURM requeue while the
old job still runs, a command typed twice) would write the same checkpoints. The trainer claims
the workdir before it writes anything and refuses, in one line naming the writer, a workdir that
another live job holds. The claim is {host, pid, started, heartbeat, job}: process 0 of the job
writes it (all processes of a multi-host job are one writer) and rewrites `heartbeat` every
`HEARTBEAT_S` seconds from a thread; the end of the run removes it.

A claim is stale, and is taken over, when its writer is known to be gone: on the same host, a
pid that no longer exists (a SIGKILL, an out-of-memory kill); anywhere, a heartbeat older than
`STALE_S` (a host that died or lost the store).

Every write of the claim is conditional on the generation the job last saw: created only if
absent (GCS's `ifGenerationMatch=0`), taken over only if still the stale one that was read,
renewed and removed only while it is this job's. Two jobs that start at the same moment cannot
both win, on a local disk or on gs://. The writes go through TensorStore's key-value store,
the client under Orbax's checkpoints (its GCS driver sends the generation as the precondition;
its file driver holds a lock file while it compares).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import jax
import tensorstore as ts

from instance_loss_jax import paths
from instance_loss_jax.config import STORAGE_RETRY_S
from instance_loss_jax.errors import TrainingError
from instance_loss_jax.workdir import checkpoint, faults

log = logging.getLogger(__name__)
CLAIM_FILE = "WRITER.json"
HEARTBEAT_S = 30.0
STALE_S = 300.0  # ten missed heartbeats
# The claim's removal at the run's end retries a failing store this long, not the run's whole
# budget: it runs in `finally`, often after the store has already failed the run (the claim
# then goes stale and the next run takes it over).
RELEASE_RETRY_S = 5.0


class WorkdirBusy(TrainingError):
  """The workdir is claimed by another live training job."""


def _kvstore(workdir: str, retry_s: float) -> ts.KvStore:
  """TensorStore's key-value store over `workdir` (a local folder, gs:// or s3://), retrying a
  failing object store for about `retry_s` seconds."""
  location = paths.absolute(workdir)
  scheme, _, rest = location.rpartition("://")
  if not scheme:
    return ts.KvStore.open({"driver": "file", "path": location.rstrip("/") + "/"}).result()
  policy = checkpoint.retry_policy(retry_s)
  context = ts.Context({"gcs_request_retries": policy, "s3_request_retries": policy})
  bucket, _, prefix = rest.partition("/")
  driver = {"gs": "gcs", "s3": "s3"}.get(scheme)
  if driver is None:
    raise TrainingError(f"workdir {workdir}: no claim store for {scheme}:// (gs:// and s3:// "
                        "are supported)")
  prefix = prefix.strip("/")
  return ts.KvStore.open({"driver": driver, "bucket": bucket,
                          "path": prefix + "/" if prefix else ""}, context=context).result()


def _parse(value: bytes) -> dict[str, Any] | None:
  try:
    claim = json.loads(value)
  except (json.JSONDecodeError, UnicodeDecodeError):
    return None
  return claim if isinstance(claim, dict) else None


def read_claim(workdir: str, retry_s: float = RELEASE_RETRY_S) -> dict[str, Any] | None:
  """The workdir's claim, or None if there is none (or it is not a claim)."""
  found = _kvstore(workdir, retry_s).read(CLAIM_FILE).result()
  return _parse(found.value) if found.state == "value" else None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process: alive
    return True
  return True


def stale_reason(claim: dict[str, Any], now: float | None = None,
                 stale_s: float = STALE_S) -> str | None:
  """Why `claim`'s writer is gone (then the claim may be taken over), or None if it may live."""
  now = time.time() if now is None else now
  if claim.get("host") == socket.gethostname() and not _pid_alive(int(claim.get("pid", -1))):
    return f"process {claim.get('pid')} on this host is gone"
  age = now - float(claim.get("heartbeat", 0))
  if age > stale_s:
    return f"its last heartbeat was {age:.0f} s ago (over {stale_s:.0f} s)"
  return None


def describe(claim: dict[str, Any], now: float | None = None) -> str:
  now = time.time() if now is None else now
  started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(float(claim.get("started", 0))))
  return (f"host {claim.get('host')}, pid {claim.get('pid')}, started {started}, last "
          f"heartbeat {now - float(claim.get('heartbeat', 0)):.0f} s ago")


class WriterClaim:
  """The claim of this job on `workdir`; `acquire()` before writing, `release()` at the end
  (or use it as a context manager)."""

  def __init__(self, workdir: str, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S,
               retry_s: float = STORAGE_RETRY_S):
    self.workdir, self.heartbeat_s, self.stale_s = workdir, heartbeat_s, stale_s
    self.retry_s = retry_s  # config.storage_retry_s: for the claim and its heartbeats
    self.path = paths.path(workdir) / CLAIM_FILE
    self.claim: dict[str, Any] | None = None
    self._generation = b""  # the store's generation of this job's claim, once written
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.took_over: str | None = None  # why an earlier claim was stale, if one was there

  def acquire(self) -> "WriterClaim":
    """Claims the workdir or raises WorkdirBusy naming its writer (on every process of the job:
    process 0 decides, the others follow)."""
    refusal = ""
    if jax.process_index() == 0:
      refusal = self._claim_or_refusal()
    refusal = faults.gather_text(refusal)[0]  # process 0's verdict, on every process
    if refusal:
      raise WorkdirBusy(refusal)
    return self

  def _claim_or_refusal(self) -> str:
    store = _kvstore(self.workdir, self.retry_s)
    found = store.read(CLAIM_FILE).result()  # a missing claim has the "no value" generation
    existing = _parse(found.value) if found.state == "value" else None
    if existing is not None:
      reason = stale_reason(existing, stale_s=self.stale_s)
      if reason is None:
        return (f"workdir {self.workdir} is being written by another training job ("
                f"{describe(existing)}); stop it first, or wait {self.stale_s:.0f} s after "
                f"it stopped heartbeating ({self.path})")
      self.took_over = f"{describe(existing)}: {reason}"
    now = time.time()
    claim = dict(host=socket.gethostname(), pid=os.getpid(), started=now, heartbeat=now,
                 job=uuid.uuid4().hex)
    # Written only if the claim is still what was read: of two jobs that read it at once, the
    # store lets one write (the other's precondition fails, an empty generation back).
    written = store.write(CLAIM_FILE, json.dumps(claim), if_equal=found.stamp.generation).result()
    if not written.generation:
      back = read_claim(self.workdir, self.retry_s)
      self.took_over = None
      return (f"workdir {self.workdir} was claimed at the same moment by another training job"
              f" ({describe(back) if back else 'its claim is gone again'})")
    self.claim, self._generation = claim, written.generation
    self._thread = threading.Thread(target=self._beat, name="writer_heartbeat", daemon=True)
    self._thread.start()
    return ""

  def _beat(self) -> None:
    store = _kvstore(self.workdir, self.retry_s)
    while not self._stop.wait(self.heartbeat_s):
      self.claim["heartbeat"] = time.time()
      try:
        written = store.write(CLAIM_FILE, json.dumps(self.claim),
                              if_equal=self._generation).result()
      except Exception as e:  # pylint: disable=broad-except
        # A store hiccup must not end the beats (a silent thread would let another job take
        # the workdir after STALE_S): say so, and the next beat tries again.
        log.warning("could not renew the claim %s (%s); retrying in %.0f s", self.path,
                    faults.cause(e), self.heartbeat_s)
        continue
      if not written.generation:  # another job took the workdir over: its claim stays
        other = read_claim(self.workdir)
        log.error("the claim %s is no longer this job's (now: %s); this job's checkpoints may "
                  "mix with the other's", self.path, describe(other) if other else "none")
        return
      self._generation = written.generation

  def release(self) -> None:
    """Stops the heartbeat and removes the claim if it is still this job's. A store that
    refuses is logged, not raised: a release runs in `finally`, where it must not replace the
    error that ended the run (the claim then goes stale, and the next run takes it over)."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self.claim is not None:
      self.claim = None
      try:  # a delete conditional on this job's generation: another job's claim stays
        _kvstore(self.workdir, RELEASE_RETRY_S).write(CLAIM_FILE, None,
                                                      if_equal=self._generation).result()
      except Exception as e:  # pylint: disable=broad-except
        log.warning("could not remove the claim %s (%s): the next run takes it over", self.path,
                    faults.cause(e))

  def __enter__(self) -> "WriterClaim":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

