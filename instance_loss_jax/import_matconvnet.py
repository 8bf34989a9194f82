"""`python -m instance_loss_jax.import_matconvnet`: the binary is
`instance_loss_jax.cli.import_matconvnet`."""
from instance_loss_jax.cli.import_matconvnet import run

if __name__ == "__main__":
  run()
