"""What the absl binaries share: multi-host set-up, quiet library logs, clean user errors."""

import os
import re
import sys

import jax
import ml_collections
from absl import app, flags, logging

_COORDINATOR = "coordinator_address"
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a job its signal ended


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


def _one_line(error: Exception) -> str:
  """A flag error's message without the traceback config_flags puts into it."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if len(lines) == 1:
    return lines[0]
  cause = re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1])
  return f"{lines[0].split(': ', 1)[0]}: {cause}"


def define_print_config():
  flags.DEFINE_bool("print_config", False, "Print the config (every field with its value, "
                    "overrides applied) and exit.")


def _adopt_as_main_module_flags(module_name: str) -> None:
  """Makes `--help` list the binary's flags when it runs as a console script too (absl shows
  the flags of the module named by sys.argv[0], which is then the script wrapper)."""
  for name in (module_name, __name__):
    for flag in flags.FLAGS.get_key_flags_for_module(name):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run(main, define_flags=None):
  """Defines the binary's flags (`define_flags`: none at import), then app.run(main) with
  `--help` from the binary's docstring, `--print_config` where there is a config, a user error
  printed as one `error: ...` line with exit status 1, and a preemption as exit status 143."""
  module = sys.modules[main.__module__]
  if define_flags is not None:
    define_flags()
  if main.__module__ != "__main__":  # a console script: its wrapper has no docstring
    sys.modules["__main__"].__doc__ = module.__doc__
    _adopt_as_main_module_flags(main.__module__)

  def guarded(argv):
    from instance_loss_jax.trainer import Preempted  # pylint: disable=g-import-not-at-top
    f = flags.FLAGS
    if "config" in f and f.config is not None and not isinstance(f.config,
                                                                 ml_collections.ConfigDict):
      # config_flags defers a missing or unloadable file's error to the config's first use.
      from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
      print(f"error: --config={config_flags.get_config_filename(f['config'])}: no config file "
            "there (a .py file with get_config())", file=sys.stderr)
      sys.exit(1)
    if "print_config" in f and f.print_config:
      print(f.config)
      return 0
    try:
      return main(argv)
    except Preempted as e:
      # Not an error, not a success: a job script must not go on to the next stage.
      print(f"preempted: {e}", file=sys.stderr)
      sys.exit(PREEMPTED_EXIT_CODE)
    except user_errors() as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except SystemExit:
      if any(a.split("=")[0] in ("-h", "--help", "-?", "--helpshort", "--helpfull")
             for a in argv[1:]):
        sys.exit(0)  # absl exits with 1 after printing the help that was asked for
      raise
    except (AttributeError, KeyError) as e:  # config_flags: an override names no config field
      message = " ".join(str(e).replace("\\n", " ").replace("'", "").replace("\\", "").split())
      print(f"error: unknown config field in the overrides: {message}", file=sys.stderr)
      sys.exit(1)
    except flags.Error as e:  # a bad or missing flag; a config file's get_config that failed
      print(f"error: {_one_line(e)}", file=sys.stderr)
      sys.exit(1)

  app.run(guarded, flags_parser=parse)
