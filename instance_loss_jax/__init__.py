"""instance_loss_jax: dual-path CNN image-text embeddings with instance loss, in JAX/Flax."""
import os as _os

__version__ = "0.1.0"
# TensorFlow's C++ INFO logs (tf.data at run time) stay off the console; a user's own setting
# wins. Its start-up notice (oneDNN) prints anyway: abseil logs it before its initialisation.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

__all__ = ["Index"]


def __getattr__(name):
  if name == "Index":
    # Imported on first use: `import instance_loss_jax.config` (a config file) or any other
    # submodule does not import JAX, Flax and Orbax with the Index.
    from instance_loss_jax.index import Index  # pylint: disable=g-import-not-at-top
    return Index
  raise AttributeError(f"module 'instance_loss_jax' has no attribute {name!r}")
