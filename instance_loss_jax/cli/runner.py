"""What the absl binaries share: multi-host set-up, quiet library logs, clean user errors."""

import inspect
import logging
import os
import re
import sys
import threading
import time
import warnings

import jax
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from absl.logging import converter
from ml_collections import config_flags

from instance_loss_jax import errors
from instance_loss_jax.config import as_flags, validate_config

_COORDINATOR = "coordinator_address"
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a job its signal ended
# How long a binary that stops on an error waits for the threads a library left behind before
# it exits without them.
LEFTOVER_THREADS_GRACE_S = 5.0


def define_flags():
  flags.DEFINE_string(_COORDINATOR, None, "host:port of process 0 (multi-host runs).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-host runs).")
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() and let JAX find "
                    "the cluster (a Cloud TPU VM through its metadata server; SLURM and GKE are "
                    "found without this flag). launch/tpu_vm.sh passes it.")
  flags.DEFINE_string("cpu_collectives", None, "CPU multi-process collectives, e.g. 'gloo' "
                      "(for testing several processes on one machine).")


def define_compile_cache_flag():
  flags.DEFINE_string(
      "compile_cache", "auto", "JAX's persistent compilation cache (a restart reads the train "
      "step and the init back instead of compiling them again): a directory (local or gs://), "
      "'off', or 'auto': $JAX_COMPILATION_CACHE_DIR if set, else for training WORKDIR/"
      "compile_cache (it outlives a preempted machine with the workdir), for the other binaries "
      "~/.cache/instance_loss_jax/compile_cache.")


def compile_cache_dir(choice: str, run_default: str | None, environ) -> str | None:
  """What --compile_cache=`choice` names (None: off); see its help."""
  if choice == "off":
    return None
  if choice != "auto":
    return choice
  return environ.get("JAX_COMPILATION_CACHE_DIR") or run_default or os.path.join(
      environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
      "instance_loss_jax", "compile_cache")


def use_compile_cache(run_default: str | None = None) -> str | None:
  """Points JAX's persistent compilation cache where --compile_cache says (`run_default`: the
  training binary's WORKDIR/compile_cache); returns the directory, None when off. Call before
  the first compile."""
  choice = compile_cache_dir(flags.FLAGS.compile_cache, run_default, os.environ)
  if choice is None:
    return None
  jax.config.update("jax_compilation_cache_dir", choice)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    # The train step, the init and the evaluation's embeddings take 3-40 s to compile; a
    # program under a second is not worth a round trip to an object store.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  logging.getLogger(__name__).info("compilation cache: %s", choice)
  return choice


def configure_logging():
  """Our INFO lines on the console, the libraries' only from WARNING up (Orbax logs INFO through
  absl's logger, gensim, TF, fsspec through their own).

  Levels: the `instance_loss_jax` logger is set to INFO, absl's verbosity and the root logger
  (which every other library's logger inherits) to WARNING; one filter, for Orbax's reports of
  a failed save (below). `--verbosity=0` (or `-v 1` for debug) shows the libraries' INFO again,
  and everything Orbax reports.
  """
  # TensorFlow's C++ INFO logs (tf.data at run time) stay off the console; a user's own setting
  # wins. Set before main's deferred imports start TensorFlow. (Its start-up notice, oneDNN,
  # prints anyway: abseil logs it before its initialisation.)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  verbosity = flags.FLAGS["verbosity"]
  if verbosity.present:  # absl has set its own logger's level from it
    logging.getLogger().setLevel(converter.absl_to_standard(verbosity.value))
  else:
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    # A checkpoint save that fails is reported as one StorageError line (checkpoint.save):
    # Orbax's own reports of it, a traceback from each of its writer threads, and what its
    # abandoned asyncio writes raise afterwards would bury that line. Orbax also warns that a
    # reader's directory "is read only" at every read (Stage II's start, evaluate, export,
    # search), which is what a reader is.
    logging.getLogger("absl").addFilter(_not_orbax_errors)
    sys.unraisablehook = _quiet_abandoned_writes
    # A save that failed leaves Orbax's remaining coroutines unawaited; Python names each at
    # shutdown, after the run's one error line.
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                            category=RuntimeWarning)
    # gcsfs (gs:// through etils without TensorFlow) logs each request it gives up on with a
    # traceback at ERROR; the error it raises then reaches the run's one line anyway.
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
  logging.getLogger("instance_loss_jax").setLevel(logging.INFO)


def _not_orbax_errors(record: logging.LogRecord) -> bool:
  if f"{os.sep}orbax{os.sep}" not in (record.pathname or ""):
    return True
  return record.levelno < logging.ERROR and not str(record.msg).startswith(
      "Given directory is read only")


def _quiet_abandoned_writes(unraisable) -> None:
  """sys.unraisablehook without two kinds of noise that follow a failed asynchronous save:
  TensorStore's callbacks finding Orbax's event loop closed, and Orbax's coroutines failing to
  import as the interpreter shuts down."""
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    return
  if isinstance(error, ImportError) and inspect.iscoroutine(unraisable.object):
    return
  sys.__unraisablehook__(unraisable)


