"""writer.WriterClaim: one training job per workdir; stale claims recognised and taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from instance_loss_jax.workdir import writer


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _claim(workdir, **fields):
  claim = dict(host=socket.gethostname(), pid=os.getpid(), started=time.time() - 60,
               heartbeat=time.time(), job="other")
  claim.update(fields)
  with open(os.path.join(workdir, writer.CLAIM_FILE), "w") as f:
    json.dump(claim, f)
  return claim


def test_stale_means_a_dead_pid_here_or_an_old_heartbeat_anywhere():
  now = time.time()
  here, there = socket.gethostname(), "another-host"
  assert writer.stale_reason(dict(host=here, pid=os.getpid(), heartbeat=now)) is None
  assert "is gone" in writer.stale_reason(dict(host=here, pid=_dead_pid(), heartbeat=now))
  # Another host's pid says nothing here: only its heartbeat counts.
  assert writer.stale_reason(dict(host=there, pid=_dead_pid(), heartbeat=now - 10)) is None
  assert "heartbeat was 400 s ago" in writer.stale_reason(
      dict(host=there, pid=1, heartbeat=now - 400), now=now)


def test_a_live_claim_refuses_a_second_writer_and_changes_nothing(tmp_path):
  workdir = str(tmp_path)
  with writer.WriterClaim(workdir) as first:
    with open(os.path.join(workdir, writer.CLAIM_FILE)) as f:
      before = f.read()
    assert json.loads(before)["pid"] == os.getpid()
    with pytest.raises(writer.WorkdirBusy, match=(
        rf"workdir {workdir} is being written by another training job \(host "
        rf"{socket.gethostname()}, pid {os.getpid()}, started .*, last heartbeat \d+ s ago\)")):
      writer.WriterClaim(workdir).acquire()
    with open(os.path.join(workdir, writer.CLAIM_FILE)) as f:
      assert f.read() == before
    assert first.claim is not None
  assert os.listdir(workdir) == []  # released: the claim is gone


@pytest.mark.parametrize("stale", [dict(pid="dead"), dict(host="another-host", heartbeat=0.0)])
def test_a_stale_claim_is_taken_over(tmp_path, stale):
  workdir = str(tmp_path)
  old = _claim(workdir, **{k: (_dead_pid() if v == "dead" else v) for k, v in stale.items()})
  with writer.WriterClaim(workdir) as claim:
    assert claim.took_over and f"pid {old['pid']}" in claim.took_over
    assert writer.read_claim(workdir)["pid"] == os.getpid()


def test_another_hosts_fresh_claim_is_respected(tmp_path):
  _claim(str(tmp_path), host="another-host", pid=1)
  with pytest.raises(writer.WorkdirBusy, match="host another-host, pid 1"):
    writer.WriterClaim(str(tmp_path)).acquire()


def test_the_heartbeat_moves_and_a_claim_that_is_no_longer_ours_is_left(tmp_path):
  workdir = str(tmp_path)
  claim = writer.WriterClaim(workdir, heartbeat_s=0.05).acquire()
  first = writer.read_claim(workdir)["heartbeat"]
  time.sleep(0.3)
  assert writer.read_claim(workdir)["heartbeat"] > first
  claim._stop.set()  # pylint: disable=protected-access  (no beat overwrites the next claim)
  claim._thread.join()  # pylint: disable=protected-access
  _claim(workdir, job="newer")  # taken over meanwhile (it had looked stale to another job)
  claim.release()
  assert writer.read_claim(workdir)["job"] == "newer"
