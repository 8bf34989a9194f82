"""The training loop: data, global state on one device mesh, steps, Orbax checkpoints, logs,
final evaluation.

One resume order (as in big_vision), in resume.py: the run's own newest checkpoint, else
`init_from` (Stage I's workdir, for Stage II), else a fresh init with the word2vec table and,
when configured, a ported ImageNet backbone. Every check that can refuse a run happens before
the first step, and nothing is written into the workdir before those checks pass.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
import PIL.Image
from clu import periodic_actions

from instance_loss_jax import inference, paths, resume, sharding, training
from instance_loss_jax.workdir import checkpoint, faults, writer
from instance_loss_jax.config import ConfigError, run_config, validate_config
from instance_loss_jax.data import pipeline, pseudo_classes, records
from instance_loss_jax.errors import Preempted, StorageError, TrainingError
from instance_loss_jax.evaluation.evaluator import Evaluator, evaluate
from instance_loss_jax.evaluation.tables import markdown_table
from instance_loss_jax.training import optim, report
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


class _StopSignal:
  """SIGTERM (SLURM's and most GPU hosts' stop notice) as a flag the loop reads between steps.

  Only with one process: with several, JAX's preemption service takes the signal on whichever
  host gets it and tells the others, and Orbax's `reached_preemption` makes all of them stop at
  the same step (tests/test_multihost_preemption.py). A handler of ours would replace JAX's.
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



@dataclasses.dataclass
class _Run:
  """What the loop needs, made and checked before the first step."""
  config: Any
  workdir: str
  mgr: Any  # the run's checkpoint manager
  meta: dict[str, Any]  # what each checkpoint records about the run
  state: Any  # the first state, global on the mesh
  start: int  # the step `state` is at
  total_steps: int
  step_fn: training.TrainStep
  host_batches: Any  # numpy batches from tf.data, from step `start` + 1 on
  evaluator: Evaluator | None  # the val split's, when the run validates
  logdir: str  # TensorBoard's


def train_and_evaluate(config, workdir: str, mesh=None) -> dict[str, Any] | None:
  """Trains (or resumes) the run in `workdir` on `mesh` (default: every device of every
  process); returns the final evaluation's results."""
  validate_config(config)
  pipeline.keep_tensorflow_off_accelerators()  # before TensorBoard's writer starts TensorFlow
  created = not paths.path(workdir).exists()
  check_workdir(workdir)
  # Every checkpoint read and write of this run retries a failing store for this long.
  checkpoint.set_store_retries(config.storage_retry_s)
  # Before anything is written: a workdir that another live job writes is refused here.
  claim = writer.WriterClaim(workdir, retry_s=config.storage_retry_s).acquire()
  if claim.took_over:
    log.info("took over the workdir from a job that is gone (%s)", claim.took_over)
  try:
    try:
      run = _prepare(config, workdir, mesh)
    except BaseException:
      # A run that fails before its first step (missing data, a refused checkpoint, a bad
      # backbone) leaves no workdir behind if it made it: the same command, corrected, then
      # starts clean, and `ls` shows no run that never ran.
      if created and jax.process_index() == 0:
        claim.release()
        paths.path(workdir).rmtree()
      raise
    _train(run)
  finally:
    claim.release()
  if not run.config.eval.at_end:
    return None
  results = evaluate(run.config, workdir, run.config.eval.split, mgr=run.mgr,
                     prefer=run.config.eval.final_checkpoint)
  log.info("final evaluation, step %d (eval.final_checkpoint=%s) (%s):\n%s", results["step"],
           run.config.eval.final_checkpoint, results.get("written", ""),
           markdown_table(results))
  return results


