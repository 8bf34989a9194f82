"""The training loop: data, global state on one device mesh, steps, Orbax checkpoints, logs,
final evaluation.

One resume order (as in big_vision), in resume.py: the run's own newest checkpoint, else
`init_from` (Stage I's workdir, for Stage II), else a fresh init with the word2vec table and,
when configured, a ported ImageNet backbone. Every check that can refuse a run happens before
the first step, and nothing is written into the workdir before those checks pass.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
import tensorflow as tf

from instance_loss_jax import inference, paths, resume, sharding, training
from instance_loss_jax.workdir import checkpoint, writer
from instance_loss_jax.config import ConfigError, run_config, validate_config
from instance_loss_jax.data import pipeline, records
from instance_loss_jax.errors import Preempted, TrainingError
from instance_loss_jax.evaluation.evaluator import Evaluator, evaluate
from instance_loss_jax.evaluation.tables import markdown_table
from instance_loss_jax.training import flops, optim
from instance_loss_jax.training.prefetch import DevicePrefetch

log = logging.getLogger(__name__)


def check_workdir(workdir: str) -> None:
  """Creates the workdir (local or on an object store) and checks that it takes a file."""
  probe = paths.path(workdir) / f".write-probe-{jax.process_index()}"
  try:
    paths.path(workdir).mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except (OSError, ValueError) as e:
    reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
    raise TrainingError(f"workdir {workdir} is not writable ({reason})") from None


def _fmt_time(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else (
      f"{seconds // 60}m{seconds % 60:02d}s")


class _Logger:
  """Console line and TensorBoard scalars; only process 0 writes."""

  def __init__(self, workdir: str, total_steps: int, config):
    self.total, self.batch_size = total_steps, config.batch_size
    self.compute_dtype = config.compute_dtype
    self.device_kind = jax.devices()[0].device_kind
    self.flops_per_step = None  # per device, XLA's count (set after the first step)
    self.logdir = config.tensorboard_dir or paths.join(workdir, "tensorboard")
    self.writer = None
    if jax.process_index() == 0:
      self.writer = tf.summary.create_file_writer(self.logdir)
    self.last_time, self.last_step = time.time(), None

  def log_eval(self, step: int, results: dict[str, Any]):
    """Validation figures as TensorBoard scalars (val/...), its PNG figures as images."""
    m = results["metrics"]
    log.info("step %d | %s: rsum %.1f | R@1 i2t %.1f t2i %.1f | S %.4f", step,
             results["split"], m.get("rsum", float("nan")), m.get("i2t_r1", float("nan")),
             m.get("t2i_r1", float("nan")), m["S"])
    if self.writer is None:
      return
    with self.writer.as_default():
      for k, v in m.items():
        tf.summary.scalar(f"{results['split']}/{k}", float(v), step=step)
      for path in results.get("plots", []):
        name = os.path.basename(path).split("-", 2)[-1].removesuffix(".png")  # e.g. similarity
        image = tf.io.decode_png(paths.path(path).read_bytes(), channels=3)[None]
        tf.summary.image(f"{results['split']}/{name}", image, step=step)
    self.writer.flush()

  def log(self, history: list[tuple[int, dict[str, Any]]]):
    now = time.time()
    step = history[-1][0]
    first = self.last_step if self.last_step is not None else history[0][0] - 1
    rate = (step - first) * self.batch_size / max(now - self.last_time, 1e-9)
    self.last_time, self.last_step = now, step
    mean = {k: float(np.mean([m[k] for _, m in history])) for k in history[-1][1]}
    use = flops.utilisation(self.flops_per_step, rate / self.batch_size, self.device_kind,
                            self.compute_dtype)
    if self.writer is None:
      return
    with self.writer.as_default():
      for s, m in history:
        for k, v in m.items():
          tf.summary.scalar(f"train/{k}", float(v), step=s)
      tf.summary.scalar("train/images_per_second", rate, step=step)
      for k, v in use.items():
        tf.summary.scalar(f"train/{k}", v, step=step)
    self.writer.flush()
    left = (self.total - step) * self.batch_size / max(rate, 1e-9)
    speed = (f" | {use['tflops_per_device']:.3g} TFLOP/s/device" if use else "") + (
        f" (MFU {100 * use['mfu']:.1f}%)" if "mfu" in use else "")
    log.info(
        "step %d/%d | loss %.4f (rank %.4f, visual %.4f, textual %.4f) | acc img %.3f txt %.3f"
        " | lr %.2g | %.1f img/s%s | %s left", step, self.total, mean["loss"], mean["rank_loss"],
        mean["visual_loss"], mean["textual_loss"], mean["img_accuracy"], mean["txt_accuracy"],
        mean["learning_rate"], rate, speed, _fmt_time(left))


class _Profiler:
  """A jax.profiler trace of steps `config.profile_steps` = (first, last) on process 0, into the
  run's TensorBoard directory (TensorBoard's Profile tab; plugins/profile/<time>/)."""

  def __init__(self, steps: tuple[int, ...], logdir: str):
    self.first, self.last = tuple(steps) if steps else (0, -1)
    self.logdir, self.tracing = logdir, False

  def before(self, step: int) -> None:
    if step == self.first and jax.process_index() == 0:
      jax.profiler.start_trace(self.logdir)
      self.tracing = True
      log.info("profiling steps %d-%d into %s", self.first, self.last, self.logdir)

  def after(self, step: int, state) -> None:
    if self.tracing and step >= self.last:
      jax.block_until_ready(state)  # the trace holds the last step's device work
      self.stop()

  def stop(self) -> None:
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False


class _StopSignal:
  """SIGTERM (SLURM's and most GPU hosts' stop notice) as a flag the loop reads between steps.

  Only with one process: with several, JAX's preemption service takes the signal on every host
  and Orbax's `reached_preemption` makes all of them stop at the same step.
  """

  def __init__(self):
    self.reason = None
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.reason = signal.Signals(signum).name
    log.warning("%s received: saving a checkpoint after this step, then stopping",
                self.reason)

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _validate(evaluator, state, step: int, workdir: str, logger) -> dict[str, Any]:
  """The val split's evaluation from the state in memory (no checkpoint read back)."""
  variables = training.variables_of(state)
  # Host copies of what the embeddings need: W_share (perhaps huge, sharded) stays behind.
  variables = sharding.to_host(dict(
      params={k: v for k, v in variables["params"].items() if k != sharding.W_SHARE},
      batch_stats=variables["batch_stats"]))
  results = evaluator(variables, step, paths.join(workdir, "eval"), workdir)
  logger.log_eval(step, results)
  return results


