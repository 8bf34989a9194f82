"""The training binary end to end: two stages, resume after SIGKILL, refusals, evaluation."""

import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from instance_loss_jax import backbone, inference, resume, sharding, trainer, training
from instance_loss_jax.workdir import checkpoint
from instance_loss_jax import config as config_lib
from instance_loss_jax.config import ConfigError
from instance_loss_jax.errors import DataError
from instance_loss_jax.data import records, synthetic
from instance_loss_jax.evaluation import evaluator

from helpers import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg, overrides=None):
  """configs/NAME.py:ARG through the binaries' loader."""
  return config_lib.load_config(os.path.join(ROOT, "configs", f"{name}.py:{arg}"), overrides)


def small_overrides(data_dir, epochs=2):
  """Flags that shrink configs/demo.py to a seconds-long run on the test's synthetic data."""
  return {
      "data.json": os.path.join(data_dir, "dataset.json"),
      "data.image_root": os.path.join(data_dir, "images"),
      "data.word2vec": os.path.join(data_dir, "word2vec.bin"),
      "data.resize_shorter": 40, "image_size": 32, "batch_size": 8,
      "model.image.width": 4, "model.text.max_len": 12, "model.text.word_dim": 16,
      # Two text stages, not the demo's four: every test that trains compiles ~1.6x faster.
      "model.text.blocks": (1, 1), "model.text.strides": (1, 2),
      "model.text.widths": (16, 64), "model.text.first_mids": (8, 32),
      "model.embed_dim": 32, "optim.schedule": ((epochs, 1.0),), "checkpoint_every": 4,
      "log_every": 2, "eval.batch_size": 8,
  }


def small_config(stage, data_dir, **extra):
  return load_config("demo", stage, {**small_overrides(data_dir), **extra})


def flags_for(overrides):
  out = []
  for key, value in overrides.items():
    if isinstance(value, tuple):
      value = ",".join(str(v) for v in value) if not isinstance(value[0], tuple) else (
          repr(value).replace(" ", ""))
    out.append(f"--config.{key}={value}")
  return out


