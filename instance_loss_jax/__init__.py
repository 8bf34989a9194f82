"""instance_loss_jax: dual-path CNN image-text embeddings with instance loss, in JAX/Flax."""
__version__ = "0.1.0"
