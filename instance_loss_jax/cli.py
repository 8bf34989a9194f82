"""What the absl binaries share: multi-host set-up, quiet library logs, clean user errors."""

import os
import sys

import jax
from absl import app, flags, logging

_COORDINATOR = "coordinator_address"


def define_flags():
  flags.DEFINE_string(_COORDINATOR, None, "host:port of process 0 (multi-host runs).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-host runs).")
  flags.DEFINE_string("cpu_collectives", None, "CPU multi-process collectives, e.g. 'gloo' "
                      "(for testing several processes on one machine).")


def quiet_library_logs(prefixes=("orbax", "gensim", "tensorflow")):
  """Drops the INFO chatter of Orbax, gensim and TF from the log; warnings still show."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top

  def keep(record):
    return record.levelno >= std_logging.WARNING or not any(
        f"/{p}/" in record.pathname for p in prefixes)

  std_logging.getLogger().addFilter(keep)
  for handler in std_logging.getLogger().handlers:
    handler.addFilter(keep)


def initialize():
  """Calls jax.distributed.initialize when this is one process of several.

  With --coordinator_address the flags say who is who; on a Cloud TPU VM slice or under SLURM
  JAX finds out by itself. A single process on one host needs nothing.
  """
  quiet_library_logs()
  f = flags.FLAGS
  if f.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", f.cpu_collectives)
  if f[_COORDINATOR].value:
    jax.distributed.initialize(f[_COORDINATOR].value, num_processes=f.num_processes,
                               process_id=f.process_id)
  elif "TPU_WORKER_HOSTNAMES" in os.environ or "SLURM_NTASKS" in os.environ and int(
      os.environ["SLURM_NTASKS"]) > 1:
    jax.distributed.initialize()
  else:
    return
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def user_errors() -> tuple[type[Exception], ...]:
  """Errors caused by the user's input: reported in one line, without a traceback."""
  # pylint: disable=g-import-not-at-top
  from instance_loss_jax.checkpoint import CheckpointError
  from instance_loss_jax.config import ConfigError
  from instance_loss_jax.data.records import DataError
  from instance_loss_jax.port import BackboneError
  from instance_loss_jax.retrieval import RetrievalError
  from instance_loss_jax.train_step import BatchError
  from instance_loss_jax.trainer import TrainingError
  return (BackboneError, CheckpointError, ConfigError, DataError, BatchError, TrainingError,
          RetrievalError)


def run(main):
  """app.run(main), with a user error printed as `error: ...` and exit status 1."""

  def guarded(argv):
    try:
      return main(argv)
    except user_errors() as e:
      logging.error("%s: %s", type(e).__name__, e)
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)

  def parse(argv):
    try:
      return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:  # config_flags: an override names no config field
      message = " ".join(str(e).replace("\\n", " ").replace("'", "").replace("\\", "").split())
      print(f"error: unknown config field in the overrides: {message}", file=sys.stderr)
      sys.exit(1)

  app.run(guarded, flags_parser=parse)
