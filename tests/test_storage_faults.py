"""Storage faults met with one line and no lost work: a disk that fills during a checkpoint save
(a real tmpfs, filled for real), and a newest checkpoint whose data files are truncated or
deleted (resume moves it aside and goes on from the one before; readers name it), also where
only one of two processes cannot read its shards of it (both go on from the same step). A run
that met a fault must end with the uninterrupted run's variables, bit for bit (so with its
evaluation too)."""

import errno
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import Processes, xla_flags
from instance_loss_jax import inference, trainer
from instance_loss_jax.workdir import checkpoint, faults
from instance_loss_jax.errors import CheckpointError, StorageError, UnreadableCheckpoint
from test_training import ROOT, data_dir, flags_for, small_config, small_overrides  # noqa: F401

STEPS = 16  # 4 epochs of 4 steps: checkpoints 4, 8, 12, 16, the newest three kept
OVERRIDES = {"optim.schedule": ((STEPS // 4, 1.0),), "eval.at_end": False}


def final_variables(workdir, step=STEPS):
  return checkpoint.restore_variables(checkpoint.manager(workdir, read_only=True), step)


def assert_same_variables(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def steps_in(workdir):
  return sorted(os.listdir(os.path.join(workdir, checkpoint.CHECKPOINT_DIR)))


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):  # noqa: F811
  """A run from start to end: what a run that met a fault must end with."""
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  trainer.train_and_evaluate(small_config("stage1", data_dir, **OVERRIDES), workdir)
  return workdir


@pytest.fixture
def tmpfs(tmp_path):
  """mount(size) -> a directory on a tmpfs of that size, unmounted after the test."""
  mounted = []

  def mount(size: str) -> str:
    target = tmp_path / f"tmpfs{len(mounted)}"
    target.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
      pytest.skip(f"cannot mount a tmpfs here (CI runs as root): {done.stderr.strip()}")
    mounted.append(target)
    return str(target)

  yield mount
  for target in mounted:
    # Lazily: the failed save's writer threads in this process may still hold a file there.
    subprocess.run(["umount", "--lazy", str(target)], check=False)


def fill(directory: str) -> str:
  """Writes a file into `directory` until its file system has no byte left; returns its path."""
  path = os.path.join(directory, "ballast")
  with open(path, "wb", buffering=0) as f:
    for chunk in (1 << 20, 1 << 12, 1):
      try:
        while True:
          f.write(b"\0" * chunk)
      except OSError as e:
        assert e.errno == errno.ENOSPC, e
  return path


@pytest.mark.xdist_group("storage_faults")
@pytest.mark.slow
def test_a_full_disk_during_a_save_stops_with_one_line_and_the_resume_is_exact(
    data_dir, straight, tmpfs, monkeypatch):  # noqa: F811
  workdir = os.path.join(tmpfs("64m"), "run")
  config = small_config("stage1", data_dir, **OVERRIDES)
  ballast = []
  save = checkpoint.save

  def save_on_a_disk_that_fills(mgr, step, *args, **kwargs):
    if step == 8:  # after step 4's checkpoint: the disk fills before step 8's is written
      checkpoint.finish(mgr)
      ballast.append(fill(os.path.dirname(workdir)))
    return save(mgr, step, *args, **kwargs)

  monkeypatch.setattr(checkpoint, "save", save_on_a_disk_that_fills)
  with pytest.raises(StorageError) as failed:
    trainer.train_and_evaluate(config, workdir)
  message = str(failed.value)
  assert message.startswith(f"saving step 8 to {workdir}/checkpoints failed: No space left on "
                            "device; "), message
  assert "MiB free there; the checkpoints already written (4) are intact" in message
  assert "\n" not in message
  # Step 4 is whole; step 8's partial write is no step to a reader, and the resume removes it.
  assert checkpoint.reader(workdir).all_steps() == [4]
  assert set(steps_in(workdir)) <= {"4", "8.orbax-checkpoint-tmp"}
  monkeypatch.setattr(checkpoint, "save", save)
  os.remove(ballast[0])
  trainer.train_and_evaluate(config, workdir)  # the same run again: resumes from step 4
  assert steps_in(workdir) == ["12", "16", "8"]
  assert_same_variables(final_variables(workdir), final_variables(straight))


@pytest.mark.xdist_group("storage_faults")
@pytest.mark.slow
def test_the_binary_reports_a_failed_save_in_one_line(data_dir, tmpfs):  # noqa: F811
  # A disk too small for the first checkpoint: Orbax's writer threads each fail, and the
  # binary says so once, without their tracebacks.
  workdir = os.path.join(tmpfs("512k"), "run")
  overrides = {**small_overrides(data_dir), **OVERRIDES}
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
  done = subprocess.run([sys.executable, "-m", "instance_loss_jax.cli.train",
                         "--config=configs/demo.py:stage1", f"--workdir={workdir}"]
                        + flags_for(overrides), cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600, check=False)
  assert done.returncode == 1, done.stderr[-3000:]
  errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(
      f"error: saving step 4 to {workdir}/checkpoints failed: No space left on device; "), \
      done.stderr[-3000:]
  assert errors[0].endswith("no checkpoint was written before it")
  assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, \
      done.stderr[-3000:]
  assert set(steps_in(workdir)) <= {"4.orbax-checkpoint-tmp"}  # no step to a reader


def damage(workdir: str, step: int, how: str, writer: int | None = None) -> None:
  """Truncates to half, or deletes, every OCDBT data file of a checkpoint's arrays (with
  `writer`: only those that process wrote)."""
  pattern = os.path.join(workdir, checkpoint.CHECKPOINT_DIR, str(step), "state")
  data = [os.path.join(root, f) for root, _, files in os.walk(pattern) for f in files
          if os.path.basename(root) == "d"
          and (writer is None or f"ocdbt.process_{writer}" in root)]
  assert data, pattern
  for path in data:
    if how == "truncated":
      os.truncate(path, os.path.getsize(path) // 2)
    else:
      os.remove(path)


@pytest.mark.xdist_group("storage_faults")
@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "deleted"])
def test_an_unreadable_newest_checkpoint_is_named_moved_aside_and_resume_goes_on(
    data_dir, straight, tmp_path, how, caplog):  # noqa: F811
  workdir = str(tmp_path / "run")
  shutil.copytree(straight, workdir)
  damage(workdir, STEPS, how)
  config = small_config("stage1", data_dir, **OVERRIDES)
  # A reader (the evaluation binary, export, search) names it and the other steps.
  with pytest.raises(CheckpointError, match=rf"checkpoint {workdir}/checkpoints/{STEPS} cannot "
                     rf"be read: .* \(other steps there: 8, 12\)"):
    inference.load_run(workdir, prefer="newest")
  # The trainer moves it aside, resumes from step 12 and ends as the uninterrupted run did.
  trainer.train_and_evaluate(config, workdir)
  aside = f"{STEPS}{faults.UNREADABLE_SUFFIX}"
  assert steps_in(workdir) == sorted(["8", "12", str(STEPS), aside])
  assert any(aside in r.getMessage() and "cannot be read" in r.getMessage()
             for r in caplog.records)
  assert_same_variables(final_variables(workdir), final_variables(straight))
  # Stage II's init_from: the same, from Stage I's workdir (which it only reads otherwise).
  damage(workdir, STEPS, how)
  caplog.clear()
  stage2 = str(tmp_path / "stage2")
  with caplog.at_level(logging.INFO, logger="instance_loss_jax"):  # ours only: fewer records
    trainer.train_and_evaluate(small_config("stage2", data_dir, init_from=workdir, **{
        "optim.schedule": ((1, 1.0),), "eval.at_end": False}), stage2)
  assert steps_in(workdir) == sorted(["8", "12", aside, f"{aside}.2"])
  said = [r.getMessage() for r in caplog.records]
  assert any(m.startswith(f"init_from={workdir}: checkpoint {workdir}/checkpoints/{STEPS} "
                          "cannot be read: ") and m.endswith(f"moved to {workdir}/checkpoints/"
                                                             f"{aside}.2") for m in said), said
  assert f"initialised from {workdir} step 12 (fresh optimiser state)" in said
  assert steps_in(stage2) == ["4"]
  source = checkpoint.reader(workdir)

  # When no step can be read (here: a reader that fails on every one), nothing is moved.
  def never(step):
    raise UnreadableCheckpoint(f"step {step}: unreadable", step)

  with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be read \(none moved\): "
                     r"step 12: unreadable"):
    faults.newest_readable(source, never, "resuming")
  assert "12" in steps_in(workdir)


@pytest.mark.slow
def test_two_processes_agree_on_the_step_when_one_cannot_read_its_shards(tmp_path):
  # Each process reads only its own shards: a damaged file of process 1's leaves process 0
  # able to read the newest checkpoint. Both must resume from the step before, the same one,
  # whole (tests/multiprocess_faults_worker.py: the trainer's resume, no step trained; the
  # resumed run's end is the one-process tests' above).
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "multiprocess_faults_worker.py")
  workdir = str(tmp_path / "run")
  outputs = Processes(lambda i, port: [sys.executable, worker, port, str(i), workdir], 2,
                      tmp_path).wait()
  outs, errs = [out for out, _ in outputs], [err for _, err in outputs]
  for out in outs:
    assert "resumed 4 OK" in out.splitlines(), out[-3000:]
  aside = f"8{faults.UNREADABLE_SUFFIX}"
  assert steps_in(workdir) == ["4", aside]
  # One line on each process, with the reason that only process 1 has.
  said = [[line for line in err.splitlines() if "cannot be read" in line] for err in errs]
  assert [len(lines) for lines in said] == [1, 1], errs[0][-3000:]
  prefix = f"resuming {workdir}: checkpoint {workdir}/checkpoints/8 cannot be read: "
  for lines, ending in zip(said, (f"(on process 1); moved to {workdir}/checkpoints/{aside}",
                                  "(on process 1); process 0 moves it aside")):
    assert prefix in lines[0] and lines[0].endswith(ending), lines[0]


