"""`python -m instance_loss_jax.port_resnet`: the binary is `instance_loss_jax.cli.port_resnet` (this path is kept
for one release)."""
from instance_loss_jax.cli.port_resnet import run

if __name__ == "__main__":
  run()
