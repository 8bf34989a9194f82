"""Test setup: 8 CPU devices for the data-parallel tests, TF kept off accelerators, one
compilation cache for all of a run's pytest-xdist workers."""
import os
import shutil
import tempfile

from helpers import xla_flags  # noqa: E402  (imports no JAX)

# Must happen before JAX initialises its backends. (LLVM at -O0, tried for faster compiles,
# gives NaNs and other numbers on XLA:CPU: the optimisation level stays at its default.)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# gs:// in the tests is the storage emulator of tests/test_object_store.py, reached through
# gcsfs. These settings are read once per process, at a library's first use (etils caches its
# backend choice at the first path of any kind; google-auth and gcsfs read theirs at import), so
# they are set here, before any test runs: no test reaches a real object store.
os.environ["EPATH_USE_TF"] = "false"  # etils.epath: gs:// through gcsfs, not TensorFlow's client
os.environ["NO_GCE_CHECK"] = "true"  # google-auth (under gcsfs): no metadata-server probe
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # gcsfs: no bucket-layout gRPC calls

import jax  # noqa: E402


def _cache_dir() -> str:
  """XLA's CPU compiles dominate this suite and many tests build the same tiny model: identical
  programs are compiled once per run and then read from this cache. pytest-xdist's workers (one
  per core, launch/test.sh) share it through the run's id, so one worker reuses the other's."""
  run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
  if run is None:
    return tempfile.mkdtemp(prefix="jax_cache_")
  path = os.path.join(tempfile.gettempdir(), f"jax_cache_{run}")
  os.makedirs(path, exist_ok=True)
  return path


# Set in the environment, not only in this process's config: the binaries that tests start
# (training runs killed and resumed, export, the object-store run, the two-process workers) read
# it too, so a program one of them compiled is read back by the next instead of compiled again.
# The process that makes the run's cache folder (pytest-xdist's controller, whose workers and
# their binaries inherit the variable, or a run without workers) removes it at the end.
_OWN_CACHE = None if os.environ.get("JAX_COMPILATION_CACHE_DIR") else _cache_dir()
os.environ["JAX_COMPILATION_CACHE_DIR"] = (os.environ.get("JAX_COMPILATION_CACHE_DIR")
                                           or _OWN_CACHE)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# The longest work units of a run under two pytest-xdist workers (a test, or an xdist_group of
# tests sharing a trained fixture), longest first: 84, 80, 67, 53, 47, 42, 31 s... as measured
# with TEST_CPU_LOG's timeline (benchmarks/RESULTS.md). Started first, they leave the short
# tests to fill both workers at the end (longest-processing-time-first scheduling); started
# last, one of them kept a worker busy a minute after the other had finished. launch/test.sh
# turns off pytest-xdist's own reordering, which puts the groups with the most tests first
# whatever their length. A name that matches nothing only loses its place.
LONGEST_FIRST = (
    # Three minutes, most of it the storage clients' back-off (sleeping): started first, it
    # leaves its core to the others (launch/test.sh runs one worker more than the cores).
    "test_flaky_store.py::test_a_run_on_a_failing_store_ends_as_on_local_disk_through_a_sigterm",
    "uninterrupted",  # straight, SIGKILL, the resume: three launches (and a refused one)
    "stage1",
    # Three launches of a two-process job: straight, SIGTERM to one process, the resume.
    "test_multihost_preemption.py::"
    "test_sigterm_to_one_process_stops_both_at_one_step_and_the_resume_is_exact",
    "storage_faults",  # a full disk (in process and the binary), damaged checkpoints
    "trained_run",
    "test_device_check.py::test_device_check_dry_run",  # six tiny compiles, two launches
    "test_object_store.py::test_two_stages_and_evaluation_on_gcs",
    "test_train_step.py::test_two_processes_match_one_process",
    "saved_on_four",
    "test_train_step.py::test_init_compiled_for_speed_draws_the_same_bits",
    "test_train_step.py::test_bfloat16_computes_in_bfloat16_and_keeps_float32_state",
    "test_train_step.py::test_mined_negatives_match_numpy_on_a_fixed_pool",
    "test_mesh_checkpoints.py::test_stage1_on_four_devices_initialises_stage2_on_eight",
)


def _work_unit(item) -> str:
  """What pytest-xdist's loadgroup sends to one worker: the item's group, else the item."""
  group = item.get_closest_marker("xdist_group")
  return group.args[0] if group else item.nodeid


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE and not os.environ.get("PYTEST_XDIST_WORKER"):
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(items):
  """The longest work units first (LONGEST_FIRST), then the other modules with slow tests, then
  the rest; each module's other tests kept together and in order. (Items of one module
  interleaved with another's make pytest tear down and rebuild the module's fixtures.)"""
  has_slow = {item.module for item in items if item.get_closest_marker("slow") is not None}
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

  def key(item):
    unit = _work_unit(item)
    named = [i for name, i in rank.items() if unit == name or unit.endswith(name)]
    return (min(named) if named else len(rank), item.module not in has_slow)

  items.sort(key=key)  # a stable sort


if os.environ.get("TEST_COMPILE_LOG"):
  # Opt-in profile of the suite's XLA compiles: one line per compile (test, function, seconds)
  # appended to $TEST_COMPILE_LOG, to find which programs cost the suite its time.
  import logging  # noqa: E402

  jax.config.update("jax_log_compiles", True)
  _current_test = ["(collection)"]

  class _CompileLog(logging.Handler):

    def emit(self, record):
      message = record.getMessage()
      if message.startswith("Finished XLA compilation of"):
        name, seconds = message[len("Finished XLA compilation of "):].rsplit(" in ", 1)
        with open(os.environ["TEST_COMPILE_LOG"], "a") as f:
          f.write(f"{_current_test[0]}\t{name}\t{seconds.split()[0]}\n")

  logging.getLogger("jax._src.dispatch").addHandler(_CompileLog())  # dispatch.log_elapsed_time

  def pytest_runtest_setup(item):
    _current_test[0] = item.nodeid


if os.environ.get("TEST_CPU_LOG"):
  # Opt-in CPU accounting: per test, the CPU seconds of this process and of the processes it
  # started and waited for (binaries, workers), then the pytest-xdist worker and the wall-clock
  # start and end (the timeline shows where a worker waits), appended to $TEST_CPU_LOG.
  # Durations under pytest-xdist depend on what the other worker runs meanwhile; CPU does not.
  import resource  # noqa: E402
  import time  # noqa: E402

  import pytest  # noqa: E402

  def _cpu():
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                          resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_protocol(item, nextitem):
    before, start = _cpu(), time.time()
    yield
    own, children = (b - a for a, b in zip(before, _cpu()))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.environ["TEST_CPU_LOG"], "a") as f:
      f.write(f"{item.nodeid}\t{own:.1f}\t{children:.1f}\t{worker}\t{start:.1f}\t"
              f"{time.time():.1f}\n")