def logged_scalars(workdir, tag):
  """The values of a TensorBoard scalar the trainer wrote in WORKDIR/tensorboard."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  values = []
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      values += [float(tf.make_ndarray(v.tensor)) for v in event.summary.value if v.tag == tag]
  assert values, f"no {tag} in {workdir}/tensorboard"
  return values


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synthetic"))
  synthetic.generate(out, num_images=40, seed=1, image_size=40, w2v_dim=16, w2v_epochs=2)
  return out


@pytest.fixture(scope="module")
def stage1(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("stage1"))
  results = trainer.train_and_evaluate(small_config("stage1", data_dir), workdir)
  return workdir, results


@pytest.mark.xdist_group("stage1")
@pytest.mark.slow
def test_two_stages_and_evaluation(data_dir, stage1, tmp_path):
  workdir1, results1 = stage1
  assert sorted(os.listdir(os.path.join(workdir1, "checkpoints"))) == ["4", "8"]
  assert os.path.isfile(os.path.join(workdir1, "vocab.json"))
  assert os.listdir(os.path.join(workdir1, "tensorboard"))
  assert results1["num_images"] == 4 and results1["num_captions"] == 20
  workdir2 = str(tmp_path / "stage2")
  # Stage II with the original's mined negatives: the pipeline supplies the candidate pools.
  config2 = small_config("stage2", data_dir, init_from=workdir1,
                         **{"loss.negatives": "mined", "loss.num_mined": 16})
  results2 = trainer.train_and_evaluate(config2, workdir2)
  assert results2["step"] == 8 and set(results2["metrics"]) >= {"rsum", "t2i_r10", "S"}
  # Stage I trained without the ranking term (lambda_1 = 0: not computed, logged as 0), Stage
  # II with it (> 0 at every logged step: a margin of 1 over 8 rows is never met by all).
  assert set(logged_scalars(workdir1, "train/rank_loss")) == {0.0}
  assert min(logged_scalars(workdir2, "train/rank_loss")) > 0
  # Stage II started from Stage I's variables: its text CNN is Stage I's plus 4 steps of SGD
  # (a fresh init would be uncorrelated with it).
  mgr1, mgr2 = checkpoint.manager(workdir1, read_only=True), checkpoint.manager(workdir2,
                                                                                 read_only=True)
  v1 = checkpoint.restore_variables(mgr1, 8)
  v2 = checkpoint.restore_variables(mgr2, 4)
  k1 = v1["params"]["text_encoder"]["stage1_block1"]["conv1"]["kernel"]
  k2 = v2["params"]["text_encoder"]["stage1_block1"]["conv1"]["kernel"]
  assert np.corrcoef(k1.ravel(), k2.ravel())[0, 1] > 0.9
  # Stage II trains the backbone, its BN statistics included: every leaf moved from Stage I's.
  for tree in ("params", "batch_stats"):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(v1[tree]["backbone"]),
                            jax.tree_util.tree_leaves(v2[tree]["backbone"])):
      assert not np.array_equal(a, b), f"{tree}/backbone{jax.tree_util.keystr(path)}"
  with open(os.path.join(workdir2, "vocab.json")) as a, open(os.path.join(workdir1,
                                                                          "vocab.json")) as b:
    assert json.load(a)["words"] == json.load(b)["words"]


@pytest.mark.xdist_group("stage1")
@pytest.mark.slow
def test_evaluation_is_repeatable_and_refuses_bad_requests(data_dir, stage1):
  workdir, results = stage1
  config = small_config("stage1", data_dir)
  again = evaluator.evaluate(config, workdir, "test")
  with open(results["written"]) as f:
    first_json = f.read()
  with open(again["written"]) as f:
    assert f.read() == first_json
  recorded = json.loads(first_json)
  assert (recorded["captions_per_image"], recorded["captions_not_scored"]) == (5, 0)
  with pytest.raises(checkpoint.CheckpointError, match=r"no step 5 .*have \[4, 8\]"):
    evaluator.evaluate(config, workdir, "test", step=5)
  with pytest.raises(Exception, match="split 'restval' is empty"):
    evaluator.evaluate(config, workdir, "restval")
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in .*nowhere/checkpoints"):
    evaluator.evaluate(config, os.path.join(workdir, "nowhere"), "test")
  other = small_config("stage1", data_dir, **{"model.text.pooling": "mean"})
  with pytest.raises(checkpoint.CheckpointError, match="model.text.pooling: checkpoint 'max'"):
    evaluator.evaluate(other, workdir, "test")


@pytest.mark.xdist_group("stage1")
@pytest.mark.slow
def test_the_eval_binary_reads_the_run_as_it_was_trained(data_dir, stage1, tmp_path):
  """`evaluate --workdir=RUN` alone: the run's recorded config, data paths included; its figures
  are the trainer's for the same checkpoint. --config.FIELD=VALUE overrides apply on top."""
  workdir, results = stage1
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
  evaluate = [sys.executable, "-m", "instance_loss_jax.cli.evaluate", f"--workdir={workdir}"]
  done = subprocess.run(evaluate, cwd=str(tmp_path), env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(os.path.join(workdir, "eval", f"test-{results['step']}.json")) as f:
    again = json.load(f)
  assert again["metrics"] == results["metrics"] and again["step"] == results["step"]
  # An override reaches the recorded config: a data file that is not there is named.
  done = subprocess.run(evaluate + ["--config.data.json=/nowhere/dataset.json"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
  assert done.stderr.strip().splitlines()[-1] == "error: /nowhere/dataset.json: no such file"
  done = subprocess.run(evaluate + ["--print_config", "--config.eval.split=val"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = done.stdout.splitlines()
  assert "eval.split='val'" in lines
  assert f"data.json={os.path.join(data_dir, 'dataset.json')!r}" in lines


@pytest.mark.slow
def test_a_learned_temperature_is_logged_checkpointed_and_carried_into_stage2(data_dir,
                                                                             tmp_path):
  # SigLIP as the ranking term: Stage I (no ranking term) keeps its temperature and bias at the
  # start; Stage II starts from Stage I's (its own config's starts differ, and are not used),
  # trains them, logs them and checkpoints them.
  workdir1, workdir2 = str(tmp_path / "one"), str(tmp_path / "two")
  siglip = {"loss.ranking": "sigmoid", "eval.at_end": False}
  trainer.train_and_evaluate(small_config("stage1", data_dir, **siglip), workdir1)
  trainer.train_and_evaluate(small_config("stage2", data_dir, init_from=workdir1, **{
      **siglip, "loss.sigmoid_bias_init": -5.0, "loss.sigmoid_log_scale_init": 0.0}), workdir2)
  v1 = checkpoint.restore_variables(checkpoint.manager(workdir1, read_only=True), 8)
  v2 = checkpoint.restore_variables(checkpoint.manager(workdir2, read_only=True), 8)
  one, two = v1["params"]["contrastive"], v2["params"]["contrastive"]
  assert float(one["bias"]) == -10.0 and float(one["log_scale"]) == pytest.approx(np.log(10.0))
  assert set(logged_scalars(workdir1, "train/logit_bias")) == {-10.0}
  assert logged_scalars(workdir2, "train/logit_bias")[0] == pytest.approx(-10.0, abs=0.1)
  assert logged_scalars(workdir2, "train/logit_scale")[0] == pytest.approx(10.0, rel=0.05)
  assert float(two["bias"]) != -10.0 and float(two["log_scale"]) != float(one["log_scale"])
  assert min(logged_scalars(workdir2, "train/rank_loss")) > 0


@pytest.mark.xdist_group("stage1")
@pytest.mark.slow
def test_a_contrastive_stage2_from_a_hinge_stage1_starts_its_temperature_at_the_config(
    data_dir, stage1, tmp_path):
  workdir = str(tmp_path / "two")
  trainer.train_and_evaluate(small_config("stage2", data_dir, init_from=stage1[0], **{
      "loss.ranking": "infonce", "loss.infonce_log_scale_init": 1.5, "eval.at_end": False,
      "optim.schedule": ((1, 1.0),)}), workdir)
  first = logged_scalars(workdir, "train/logit_scale")[0]  # the mean of steps 1-2
  assert first == pytest.approx(np.exp(1.5), rel=0.05)
  variables = checkpoint.restore_variables(checkpoint.manager(workdir, read_only=True), 4)
  assert float(variables["params"]["contrastive"]["log_scale"]) != 1.5  # and it trained


@pytest.mark.xdist_group("stage1")
@pytest.mark.slow
def test_pseudo_classes_from_pool5_kmeans_recorded_and_kept_by_stage2(data_dir, stage1, tmp_path,
                                                                        caplog):
  # Table 5: Stage I on K = 3 k-means classes of the backbone's pool5 features (the stage1
  # fixture's backbone, saved as a backbone directory); Stage II trains the same classes.
  from instance_loss_jax.data import pseudo_classes  # pylint: disable=g-import-not-at-top
  trained = checkpoint.restore_variables(checkpoint.manager(stage1[0], read_only=True), 8)
  path = str(tmp_path / "backbone")
  backbone.save_backbone(path, {k: trained[k]["backbone"] for k in ("params", "batch_stats")},
                         dict(source="test", format="test", depth=14, width=4,
                              stride_variant="v1", bn_epsilon=1e-5,
                              input=dict(mean_rgb=[0.5] * 3, std_rgb=[0.25] * 3, bgr=False)))
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  extra = {"data.pseudo_classes": 3, "eval.at_end": False}
  config1 = small_config("stage1", data_dir, backbone_init=path, **extra)
  with caplog.at_level(logging.INFO, logger="instance_loss_jax"):
    trainer.train_and_evaluate(config1, one)
  recorded = pseudo_classes.read_recorded(one)
  train = records.read_split(config1, "train")
  assert recorded["k"] == 3 and len(recorded["labels"]) == len(train)
  # The labels are k-means' of the pool5 features (the same seed), and more than one class.
  labels, _ = pseudo_classes.kmeans(resume.pool5_features(
      config_lib.with_input_convention(config1, backbone.read_origin(path)["input"]),
      [r.image_path for r in train]), 3, config1.seed)
  assert recorded["labels"] == labels.tolist() and len(set(labels.tolist())) > 1
  assert f"{len(train)} training images (3 classes)" in caplog.text
  # Stage II (no backbone_init) reads Stage I's classes and keeps them in its own workdir.
  trainer.train_and_evaluate(small_config("stage2", data_dir, init_from=one, **extra), two)
  assert pseudo_classes.read_recorded(two) == recorded
  for workdir in (one, two):
    variables = checkpoint.restore_variables(checkpoint.manager(workdir, read_only=True), 8)
    assert variables["params"]["w_share"]["kernel"].shape[-1] == 3
  # Another K on the same workdir is refused, naming the recorded one.
  with pytest.raises(DataError, match="k=3"):
    trainer.train_and_evaluate(small_config("stage2", data_dir, init_from=one, **{
        **extra, "data.pseudo_classes": 4}), two)


@pytest.mark.xdist_group("stage1")
@pytest.mark.slow
def test_without_device_prefetch_with_a_profile_the_run_is_the_same(data_dir, stage1, tmp_path,
                                                                    caplog, monkeypatch):
  # The stage1 fixture placed its batches 2 steps ahead (data.device_prefetch's default): placed
  # when each step starts, and with steps 2-3 traced, the run ends with the same variables.
  workdir, _ = stage1
  other = str(tmp_path / "run")
  config = small_config("stage1", data_dir, profile_steps=(2, 3), **{
      "data.device_prefetch": 0, "eval.at_end": False})
  # A metric the step adds is reported under its own name, on the console and in TensorBoard.
  step_call = training.TrainStep.__call__
  monkeypatch.setattr(training.TrainStep, "__call__", lambda self, state, batch: (
      lambda out: (out[0], {**out[1], "added_metric": np.float32(1.5)}))(
          step_call(self, state, batch)))
  with caplog.at_level(logging.INFO, logger="instance_loss_jax.trainer"):
    trainer.train_and_evaluate(config, other)
  a = checkpoint.restore_variables(checkpoint.manager(workdir, read_only=True), 8)
  b = checkpoint.restore_variables(checkpoint.manager(other, read_only=True), 8)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), jax.tree_util.keystr(path)
  traces = glob.glob(os.path.join(other, "tensorboard", "plugins", "profile", "*", "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  log = caplog.text
  assert "profiling steps 2-3" in log
  # XLA's FLOP count of the step, and the rate per device on each log line; no MFU on a CPU.
  assert re.search(r"train step: [0-9.e+]+ GFLOP per device", log)
  assert re.search(r"images_per_second [0-9.e+-]+, tflops_per_device [0-9.e+-]+, seconds_left",
                   log)
  assert "mfu" not in log
  assert re.search(r"step 8/8 \| train: .*added_metric 1.5\b", log)
  assert logged_scalars(other, "train/added_metric") == [1.5] * len(logged_scalars(other,
                                                                                   "train/loss"))


@pytest.mark.xdist_group("stage1")
@pytest.mark.slow
def test_the_data_prepared_as_tfds_trains_and_evaluates_the_same(data_dir, stage1, tmp_path):
  # The stage1 fixture's data, prepared as a TFDS dataset and read by record number: the run
  # ends with the same variables, bit for bit, and the same test figures and page.
  from instance_loss_jax.data import prepare  # pylint: disable=g-import-not-at-top  (TFDS)
  workdir, results = stage1
  tfds_dir = str(tmp_path / "tfds")
  prepare.prepare("synthetic", data_dir, tfds_dir, num_shards=2)
  other = str(tmp_path / "run")
  config = small_config("stage1", data_dir, **{
      "data.format": "tfds", "data.tfds_data_dir": tfds_dir, "data.tfds_name": "synthetic_scenes",
      "data.json": "", "data.image_root": ""})
  again = trainer.train_and_evaluate(config, other)
  a = checkpoint.restore_variables(checkpoint.manager(workdir, read_only=True), 8)
  b = checkpoint.restore_variables(checkpoint.manager(other, read_only=True), 8)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), jax.tree_util.keystr(path)
  assert again["metrics"] == results["metrics"]
  pages = [open(r["written"].replace(".json", "-gallery.html")).read() for r in (results, again)]
  assert pages[0].count("data:image/jpeg;base64,") == pages[1].count("data:image/jpeg;base64,")
  assert pages[1].count("data:image/jpeg;base64,") > 10


def dir_state(path):
  return sorted((root, f, os.path.getmtime(os.path.join(root, f)))
                for root, _, files in os.walk(path) for f in files)


@pytest.mark.xdist_group("stage1")
@pytest.mark.slow
def test_refusals_before_training_touch_nothing(data_dir, stage1, tmp_path):
  workdir1, _ = stage1
  before = dir_state(workdir1)
  # Resuming with another model.
  with pytest.raises(checkpoint.CheckpointError, match="model.embed_dim: checkpoint 32 vs run 48"):
    trainer.train_and_evaluate(small_config("stage1", data_dir, **{"model.embed_dim": 48}),
                               workdir1)
  # Stage II from a missing Stage I, or one holding another model.
  with pytest.raises(trainer.TrainingError, match="no such Stage I workdir"):
    trainer.train_and_evaluate(
        small_config("stage2", data_dir, init_from=str(tmp_path / "nope")), str(tmp_path / "a"))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"shape mismatches: .*params/image_head/fc1/kernel: run "
                           r"\(128, 48\) vs .* \(128, 32\)"):
    trainer.train_and_evaluate(
        small_config("stage2", data_dir, init_from=workdir1, **{"model.embed_dim": 48}),
        str(tmp_path / "b"))
  # A Stage I workdir whose vocabulary is not the checkpoint's.
  fake = tmp_path / "fake_stage1"
  os.makedirs(fake)
  os.symlink(os.path.join(workdir1, "checkpoints"), fake / "checkpoints")
  (fake / "vocab.json").write_text(json.dumps(dict(words=["only", "two"])))
  with pytest.raises(checkpoint.CheckpointError, match="vocab: checkpoint"):
    trainer.train_and_evaluate(small_config("stage2", data_dir, init_from=str(fake)),
                               str(tmp_path / "c"))
  # An unwritable workdir; a num_classes that the data contradicts.
  (tmp_path / "file").write_text("")
  with pytest.raises(trainer.TrainingError, match="not writable"):
    trainer.train_and_evaluate(small_config("stage1", data_dir), str(tmp_path / "file" / "w"))
  with pytest.raises(ConfigError, match="num_classes=7 but the training split has 32 groups"):
    trainer.train_and_evaluate(small_config("stage1", data_dir, num_classes=7),
                               str(tmp_path / "d"))
  # Missing data.
  with pytest.raises(records.DataError, match="nothere.json"):
    trainer.train_and_evaluate(small_config("stage1", data_dir, **{
        "data.json": str(tmp_path / "nothere.json")}), str(tmp_path / "e"))
  assert dir_state(workdir1) == before
  # The runs refused before their first step made their workdirs, and took them away again.
  assert not any(os.path.exists(tmp_path / name) for name in "abcde")


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_checkpoint(data_dir, tmp_path):
  workdir = str(tmp_path / "nan")
  config = small_config("stage1", data_dir, **{"optim.schedule": ((1, 1.0), (1, 1e30))})
  with pytest.raises(trainer.TrainingError, match=r"non-finite loss .* at step [5-8];.*step 4"):
    trainer.train_and_evaluate(config, workdir)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4"]


def training_command(workdir, overrides):
  return [sys.executable, "-m", "instance_loss_jax.cli.train", "--config=configs/demo.py:stage2",
          f"--workdir={workdir}"] + flags_for(overrides)


def run_binary(workdir, overrides, stop_signal=None, when=None, while_stopped=None):
  """Runs the training binary on 2 devices. With `stop_signal`: once `when(logged_steps,
  checkpoint_steps)` holds, freezes the run (SIGSTOP), checks it has not ended, calls
  `while_stopped(process)` if given, sends the signal and lets it go on (SIGCONT); returns
  (returncode, stderr, what the run had done at the signal).

  The freeze makes the test independent of the machine's speed: the signal always lands in a
  run that is still going, at the point the condition chose (a run of the faster tests' model
  once ended inside a fixed delay before its SIGTERM)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2))
  proc = subprocess.Popen(training_command(workdir, overrides), cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  # Read as it comes (a full pipe would block the run), and to see the steps it logs.
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")))
  reader.start()
  note = None
  if stop_signal is not None:
    note = "the condition never held before the run ended"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      logged = [int(m.group(1)) for m in map(_STEP_LOGGED.search, list(lines)) if m]
      saved = checkpoint_steps(workdir) if os.path.isdir(os.path.join(workdir, "checkpoints")) \
          else []
      if when(logged, saved):
        if signal_while_frozen([proc], proc, stop_signal, while_stopped):
          note = (f"{stop_signal.name} after logged steps {logged[-3:]}, checkpoints {saved}")
        else:
          note = f"the run ended before the stop (logged {logged[-3:]}, checkpoints {saved})"
        break
      time.sleep(0.01)
  proc.wait(timeout=600)
  reader.join()
  err = "".join(lines)
  if stop_signal is not None:
    return proc.returncode, err, note
  assert proc.returncode == 0, err[-3000:]
  return err


def signal_while_frozen(procs, target, stop_signal, while_stopped=None) -> bool:
  """Freezes every process of a job (SIGSTOP); if none has ended, calls `while_stopped(target)`
  and sends `stop_signal` to `target`; then lets them all go on (SIGCONT). Returns whether the
  signal was sent: the signal lands in a job that is still running, however slow the machine."""
  for proc in procs:
    proc.send_signal(signal.SIGSTOP)
    _wait_until_stopped(proc.pid)
  running = all(proc.poll() is None for proc in procs)
  if running:
    if while_stopped is not None:
      while_stopped(target)
    target.send_signal(stop_signal)
  for proc in procs:
    proc.send_signal(signal.SIGCONT)
  return running


def _wait_until_stopped(pid, timeout=30.0):
  """Until every thread of `pid` is stopped: SIGSTOP takes a thread in a system call (a file
  write, an fsync) only when the call returns, so the workdir may still change for a moment."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    states = set()
    try:
      tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:  # gone already: the caller's poll() says so
      return
    for task in tasks:
      try:
        with open(f"/proc/{pid}/task/{task}/stat") as f:
          states.add(f.read().rsplit(")", 1)[1].split()[0])
      except FileNotFoundError:  # a thread that has just ended
        continue
    if states <= {"T", "t", "Z", "X"}:
      return
    time.sleep(0.005)
  raise AssertionError(f"process {pid} did not stop within {timeout} s (states {states})")


_STEP_LOGGED = re.compile(r"\] step (\d+)/")
# 20 epochs of 4 steps, a checkpoint every 20, a log line every 2 steps: a SIGKILL between two
# checkpoints, at a point the test picks (run_binary's freeze).
RESUME_STEPS = 80


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
  """A Stage II run of the binary from start to end: what an interrupted one must end with."""
  overrides = {**small_overrides(data_dir, epochs=RESUME_STEPS // 4), "checkpoint_every": 20,
               "eval.at_end": False, "stage": 2, "freeze_backbone": False}
  root = tmp_path_factory.mktemp("uninterrupted")
  run_binary(str(root / "run"), overrides)
  return str(root / "run"), overrides


def checkpoint_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def assert_same_final_variables(straight, resumed, step=RESUME_STEPS):
  a = checkpoint.restore_variables(checkpoint.manager(straight, read_only=True), step)
  b = checkpoint.restore_variables(checkpoint.manager(resumed, read_only=True), step)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.mark.xdist_group("uninterrupted")
@pytest.mark.slow
def test_sigkill_at_any_step_then_the_resumed_run_ends_as_an_uninterrupted_one(uninterrupted,
                                                                              tmp_path):
  # SIGKILL (no chance to save) at a random step after the first checkpoint. Before the kill,
  # while the run is frozen, a second job on the same workdir is refused, naming the writer,
  # and changes nothing. (A SIGTERM, which saves the step it stops at, and its resume:
  # test_flaky_store.py with one process, test_multihost_preemption.py with two.)
  straight, overrides = uninterrupted
  resumed = str(tmp_path / "resumed")
  target = int(np.random.default_rng().integers(21, 70))
  second = {}

  def start_a_second_writer(first):
    before = dir_state(resumed)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2))
    done = subprocess.run(training_command(resumed, overrides), cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=300, check=False)
    second.update(code=done.returncode, err=done.stderr, pid=first.pid,
                  unchanged=dir_state(resumed) == before)

  code, _, note = run_binary(resumed, overrides, signal.SIGKILL,
                             lambda logged, saved: saved and logged and logged[-1] >= target,
                             while_stopped=start_a_second_writer)
  assert code == -signal.SIGKILL, note
  assert second["code"] == 1, second["err"][-2000:]
  refusal = [line for line in second["err"].splitlines() if line.startswith("error:")]
  assert len(refusal) == 1 and re.search(
      rf"workdir {resumed} is being written by another training job \(host .*, pid "
      rf"{second['pid']}, started ", refusal[0]), second["err"][-2000:]
  assert "Traceback" not in second["err"] and second["unchanged"]
  killed_at = checkpoint_steps(resumed)
  assert 20 <= killed_at[-1] < RESUME_STEPS, note
  # The next launch takes over the killed job's claim (its pid is gone), resumes from the
  # newest checkpoint and ends as the uninterrupted run did.
  log = run_binary(resumed, overrides)
  assert "took over the workdir from a job that is gone (host" in log
  assert f"pid {second['pid']}" in log and "on this host is gone" in log
  assert f"resuming from {resumed} step {killed_at[-1]}" in log
  assert_same_final_variables(straight, resumed)


@pytest.mark.xdist_group("stage1")
@pytest.mark.slow
def test_backbone_init_from_a_backbone_directory(data_dir, stage1, tmp_path):
  workdir1, _ = stage1
  trained = checkpoint.restore_variables(checkpoint.manager(workdir1, read_only=True), 8)
  ported = {k: trained[k]["backbone"] for k in ("params", "batch_stats")}
  origin = dict(source="test", format="test", depth=14, width=4, stride_variant="v1",
                bn_epsilon=1e-5,
                input=dict(mean_rgb=[1.0, 2.0, 3.0], std_rgb=[4.0, 5.0, 6.0], bgr=True))
  path = str(tmp_path / "backbone")
  backbone.save_backbone(path, ported, origin)
  with pytest.raises(backbone.BackboneError, match="exists"):
    backbone.save_backbone(path, ported, origin)
  # The public loader: a module and variables that give pooled features.
  module, variables = backbone.load_backbone(path)
  feats = module.apply(variables, np.zeros((2, 32, 32, 3), np.float32), train=False)
  assert feats.shape == (2, 128)
  # A run that starts from it: backbone equal to the file, input convention from the record.
  workdir = str(tmp_path / "run")
  config = small_config("stage1", data_dir, backbone_init=path,
                        **{"optim.schedule": ((1, 1.0),), "eval.at_end": False})
  trainer.train_and_evaluate(config, workdir)
  mgr = checkpoint.manager(workdir, read_only=True)
  got = checkpoint.restore_variables(mgr, mgr.latest_step())
  for (p, x), y in zip(jax.tree_util.tree_leaves_with_path(ported["params"]),
                       jax.tree_util.tree_leaves(got["params"]["backbone"])):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(p))  # frozen in Stage I
  assert checkpoint.read_meta(mgr, mgr.latest_step())["input"] == origin["input"]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["data"]["bgr"] is True
  # A record that contradicts the config is refused, listing each field.
  bad = str(tmp_path / "bad")
  backbone.save_backbone(bad, ported, {**origin, "depth": 50, "stride_variant": "v1.5"})
  with pytest.raises(backbone.BackboneError, match=r"depth=14 but the backbone has 50; "
                     r"model.image.stride_variant='v1' but the backbone has 'v1.5'"):
    trainer.train_and_evaluate(small_config("stage1", data_dir, backbone_init=bad),
                               str(tmp_path / "run2"))


@pytest.mark.xdist_group("stage1")
@pytest.mark.slow
def test_text_shift_sum_is_the_sum_over_offsets(data_dir, stage1):

  from instance_loss_jax.data import pipeline, records
  from instance_loss_jax.data.vocab import Vocabulary
  from instance_loss_jax.models import build_model
  workdir, _ = stage1
  vocab = Vocabulary.load(workdir)
  # Features after the ReLU: each offset's normalised embedding, summed, normalised.
  config = config_lib.run_config(small_config("stage1", data_dir,
                                               **{"eval.features": "after_relu"}), vocab.size, 32)
  variables = checkpoint.restore_variables(checkpoint.manager(workdir, read_only=True), 8)
  split = pipeline.encode_split(records.read_split(config, "test"), vocab, 12, False)
  two = sharding.make_mesh(jax.local_devices()[:2])
  fns = inference.make_embed_fns(config, two)
  _, txt = evaluator.embed_split(config, fns, fns.place(variables), split, text_shift_sum=True)
  model = build_model(config)
  embed = jax.jit(lambda t: model.apply(variables, t, method="text_embedding"))
  for row in (0, 7, 19):
    n = int(split.lengths[row])
    shifted = np.stack([np.roll(split.tokens[row], o) for o in range(12 - n + 1)])
    want = np.asarray(embed(shifted)).sum(0)
    np.testing.assert_allclose(txt[row], want / np.linalg.norm(want), rtol=1e-4, atol=1e-6)

  # The original's features: the text head's BatchNorm output before its ReLU, summed raw over
  # the offsets, then normalised; images: raw sum of the image's and its mirror's.
  original = config_lib.run_config(small_config("stage1", data_dir,
                                                 **{"eval.features": "original"}), vocab.size, 32)
  fns = inference.make_embed_fns(original, two)
  img, txt = evaluator.embed_split(original, fns, fns.place(variables), split,
                                    text_shift_sum=True)
  raw_text = jax.jit(lambda t: model.apply(variables, t, final_relu=False,
                                           method="text_features"))
  for row in (0, 7, 19):
    n = int(split.lengths[row])
    shifted = np.stack([np.roll(split.tokens[row], o) for o in range(12 - n + 1)])
    want = np.asarray(raw_text(shifted)).sum(0)
    assert (np.asarray(raw_text(shifted)) < 0).any()  # before the ReLU
    np.testing.assert_allclose(txt[row], want / np.linalg.norm(want), rtol=1e-4, atol=1e-6)
  images = next(pipeline.numpy_batches(pipeline.eval_images(split, original, 4),
                                       split.image_paths))["images"]
  raw_image = lambda x: np.asarray(model.apply(variables, x, final_relu=False,
                                               method="image_features"))
  want = raw_image(images) + raw_image(images[:, :, ::-1])
  np.testing.assert_allclose(img[:4], want / np.linalg.norm(want, axis=1, keepdims=True),
                             rtol=1e-4, atol=1e-6)



@pytest.mark.slow
def test_validation_during_training_keeps_the_best_checkpoint(data_dir, tmp_path):
  import tensorflow as tf
  workdir = str(tmp_path / "val")
  config = small_config("stage1", data_dir, **{"eval.every_steps": 4, "keep_checkpoints": 1,
                                                "checkpoint_every": 3})
  results = trainer.train_and_evaluate(config, workdir)
  mgr = checkpoint.manager(workdir, read_only=True)
  val = {s: checkpoint.read_meta(mgr, s).get("val") for s in mgr.all_steps()}
  # Saved at 3, 6 (checkpoint_every) and 4, 8 (validated, with the figures); kept: the newest
  # and the best of the validated ones.
  best = checkpoint.best_step(mgr)
  assert sorted(val) == sorted({8, best}) and all(v and "rsum" in v for v in val.values())
  assert results["step"] == best and results["split"] == "test"
  assert inference.load_run(workdir).step == best  # export's and the Index's default
  for step in (4, 8):
    assert os.path.isfile(os.path.join(workdir, "eval", f"val-{step}.json"))
  scalars, images = {}, set()
  for name in os.listdir(os.path.join(workdir, "tensorboard")):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, "tensorboard", name)):
      for value in event.summary.value:
        if value.tag == "val/rsum":
          scalars[event.step] = float(tf.make_ndarray(value.tensor))
        elif value.tag.startswith("val/") and value.metadata.plugin_data.plugin_name == "images":
          images.add(value.tag)
  assert sorted(scalars) == [4, 8]
  assert scalars[best] == max(scalars.values()) == pytest.approx(val[best]["rsum"])
  assert images == {"val/similarity", "val/correlation"}
