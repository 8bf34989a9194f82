"""`python -m instance_loss_jax.train`: the binary is `instance_loss_jax.cli.train` (this path is kept
for one release)."""
from instance_loss_jax.cli.train import run

if __name__ == "__main__":
  run()