def _train_loop(config, step_fn, state, batches, mgr, meta, logger, start, total_steps, stop,
                validate):
  pending = []  # (step, device metrics) since the last look at the host
  every = config.eval.every_steps
  profiler = _Profiler(config.profile_steps, logger.logdir)
  try:
    for step in range(start + 1, total_steps + 1):
      batch = next(batches)
      profiler.before(step)
      state, metrics = step_fn(state, batch)
      profiler.after(step, state)
      if logger.flops_per_step is None:
        # After the first call: its executable is the one analysed (no second compile).
        logger.flops_per_step = step_fn.flops(state, batch) or 0.0
        log.info("train step: %.4g GFLOP per device (XLA's count)",
                 logger.flops_per_step / 1e9)
        # The first call compiled the step: speed and time left count from here.
        logger.last_time, logger.last_step = time.time(), step
      pending = _after_step(config, state, step, metrics, pending, mgr, meta, logger, stop,
                            validate, total_steps, every)
  finally:
    profiler.stop()


def _after_step(config, state, step, metrics, pending, mgr, meta, logger, stop, validate,
                total_steps, every):
  """Logs, validates and saves as `step` asks; returns the metrics not yet logged. Raises on a
  non-finite loss (the newest checkpoint kept) or a stop request (after saving this step)."""
  pending = pending + [(step, metrics)]
  reason = stop.reason or ("preemption notice" if mgr.reached_preemption(step) else None)
  evaluate = validate is not None and (step % every == 0 or step == total_steps)
  save = step % config.checkpoint_every == 0 or step == total_steps or reason or evaluate
  if save or step % config.log_every == 0:
    history = [(s, sharding.to_host(m)) for s, m in pending]
    pending = []
    for s, m in history:
      if not np.isfinite(m["loss"]):
        checkpoint.finish(mgr)
        raise TrainingError(f"non-finite loss ({m['loss']}) at step {s}; the newest checkpoint "
                            f"(step {mgr.latest_step()}) is kept")
    logger.log(history)
    if save:
      val = validate(state, step)["metrics"] if evaluate else None
      checkpoint.save(mgr, step, state, meta, val)  # global arrays: each process its shards
  if reason:
    checkpoint.finish(mgr)  # a failed save raises here: the run did not stop with it saved
    raise Preempted(step, reason)
  return pending


