r"""Checkpoint saves on a CPU mesh: our writer (slices under 1 MiB per replica written whole)
against Orbax's default (every replicated array cut into one eager jit(slice) per replica).

    python benchmarks/checkpoint_save.py              # the tests' tiny model, 8 CPU devices

Each writer runs in a fresh process (the slices' compiles are cached per process): the tiny
model's state (`tests/helpers.tiny_config`) is initialised on the mesh and saved three times with
`checkpoint.save`. Reported: each save's wall and CPU seconds, and the first save's ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(writer: str, devices: int) -> None:
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from helpers import tiny_config  # pylint: disable=g-import-not-at-top
  from instance_loss_jax import sharding  # pylint: disable=g-import-not-at-top
  from instance_loss_jax.workdir import checkpoint  # pylint: disable=g-import-not-at-top
  from instance_loss_jax import training as ts  # pylint: disable=g-import-not-at-top
  if writer == "orbax_default":  # undo checkpoint.py's registration
    from orbax.checkpoint._src.metadata import array_metadata_store  # pylint: disable=g-import-not-at-top
    ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
        array_metadata_store=array_metadata_store.Store()), override=True)
  config = tiny_config()
  state = ts.create_train_state(config, jax.random.key(0), 10, sharding.make_mesh(jax.devices()))
  cpu = lambda: sum(getattr(resource.getrusage(resource.RUSAGE_SELF), f)
                    for f in ("ru_utime", "ru_stime"))
  with tempfile.TemporaryDirectory() as tmp:
    mgr = checkpoint.manager(tmp)
    saves = []
    for step in (1, 2, 3):
      wall, used = time.perf_counter(), cpu()
      checkpoint.save(mgr, step, state, {"num_classes": config.num_classes})
      mgr.wait_until_finished()
      saves.append((time.perf_counter() - wall, cpu() - used))
  print(json.dumps(dict(writer=writer, saves=saves)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args.child, args.devices)
    return
  print(f"{os.cpu_count()} cores, {args.devices} CPU devices; tiny model, 3 saves each")
  print("| writer | save 1 s (CPU s) | save 2 s (CPU s) | save 3 s (CPU s) |\n|---|---|---|---|")
  first = {}
  for writer in ("orbax_default", "ours"):
    out = subprocess.run([sys.executable, __file__, f"--devices={args.devices}",
                          f"--child={writer}"], check=True, capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu")).stdout
    saves = json.loads(out.strip().splitlines()[-1])["saves"]
    first[writer] = saves[0][0]
    print(f"| {writer} | " + " | ".join(f"{w:.2f} ({c:.2f})" for w, c in saves) + " |")
  print(f"first save, ours / Orbax's default: {first['ours'] / first['orbax_default']:.3f}")


if __name__ == "__main__":
  main()