def _train(run: _Run) -> None:
  """Steps from `run.start` to the end: after each, the periodic actions, a report every
  `log_every` steps, validation and a checkpoint when due, and a stop (SIGTERM or the
  preemption notice) after saving the step it reached."""
  config, mgr = run.config, run.mgr
  metric_writer = report.create_writer(run.logdir, run.total_steps)
  hooks = _periodic_actions(config, run.logdir)
  stop = _StopSignal()  # from here on, SIGTERM stops the run at the next step boundary
  batches = DevicePrefetch(run.host_batches, run.step_fn.place, config.data.device_prefetch)
  state, pending, throughput = run.state, [], None
  failure = None
  try:
    for step in range(run.start + 1, run.total_steps + 1):
      batch = next(batches)
      state, metrics = run.step_fn(state, batch)
      if throughput is None:  # this call compiled the step: its executable is the one analysed
        throughput = _after_compile(run, step, state, batch)
      pending.append((step, metrics))
      for hook in hooks:
        hook(step)

      reason = stop.reason or ("preemption notice" if mgr.reached_preemption(step) else None)
      last = step == run.total_steps
      validating = run.evaluator is not None and (step % config.eval.every_steps == 0 or last)
      saving = validating or reason or last or step % config.checkpoint_every == 0
      if saving or step % config.log_every == 0:
        metric_writer.write_scalars(step, _train_scalars(pending, mgr) | {
            f"train/{k}": v for k, v in throughput(step).items()})
        pending = []
      val = _validate(run, state, step, metric_writer) if validating else None
      if saving:
        checkpoint.save(mgr, step, state, run.meta, val)  # each process its shards
      if reason:
        checkpoint.finish(mgr)  # a failed save raises here: the run did not stop with it saved
        raise Preempted(step, reason)
  except BaseException as e:
    failure = e
    raise
  finally:
    # An error must not leave a half-written checkpoint behind: a failed save raises in
    # `finish` as one StorageError line. What ends the run is the one line the user sees: a
    # clean-up that fails after it (TensorBoard's flush to a store that is down) is logged.
    _clean_up(failure, batches.close, metric_writer.close,
              _stop_trace if config.profile_steps and jax.process_index() == 0 else None,
              functools.partial(checkpoint.finish, mgr), stop.restore)


def _clean_up(failure: BaseException | None, *steps) -> None:
  """Runs every step (None: skipped). The first error among them is raised at the end when
  nothing else failed the run, or when it is a StorageError (a checkpoint not written: the line
  that says what is kept) and what failed the run was a library's error (TensorBoard's flush
  to a disk that has just filled); any other is logged in one line and dropped."""
  first = None
  for step in steps:
    if step is None:
      continue
    try:
      step()
    except Exception as e:  # pylint: disable=broad-except
      ours = isinstance(e, StorageError) and not isinstance(
          failure, (StorageError, TrainingError, Preempted))
      if first is None and (failure is None or ours):
        first = e
      else:
        log.warning("after the run stopped, %s failed too: %s",
                    getattr(getattr(step, "func", step), "__qualname__", "a clean-up"),
                    faults.cause(e))
  if first is not None:
    raise first


def _periodic_actions(config, logdir: str) -> list[periodic_actions.PeriodicAction]:
  """clu's Profile for `profile_steps` = (first, last) on process 0. It is called after each step
  and starts its trace after step first - 1, so the trace holds steps first to last."""
  if not config.profile_steps or jax.process_index() != 0:
    return []
  first, last = config.profile_steps
  log.info("profiling steps %d-%d into %s", first, last, logdir)
  return [periodic_actions.Profile(logdir=logdir, first_profile=first - 1,
                                   num_profile_steps=last - first + 1,
                                   profile_duration_ms=None, every_secs=None)]


def _stop_trace() -> None:
  try:
    jax.profiler.stop_trace()
  except RuntimeError:  # none running: the profile had ended
    pass


def _after_compile(run: _Run, step: int, state, batch) -> report.Throughput:
  """XLA's FLOP count of the compiled step; the speed and time left count from here."""
  flops_per_step = run.step_fn.flops(state, batch) or 0.0
  log.info("train step: %.4g GFLOP per device (XLA's count)", flops_per_step / 1e9)
  return report.Throughput(run.config, run.total_steps, step, flops_per_step)


def _train_scalars(pending, mgr) -> dict[str, float]:
  """The steps' metrics (as the step names them) averaged on the host, as train/NAME; a
  non-finite loss stops the run with the newest checkpoint kept."""
  history = [(s, sharding.to_host(m)) for s, m in pending]
  for s, m in history:
    if not np.isfinite(m["loss"]):
      checkpoint.finish(mgr)
      raise TrainingError(f"non-finite loss ({m['loss']}) at step {s}; the newest checkpoint "
                          f"(step {mgr.latest_step()}) is kept")
  return {f"train/{k}": v for k, v in report.mean([m for _, m in history]).items()}


