"""Test setup: 8 CPU devices for the data-parallel tests, TF kept off accelerators."""
import os

# Must happen before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# gs:// in the tests is the storage emulator of tests/test_object_store.py, reached through
# gcsfs. These settings are read once per process, at a library's first use (etils caches its
# backend choice at the first path of any kind; google-auth and gcsfs read theirs at import), so
# they are set here, before any test runs: no test reaches a real object store.
os.environ["EPATH_USE_TF"] = "false"  # etils.epath: gs:// through gcsfs, not TensorFlow's client
os.environ["NO_GCE_CHECK"] = "true"  # google-auth (under gcsfs): no metadata-server probe
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # gcsfs: no bucket-layout gRPC calls

import tempfile  # noqa: E402

import jax  # noqa: E402

# XLA's CPU compiles dominate this suite: many tests build the same tiny model, so identical
# programs (the init above all) are compiled once per session and then read from this cache.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="jax_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
