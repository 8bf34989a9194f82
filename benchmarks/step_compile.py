r"""How long the tests' tiny Stage II step takes to trace, lower and compile, by text CNN size.

    python benchmarks/step_compile.py            # one CPU device, each variant in its own process

The tests build their models from `tests/helpers.tiny_config` (a two-stage text CNN since
ff9ac7a); `four_stages` is the text CNN it had before (one block in each of four stages, widths
16-128). Each variant runs in a fresh process (no compile cache), one step lowered with
`step.jitted.lower(state arrays, abstract batch)` and compiled. Reported: seconds of each phase,
and the compile ratio against `four_stages`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE2 = {"stage": 2, "freeze_backbone": False, "backbone_bn": "train",
          "loss.lambdas": (1.0, 1.0, 1.0), "optim.lr": 0.5}
VARIANTS = {
    "tests_now": {},
    "four_stages": {"model.text.blocks": (1, 1, 1, 1), "model.text.widths": (16, 32, 64, 128),
                    "model.text.first_mids": (8, 16, 32, 64),
                    "model.text.strides": (1, 2, 2, 1)},
}


def child(variant: str) -> None:
  sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
  # pylint: disable=g-import-not-at-top
  import jax
  from helpers import tiny_config
  from instance_loss_jax import sharding, training as ts
  from instance_loss_jax.workdir import checkpoint
  config = tiny_config(**STAGE2, **VARIANTS[variant])
  mesh = sharding.make_mesh(jax.devices()[:1])
  state = ts.create_train_state(config, jax.random.key(0), 10, mesh)
  step = ts.make_train_step(config, 10, mesh)
  start = time.time()
  lowered = step.jitted.lower(checkpoint.state_tree(state), ts.abstract_batch(config, mesh))
  traced = time.time()
  lowered.compile()
  print(json.dumps(dict(trace_lower_s=traced - start, compile_s=time.time() - traced)))


def main() -> None:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  results = {}
  for variant in VARIANTS:
    out = subprocess.run([sys.executable, __file__, "--child", variant], env=env, check=True,
                         capture_output=True, text=True).stdout
    results[variant] = json.loads(out.strip().splitlines()[-1])
  print("| text CNN | trace + lower s | compile s |\n|---|---|---|")
  for variant, r in results.items():
    print(f"| {variant} | {r['trace_lower_s']:.2f} | {r['compile_s']:.2f} |")
  print(f"compile, tests_now / four_stages: "
        f"{results['tests_now']['compile_s'] / results['four_stages']['compile_s']:.2f}")


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--child":
    child(sys.argv[2])
  else:
    import argparse  # pylint: disable=g-import-not-at-top
    argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0]).parse_args()
    main()
