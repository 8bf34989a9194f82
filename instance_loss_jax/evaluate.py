"""`python -m instance_loss_jax.evaluate`: the binary is `instance_loss_jax.cli.evaluate` (this path is kept
for one release)."""
from instance_loss_jax.cli.evaluate import run

if __name__ == "__main__":
  run()
