r"""The mesh train step: W_share's per-device memory sharded vs replicated, and its speed against
the pmap step it replaced.

    python benchmarks/mesh_step.py memory     # XLA's per-device account, 8 and 64 devices
    python benchmarks/mesh_step.py speed      # 1 CPU device, paired steps vs the pmap step

memory: the full-size Stage II step (configs/flickr30k.py: ResNet-50 at 224, batch 8 per device)
compiled for a mesh of --devices simulated CPU devices (XLA_FLAGS sets the count before JAX
starts), at each --num_classes, with model.w_share_sharding = classes and replicated. Nothing is
allocated: the state and batch are abstract, so steps far beyond this machine's memory are
compiled only, and XLA's memory analysis of the per-device program is read.

speed: our step on one device against the pmap step of commit --pmap_commit (its
instance_loss_jax/train_step.py read from git into a module of its own), from the same
weights on the same batch, steps alternated; the ratio is the median of per-step ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PMAP_COMMIT = "7b49f4e"  # the last commit with the pmap step


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


def _pmap_module(commit):
  """instance_loss_jax/train_step.py as of `commit`, imported under another name."""
  source = subprocess.run(["git", "show", f"{commit}:instance_loss_jax/train_step.py"], cwd=ROOT,
                          check=True, capture_output=True, text=True).stdout
  spec = importlib.util.spec_from_loader("pmap_train_step", loader=None)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses (TrainState) look their module up
  exec(compile(source, f"{commit}:train_step.py", "exec"), module.__dict__)  # pylint: disable=exec-used
  return module


def speed(args):
  import jax
  import numpy as np

  from instance_loss_jax import sharding
  from instance_loss_jax import train_step as ts
  bench = _bench()
  old = _pmap_module(args.pmap_commit)
  device = jax.local_devices()[:1]
  mesh = sharding.make_mesh(device)
  print(f"jax {jax.__version__}, 1 x {device[0].device_kind}, {os.cpu_count()} cores, "
        f"pmap step of {args.pmap_commit}", flush=True)
  for stage in (int(s) for s in args.stages.split(",")):
    config = bench.make_config(stage, args.batch_size, args.classes, args.dtype)
    batch = bench.host_batch(config)
    init = ts.create_train_state(config, jax.random.key(0), 1000)
    new_step = ts.make_train_step(config, 1000, mesh)
    old_step = old.make_train_step(config, 1000, devices=device)
    states = {"mesh": ts.place_state(init, config, mesh), "pmap": old.replicate(init, device)}
    batches = {"mesh": batch, "pmap": {k: v[None] for k, v in batch.items()}}
    steps = {"mesh": new_step, "pmap": old_step}
    times = {"mesh": [], "pmap": []}
    losses = {}
    for i in range(args.warmup + args.steps):
      for name in ("pmap", "mesh") if i % 2 else ("mesh", "pmap"):
        start = time.perf_counter()
        states[name], metrics = steps[name](states[name], batches[name])
        loss = float(np.asarray(metrics["loss"]).ravel()[0])
        if i >= args.warmup:
          times[name].append(time.perf_counter() - start)
        losses[name] = loss
    ratio = statistics.median(p / m for m, p in zip(times["mesh"], times["pmap"]))
    print(f"stage {stage}: mesh step {statistics.median(times['mesh']):.3f} s, pmap step "
          f"{statistics.median(times['pmap']):.3f} s (medians of {args.steps}); mesh speed / pmap "
          f"speed = {ratio:.3f} (median of paired steps); last losses mesh {losses['mesh']:.6f}, "
          f"pmap {losses['pmap']:.6f}", flush=True)
    del states


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("what", choices=("memory", "speed"))
  parser.add_argument("--devices", default="8,64", help="memory: mesh sizes")
  parser.add_argument("--num_classes", default="113287,1000000,10000000")
  parser.add_argument("--modes", default="classes,replicated")
  parser.add_argument("--per_device_batch", type=int, default=8)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--stages", default="1,2", help="speed")
  parser.add_argument("--batch_size", type=int, default=8, help="speed")
  parser.add_argument("--classes", type=int, default=29783, help="speed")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--pmap_commit", default=PMAP_COMMIT)
  args = parser.parse_args()
  if args.what == "memory":
    most = max(int(d) for d in args.devices.split(","))
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={most}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, ROOT)
  memory(args) if args.what == "memory" else speed(args)  # pylint: disable=expression-not-assigned


if __name__ == "__main__":
  main()
