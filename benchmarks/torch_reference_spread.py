r"""The spread behind tests/test_torch_reference.py's per-step tolerances (STEP_RTOL): how far
float32 rounding moves the losses of three SGD steps from PyTorch's float64, and how far a wrong
optimiser moves them (negative controls).

    python benchmarks/torch_reference_spread.py

Same config, weights and batch as the test (its `losses_for_stage`). Printed per stage: the
relative gap of each step's loss to float64 for ours and for PyTorch's float32, then, with the
reference's optimiser changed (weight decay on biases too, learning rate 1% higher, Nesterov
off, momentum 0.8), the gap of ours to that float64 reference.
"""

import argparse
import json
import os
import sys

if __name__ == "__main__":  # no options; --help answered before the imports below (seconds)
  argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0]).parse_args()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

# pylint: disable=wrong-import-position
import numpy as np  # noqa: E402

import test_torch_reference as reference_test  # noqa: E402

reference = reference_test.torch_reference
_MAKE_OPTIMIZER = reference.make_optimizer
CONTROLS = {
    "decay_on_biases": lambda group, config: group.update(weight_decay=config.optim.weight_decay),
    "lr_1%_higher": lambda group, config: group.update(lr=group["lr"] * 1.01),
    "no_nesterov": lambda group, config: group.update(nesterov=False),
    "momentum_0.8": lambda group, config: group.update(momentum=0.8),
}


def _gaps(losses: dict, name: str) -> list[float]:
  exact = np.asarray(losses["torch.float64"])
  return [float(f"{x:.3g}") for x in np.abs(np.asarray(losses[name]) - exact) / np.abs(exact)]


def _with_control(change):
  def make_optimizer(model, config, lr_factor=1.0):
    optimizer = _MAKE_OPTIMIZER(model, config, lr_factor)
    for group in optimizer.param_groups:
      change(group, config)
    return optimizer
  return make_optimizer


def main():
  out = {"jax": reference_test.jax.__version__, "torch": reference_test.torch.__version__,
         "python": sys.version.split()[0]}
  for stage in (1, 2):
    reference.make_optimizer = _MAKE_OPTIMIZER
    losses = reference_test.losses_for_stage(stage)
    row = {"ours": _gaps(losses, "ours"), "torch.float32": _gaps(losses, "torch.float32")}
    for name, change in CONTROLS.items():
      reference.make_optimizer = _with_control(change)
      row[f"control {name}"] = _gaps(reference_test.losses_for_stage(stage), "ours")
    out[f"stage {stage}"] = row
    print(json.dumps({f"stage {stage}": row}), flush=True)
  reference.make_optimizer = _MAKE_OPTIMIZER
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
