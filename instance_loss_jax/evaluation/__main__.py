"""`python -m instance_loss_jax.evaluation NAME=RESULTS.json ...`: kept for one release; the
binary is `python -m instance_loss_jax.cli.compare`."""
import runpy

if __name__ == "__main__":
  # Run by name: the library does not import the binaries.
  runpy.run_module("instance_loss_jax.cli.compare", run_name="__main__")
