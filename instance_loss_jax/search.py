"""`python -m instance_loss_jax.search`: the binary is `instance_loss_jax.cli.search` (this path is kept
for one release)."""
from instance_loss_jax.cli.search import run

if __name__ == "__main__":
  run()
