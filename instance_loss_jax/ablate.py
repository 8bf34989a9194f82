"""`python -m instance_loss_jax.ablate`: the binary is `instance_loss_jax.cli.ablate` (this path is kept
for one release)."""
from instance_loss_jax.cli.ablate import run

if __name__ == "__main__":
  run()