def train_and_evaluate(config, workdir: str, mesh=None) -> dict[str, Any] | None:
  """Trains (or resumes) the run in `workdir` on `mesh` (default: every device of every
  process); returns the final evaluation's results."""
  validate_config(config)
  pipeline.keep_tensorflow_off_accelerators()  # before TensorBoard's writer starts TensorFlow
  created = not paths.path(workdir).exists()
  check_workdir(workdir)
  # Before anything is written: a workdir that another live job writes is refused here.
  claim = writer.WriterClaim(workdir).acquire()
  if claim.took_over:
    log.info("took over the workdir from a job that is gone (%s)", claim.took_over)
  phase = {"training": False}
  try:
    return _train_and_evaluate(config, workdir, mesh, phase)
  except BaseException:
    # A run that fails before its first step (missing data, a refused checkpoint, a bad
    # backbone) leaves no workdir behind if it made it: the same command, corrected, then
    # starts clean, and `ls` shows no run that never ran.
    if created and not phase["training"] and jax.process_index() == 0:
      claim.release()
      paths.path(workdir).rmtree()
    raise
  finally:
    claim.release()


def _train_and_evaluate(config, workdir: str, mesh, phase: dict[str, bool]):
  train_records = records.read_split(config, "train")
  num_classes = 1 + max(r.label for r in train_records)
  if config.num_classes and config.num_classes != num_classes:
    raise ConfigError(f"num_classes={config.num_classes} but the training split has "
                      f"{num_classes} groups (set 0 to take it from the data)")
  mgr = checkpoint.manager(workdir, keep=config.keep_checkpoints,
                           ocdbt=config.checkpoint_ocdbt)
  fresh = not mgr.all_steps() and not config.init_from
  vocab, table = resume.prepare_vocab(config, workdir, train_records, need_table=fresh)
  source = checkpoint.reader(config.init_from) if config.init_from else None
  config = run_config(config, vocab.size, num_classes, resume.input_convention_of(config, mgr, source))
  meta = checkpoint.run_meta(config, vocab.fingerprint)
  split = pipeline.encode_split(train_records, vocab, config.model.text.max_len, True)
  steps_per_epoch = split.num_images / config.batch_size
  total_steps = optim.num_train_steps(config, steps_per_epoch)
  mesh = mesh if mesh is not None else sharding.make_mesh()
  state, start = resume.initial_state(config, workdir, mgr, source, meta, table, steps_per_epoch,
                               mesh)
  if jax.process_index() == 0:
    vocab.save(workdir)
    checkpoint.write_config(workdir, config)
  log.info("%d training images (%d classes), vocabulary %d words, %d steps of %d",
           split.num_images, num_classes, len(vocab.words), total_steps, config.batch_size)

  step_fn = training.make_train_step(config, steps_per_epoch, mesh)
  host_batches = pipeline.numpy_batches(
      pipeline.train_dataset(split, config, mesh.size, start, jax.process_index(),
                             jax.process_count()), split.image_paths)
  logger = _Logger(workdir, total_steps, config)
  validate = None
  if config.eval.every_steps:
    evaluator = Evaluator(config, vocab, config.eval.val_split,
                                     inference.make_embed_fns(config))
    validate = lambda state, step: _validate(evaluator, state, step, workdir, logger)
  stop = _StopSignal()  # from here on, SIGTERM stops the run at the next step boundary
  phase["training"] = True
  batches = DevicePrefetch(host_batches, step_fn.place, config.data.device_prefetch)
  try:
    _train_loop(config, step_fn, state, batches, mgr, meta, logger, start, total_steps, stop,
                validate)
  finally:
    batches.close()
    try:
      # An error must not leave a half-written checkpoint behind; a failed save raises here
      # as one StorageError line.
      checkpoint.finish(mgr)
    finally:
      stop.restore()
  if not config.eval.at_end:
    return None
  results = evaluate(config, workdir, config.eval.split, mgr=mgr,
                                prefer=config.eval.final_checkpoint)
  log.info("final evaluation, step %d (eval.final_checkpoint=%s) (%s):\n%s", results["step"],
           config.eval.final_checkpoint, results.get("written", ""),
           markdown_table(results))
  return results