def _validate(run: _Run, state, step: int, metric_writer) -> dict[str, float]:
  """The val split's figures from the state in memory (no checkpoint read back), reported as
  val/NAME scalars and its plots as images; returns the figures."""
  variables = training.variables_of(state)
  # Host copies of what the embeddings need: W_share (perhaps huge, sharded) stays behind.
  variables = sharding.to_host(dict(
      params={k: v for k, v in variables["params"].items() if k != sharding.W_SHARE},
      batch_stats=variables["batch_stats"]))
  results = run.evaluator(variables, step, paths.join(run.workdir, "eval"), run.workdir)
  split = results["split"]
  metric_writer.write_scalars(step, {f"{split}/{k}": v for k, v in results["metrics"].items()})
  images = {}
  for path in results.get("plots", []):
    name = os.path.basename(path).split("-", 2)[-1].removesuffix(".png")  # e.g. similarity
    with PIL.Image.open(io.BytesIO(paths.path(path).read_bytes())) as image:
      images[f"{split}/{name}"] = np.asarray(image.convert("RGB"))[None]
  metric_writer.write_images(step, images)
  metric_writer.flush()
  return results["metrics"]


def _prepare(config, workdir: str, mesh) -> _Run:
  """Everything before the first step, by the resume order (resume.py); writes the vocabulary
  and the run's config once every check has passed."""
  train_records = records.read_split(config, "train")
  mgr = checkpoint.manager(workdir, keep=config.keep_checkpoints,
                           ocdbt=config.checkpoint_ocdbt)
  source = checkpoint.reader(config.init_from) if config.init_from else None
  convention = resume.input_convention_of(config, mgr, source)
  pseudo = None
  if config.data.pseudo_classes:
    train_records, pseudo = resume.pseudo_classes_of(config, workdir, train_records, convention)
  # K pseudo-classes: W_share has K, an empty cluster among them.
  num_classes = config.data.pseudo_classes or 1 + max(r.label for r in train_records)
  if config.num_classes and config.num_classes != num_classes:
    raise ConfigError(f"num_classes={config.num_classes} but the training split has "
                      f"{num_classes} groups (set 0 to take it from the data)")
  fresh = not mgr.all_steps() and not config.init_from
  vocab, table = resume.prepare_vocab(config, workdir, train_records, need_table=fresh)
  config = run_config(config, vocab.size, num_classes, convention)
  meta = checkpoint.run_meta(config, vocab.fingerprint)
  split = pipeline.encode_split(train_records, vocab, config.model.text.max_len, True)
  steps_per_epoch = split.num_images / config.batch_size
  total_steps = optim.num_train_steps(config, steps_per_epoch)
  mesh = mesh if mesh is not None else sharding.make_mesh()
  state, start = resume.initial_state(config, workdir, mgr, source, meta, table,
                                      steps_per_epoch, mesh)
  if jax.process_index() == 0:
    vocab.save(workdir)
    checkpoint.write_config(workdir, config)
    if pseudo is not None:
      pseudo_classes.write_recorded(workdir, pseudo)
  log.info("%d training images (%d classes), vocabulary %d words, %d steps of %d",
           split.num_images, num_classes, len(vocab.words), total_steps, config.batch_size)
  host_batches = pipeline.numpy_batches(
      pipeline.train_dataset(split, config, mesh.size, start, jax.process_index(),
                             jax.process_count()), split.image_paths)
  evaluator = None
  if config.eval.every_steps:
    evaluator = Evaluator(config, vocab, config.eval.val_split, inference.make_embed_fns(config))
  return _Run(config=config, workdir=workdir, mgr=mgr, meta=meta, state=state, start=start,
              total_steps=total_steps,
              step_fn=training.make_train_step(config, steps_per_epoch, mesh),
              host_batches=host_batches, evaluator=evaluator,
              logdir=config.tensorboard_dir or paths.join(workdir, "tensorboard"))
