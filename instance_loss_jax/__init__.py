"""instance_loss_jax: dual-path CNN image-text embeddings with instance loss, in JAX/Flax."""
__version__ = "0.1.0"

__all__ = ["Index"]


def __getattr__(name):
  if name == "Index":
    # Imported on first use: `import instance_loss_jax.config` (a config file) or any other
    # submodule does not import JAX, Flax and Orbax with the Index.
    from instance_loss_jax.index import Index  # pylint: disable=g-import-not-at-top
    return Index
  raise AttributeError(f"module 'instance_loss_jax' has no attribute {name!r}")