def test_the_cause_is_the_operating_systems_words_else_the_first_line(tmp_path):
  # Whatever raised it: the OS, TensorStore (an errno in its message), Orbax (chained).
  assert faults.cause(OSError(errno.EACCES, "Permission denied")) == "Permission denied"
  quota = ValueError("RESOURCE_EXHAUSTED: Error writing local file \"x\": Failed to write 8 "
                     "bytes [os_error_code='122']")
  assert faults.cause(quota) == os.strerror(122)  # "Disk quota exceeded"
  # gcsfs: a status line over the store's own words, both kept.
  refused = OSError("Forbidden: http://store/upload/b/bucket/o?name=run%2F8\nsa@p.iam does not "
                    "have storage.objects.create access")
  assert faults.cause(refused) == ("Forbidden: http://store/upload/b/bucket/o?name=run%2F8: "
                                   "sa@p.iam does not have storage.objects.create access")
  try:
    try:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError as inner:
      raise RuntimeError("Save Finalize thread failed") from inner
  except RuntimeError as outer:
    assert faults.cause(outer) == "No space left on device"
  store = ValueError("PERMISSION_DENIED: gs://bucket/run: 403 Forbidden\n{json: ...}")
  assert faults.cause(store) == "PERMISSION_DENIED: gs://bucket/run: 403 Forbidden"
  # On an object store there is no free space to read; what is kept is still said.
  remote = faults.save_failure("gs://bucket/run/checkpoints", 60, store, [40, 50])
  assert str(remote) == ("saving step 60 to gs://bucket/run/checkpoints failed: PERMISSION_DENIED:"
                         " gs://bucket/run: 403 Forbidden; the checkpoints already written (40, "
                         "50) are intact; once it is mended, the same command resumes")
  # Moving aside never overwrites: a second damaged 60 gets its own name.
  for _ in range(2):
    (tmp_path / "60").mkdir()
    faults.move_aside(str(tmp_path), 60)
  assert sorted(os.listdir(tmp_path)) == ["60.unreadable", "60.unreadable.2"]
