"""`python -m instance_loss_jax.export`: the binary is `instance_loss_jax.cli.export` (this path is kept
for one release)."""
from instance_loss_jax.cli.export import run

if __name__ == "__main__":
  run()