def initialize():
  """Calls jax.distributed.initialize when this is one process of several.

  With --coordinator_address the flags say who is who; with --distributed, under SLURM with
  several tasks, or on GKE's TPU pods (TPU_WORKER_HOSTNAMES), JAX finds out by itself. A GCE
  Cloud TPU VM is only found through its metadata server, hence --distributed there. Orbax's
  multi-host saving and the TPU preemption notice need it; a single process needs nothing.
  """
  configure_logging()
  f = flags.FLAGS
  if f.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", f.cpu_collectives)
  if f[_COORDINATOR].value:
    jax.distributed.initialize(f[_COORDINATOR].value, num_processes=f.num_processes,
                               process_id=f.process_id)
  elif f.distributed or "TPU_WORKER_HOSTNAMES" in os.environ or int(
      os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
  else:
    return
  logging.getLogger(__name__).info("process %d of %d, %d local / %d global devices",
                                   jax.process_index(), jax.process_count(),
                                   jax.local_device_count(), jax.device_count())


def _one_line(error: Exception) -> str:
  """A flag error's message without the traceback config_flags puts into it."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if len(lines) == 1:
    return lines[0]
  cause = re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1])
  return f"{lines[0].split(': ', 1)[0]}: {cause}"


def _unknown_field(message: str, argv: list[str]) -> str:
  """config_flags' "shedule Did you mean "schedule" instead of "shedule"?" with the override's
  whole path: "--config.optim.shedule (did you mean optim.schedule?)"."""
  name = message.split(" ", 1)[0].strip("\"")
  suggestion = re.search(r'Did you mean "([^"]+)"', message)
  for arg in argv[1:]:
    path = arg.split("=", 1)[0].removeprefix("--config.")
    parts = path.split(".")
    if arg.startswith("--config.") and name in parts:
      if suggestion is None:
        return f"--config.{path}"
      fixed = ".".join(suggestion[1] if p == name else p for p in parts)
      return f"--config.{path} (did you mean {fixed}?)"
  return message


def define_print_config():
  flags.DEFINE_bool("print_config", False, "Print the config (every field with its value, "
                    "overrides applied) and exit; needs no other flag than --config.")


def require_unless_print_config(*names: str) -> None:
  """Marks flags as required for a run, but not for `--print_config`, which only reads the
  config (absl's mark_flags_as_required would refuse it without them)."""
  for name in names:
    flags.register_validator(
        name, lambda value: value is not None or flags.FLAGS["print_config"].value,
        message=f"--{name} is required")


def exit_promptly(code: int, grace_s: float = LEFTOVER_THREADS_GRACE_S) -> None:
  """Exits with `code` within `grace_s` seconds, even if a library left a thread waiting.

  After a save that failed (a store down), Orbax's commit threads wait up to its 300 s
  coordination timeout for signals from the part that failed; Python joins such threads before
  it exits, so the job would end minutes after its one error line. The threads still running
  after the grace are abandoned (os._exit): what the run wrote is on disk or on the store
  already, and a save that did not finish is a temporary directory the next run removes."""
  deadline = time.monotonic() + grace_s
  others = [t for t in threading.enumerate()
            if t is not threading.current_thread() and not t.daemon]
  for thread in others:
    # Thread's own join: Orbax's threads override it with one that raises on a timeout.
    threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))
  left = [t.name for t in others if t.is_alive()]
  if left:
    logging.getLogger(__name__).debug("exiting without %d library threads still waiting (%s)",
                                      len(left), ", ".join(left))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def _adopt_as_main_module_flags(module_name: str) -> None:
  """Makes `--help` list the binary's flags and the shared ones defined here (multi-host,
  --distributed) whether it runs with `python -m` or as a console script (absl shows the key
  flags of the module named by sys.argv[0], the script wrapper in the second case)."""
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
    f = flags.FLAGS
    if "config" in f and f.config is not None and not isinstance(f.config,
                                                                 ml_collections.ConfigDict):
      # config_flags defers a missing or unloadable file's error to the config's first use.
      print(f"error: --config={config_flags.get_config_filename(f['config'])}: no config file "
            "there (a .py file with get_config())", file=sys.stderr)
      sys.exit(1)
    if len(argv) > 1:  # no binary takes positional arguments: a stray word is a mistyped flag
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if "print_config" in f and f.print_config:
      # A binary whose config comes from elsewhere too (a run's record) resolves it itself.
      try:
        config = getattr(module, "resolve_config", lambda fv: fv.config)(f)
        validate_config(config)  # what a run would refuse, refused here too
        print(as_flags(config))
      except errors.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
      return 0
    try:
      return main(argv)
    except errors.Preempted as e:
      # Not an error, not a success: a job script must not go on to the next stage.
      print(f"preempted: {e}", file=sys.stderr)
      # An ordinary exit: the save has finished, and on a multi-host job every process takes
      # part in jax.distributed's shutdown (one that skipped it would abort the others).
      sys.exit(PREEMPTED_EXIT_CODE)
    except errors.USER_ERRORS as e:
      print(f"error: {e}", file=sys.stderr)
      exit_promptly(1)

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
      print(f"error: unknown config field in the overrides: {_unknown_field(message, argv)}",
            file=sys.stderr)
      sys.exit(1)
    except flags.Error as e:  # a bad or missing flag; a config file's get_config that failed
      print(f"error: {_one_line(e)}", file=sys.stderr)
      sys.exit(1)

  app.run(guarded, flags_parser=parse)
