r"""The mesh train step: W_share's per-device memory, sharded over its classes vs replicated.

    python benchmarks/mesh_step.py memory     # XLA's per-device account, 8 and 64 devices

memory: the full-size Stage II step (configs/flickr30k.py: ResNet-50 at 224, batch 8 per device)
compiled for a mesh of --devices simulated CPU devices (XLA_FLAGS sets the count before JAX
starts), at each --num_classes, with model.w_share_sharding = classes and replicated. Nothing is
allocated: the state and batch are abstract, so steps far beyond this machine's memory are
compiled only, and XLA's memory analysis of the per-device program is read.

The `speed` mode (our step against the pmap step of commit 7b49f4e, read from git) is gone: that
step imports the package's old module paths (`instance_loss_jax.losses`, `.optim`), which moved
to `instance_loss_jax.training` on 2026-12-04. Its figures in RESULTS.md were measured with it;
`git show 910be9d:benchmarks/mesh_step.py` is the last version that has it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
  spec = importlib.util.spec_from_file_location(
      "bench_train_step", os.path.join(ROOT, "benchmarks", "step_speed.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def memory(args):
  import jax

  from instance_loss_jax import sharding
  bench = _bench()
  print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}",
        flush=True)
  print("| devices | classes | W_share | XLA GiB/device | W_share params+momentum GiB/device "
        "| compile s |\n|---|---|---|---|---|---|", flush=True)
  for devices in (int(d) for d in args.devices.split(",")):
    mesh = sharding.make_mesh(jax.devices()[:devices])
    for classes in (int(c) for c in args.num_classes.split(",")):
      for mode in args.modes.split(","):
        config = bench.make_config(2, args.per_device_batch * devices, classes, args.dtype)
        config.model.w_share_sharding = mode
        start = time.perf_counter()
        _, compiled = bench.compile_step(config, mesh)
        seconds = time.perf_counter() - start
        padded = sharding.padded_num_classes(config, mesh)
        own = 2 * (2048 + 1) * padded * 4 / (devices if mode == "classes" else 1)
        print(f"| {devices} | {classes:,} | {mode} | {bench.memory_account(compiled) / 2**30:.2f} "
              f"| {own / 2**30:.2f} | {seconds:.0f} |", flush=True)
        del compiled


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("what", choices=("memory",))
  parser.add_argument("--devices", default="8,64", help="memory: mesh sizes")
  parser.add_argument("--num_classes", default="113287,1000000,10000000")
  parser.add_argument("--modes", default="classes,replicated")
  parser.add_argument("--per_device_batch", type=int, default=8)
  parser.add_argument("--dtype", default="float32")
  args = parser.parse_args()
  most = max(int(d) for d in args.devices.split(","))
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={most}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, ROOT)
  memory(args)


if __name__ == "__main__":
  main()
