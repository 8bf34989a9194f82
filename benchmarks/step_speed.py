r"""Full-size dual-path train step: our XLA step, and PyTorch eager as the reference, one run.

    python benchmarks/step_speed.py                       # Stage I and II, batch 8, float32
    python benchmarks/step_speed.py --dtypes=float32,bfloat16 --batch_size=32
    python benchmarks/step_speed.py --num_classes=29783,113287,1000000 --stages=2 --reference=none

The model is configs/flickr30k.py's (ResNet-50 at 224x224, the authors' text CNN (docs/design.md) at length 32,
2048-d heads, W_share with --num_classes classes). Each row: the step time (median of --steps
after --warmup), image-sentence pairs per second, XLA's FLOP count of the step (its cost
analysis) and the achieved rate, model FLOPs utilisation when the device's peak is known, and
memory: XLA's own account of the compiled step (arguments + temporaries + outputs that are not
donated inputs, per device) and, on GPU, the allocator's peak. A W_share too large to run here is
compiled only: its memory is reported, its time is not.

`--reference=torch` times benchmarks/torch_reference.py on the same batch and prints our speed
over PyTorch's; `--check` first runs both from the same weights (dropout 0) and prints their
losses for two steps.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path, name):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def make_config(stage, batch_size, num_classes, dtype, dropout=None):
  """configs/flickr30k.py's config for `stage`, at the given batch, class count and dtype."""
  # config.load_config rather than ablate's: ablate imports the trainer and with it TensorFlow,
  # which a GPU host's JAX image need not have.
  from instance_loss_jax.config import load_config
  overrides = {"batch_size": batch_size, "num_classes": num_classes, "compute_dtype": dtype}
  if dropout is not None:
    overrides["model.dropout"] = dropout
  return load_config(f"{os.path.join(ROOT, 'configs', 'flickr30k.py')}:stage{stage}", overrides)


def host_batch(config, seed=0):
  """Random images and tokens, distinct labels; no device axis."""
  import numpy as np
  rng = np.random.default_rng(seed)
  n, s, length = config.batch_size, config.image_size, config.model.text.max_len
  return dict(images=rng.normal(size=(n, s, s, 3)).astype(np.float32),
              tokens=rng.integers(1, config.model.text.vocab_size, (n, length)).astype(np.int32),
              labels=rng.choice(config.num_classes, n, replace=False).astype(np.int32))


def compile_step(config, mesh):
  """Our train step for `config` on `mesh`: (step, compiled) with nothing allocated (the state
  and batch are abstract: shapes and shardings)."""
  from instance_loss_jax.workdir import checkpoint
  from instance_loss_jax import training as ts
  step = ts.make_train_step(config, 1000, mesh)
  template = ts.abstract_train_state(config, 1000, mesh)
  lowered = step.jitted.lower(checkpoint.state_tree(template), ts.abstract_batch(config, mesh))
  return step, lowered.compile()


def timing_state(config, mesh):
  """A train state for timing, its variables drawn on the host with numpy (scaled normals, BN
  at identity, W_share zeros): no random-init program to compile, which on a GPU costs about
  as much as the step's compile (issue #53)."""
  import jax
  import numpy as np
  from instance_loss_jax import sharding
  from instance_loss_jax import training as ts
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if sharding.is_w_share(path) or name in ("['bias']", "['mean']") or not leaf.ndim:
      return np.zeros(leaf.shape, leaf.dtype)
    if name in ("['scale']", "['var']"):
      return np.ones(leaf.shape, leaf.dtype)
    fan_in = max(1, int(np.prod(leaf.shape[:-1])))
    return (rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in)).astype(leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(draw, ts.abstract_variables(config))
  return ts.state_from_variables(config, variables, 1000, mesh)


def memory_account(compiled):
  """XLA's per-device bytes of a compiled step: arguments + temporaries + outputs that are not
  donated inputs (None where the backend gives no account)."""
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes -
          mem.alias_size_in_bytes)


def _memory_budget(device):
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "bytes_limit" in stats:
    return stats["bytes_limit"]
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def bench_ours(config, devices):
  """A row for our train step on a mesh of `devices`: compiled, analysed, and ready to time
  (`run`), unless it does not fit (then compiled only)."""
  import jax

  from instance_loss_jax import sharding
  from instance_loss_jax.workdir import checkpoint
  from instance_loss_jax import training as ts
  from instance_loss_jax.training import flops
  row = dict(framework="jax/xla", stage=config.stage, dtype=config.compute_dtype,
             classes=config.num_classes, batch=config.batch_size)
  n = len(devices)
  mesh = sharding.make_mesh(devices)
  start = time.perf_counter()
  step, compiled = compile_step(config, mesh)
  row["compile_s"] = time.perf_counter() - start
  # Printed now: on a GPU one full-size compile takes minutes, and a run cut short by its time
  # limit should still say how far it got.
  print(f"compiled stage {config.stage}, {config.compute_dtype}, {config.num_classes:,} classes "
        f"in {row['compile_s']:.1f} s", file=sys.stderr, flush=True)
  row["gflop_per_step"] = (flops.compiled_flops(compiled) or 0.0) * n / 1e9
  if memory_account(compiled) is not None:
    row["xla_bytes_per_device"] = memory_account(compiled)
    row["xla_temp_bytes_per_device"] = compiled.memory_analysis().temp_size_in_bytes
  classes = sharding.padded_num_classes(config, mesh)
  # The parameters, the momentum, and the gradient in the step: split over the devices when
  # W_share's classes are sharded, else on every device.
  row["w_share_bytes_per_device"] = 3 * (2048 + 1) * classes * 4 // (
      n if sharding.classes_sharded(config) else 1)
  if row.get("xla_bytes_per_device", 0) > 0.8 * _memory_budget(devices[0]):
    row["note"] = "compiled only: does not fit this device"
    return row
  state = timing_state(config, mesh)
  batch = host_batch(config)
  holder = [state, None]

  def run():
    # What step(state, batch) does, with the executable compiled above: a jit call would
    # compile the step a second time (its abstract lowering is not the call's cache entry).
    # The host batch is checked and placed in every step, as in a run with no device prefetch.
    arrays, holder[1] = compiled(checkpoint.state_tree(holder[0]), step.place(batch))
    holder[0] = holder[0].replace(**arrays)
    jax.block_until_ready(holder[1]["loss"])

  def finish(row):
    stats = devices[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      row["device_peak_bytes"] = stats["peak_bytes_in_use"]  # the process's peak so far
    row["tflop_per_s"] = row["gflop_per_step"] / row["step_s"] / 1e3
    peak = flops.peak_tflops(devices[0].device_kind, config.compute_dtype)
    if peak:
      row["mfu"] = row["tflop_per_s"] / (peak * n)
    row["loss"] = float(holder[1]["loss"])
    if not math.isfinite(row["loss"]):
      row["note"] = f"loss {row['loss']}: the timing is of a broken step"
    holder.clear()  # frees the state before the next group's

  row["run"], row["finish"] = run, finish
  return row


def bench_torch(config, torch_reference):
  """A row for the PyTorch reference, ready to time."""
  import torch
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = torch_reference.DualPath(config).to(device).train()
  optimizer = torch_reference.make_optimizer(model, config)
  images, tokens, labels = (t.to(device) for t in
                            torch_reference.to_torch_batch(host_batch(config)))

  def run():
    torch_reference.train_step(model, optimizer, images, tokens, labels, config)
    if device == "cuda":
      torch.cuda.synchronize()

  def finish(row):
    if device == "cuda":
      row["device_peak_bytes"] = torch.cuda.max_memory_allocated()

  return dict(framework=f"pytorch eager ({device}, {torch.get_num_threads()} threads)",
              stage=config.stage, dtype="float32", classes=config.num_classes,
              batch=config.batch_size, run=run, finish=finish)


def time_interleaved(rows, warmup, steps):
  """Times the rows' steps in turn (A, B, C, A, B, C, ...), so that a drift in the machine's
  speed (other tenants, clocks) reaches every row alike; sets step_s (median) and the per-step
  times. Ratios between rows are taken step by step (`paired_ratio`)."""
  runnable = [r for r in rows if "run" in r]
  for row in runnable:
    for _ in range(warmup):
      row["run"]()
    row["times"] = []
  for _ in range(steps):
    for row in runnable:
      start = time.perf_counter()
      row["run"]()
      row["times"].append(time.perf_counter() - start)
  for row in runnable:
    row["step_s"] = statistics.median(row["times"])
    row["pairs_per_s"] = row["batch"] / row["step_s"]
    row.pop("finish")(row)
    del row["run"]


def paired_ratio(ours, reference):
  """Median over steps of reference time / our time (> 1: ours is faster)."""
  return statistics.median(r / o for o, r in zip(ours["times"], reference["times"]))


def check(stage, batch_size, num_classes, torch_reference):
  """Both frameworks from the same weights and batch: their losses over two steps, with a
  float64 PyTorch run as the arbiter of float32 rounding."""
  import jax
  import torch

  from instance_loss_jax import sharding, training as ts
  config = make_config(stage, batch_size, num_classes, "float32", dropout=0.0)
  one_device = sharding.make_mesh(jax.devices()[:1])
  state = ts.host_state(ts.create_train_state(config, jax.random.key(1), 1000, one_device), config)
  losses = torch_reference.check_equivalence(config, ts.variables_of(state),
                                             host_batch(config, seed=1), steps=2,
                                             torch_dtypes=(torch.float32, torch.float64))
  for i, exact in enumerate(losses["torch.float64"]):
    ours, theirs = losses["ours"][i], losses["torch.float32"][i]
    print(f"check stage {stage}, step {i}: loss ours {ours:.6f}, pytorch {theirs:.6f} "
          f"(float64: {exact:.6f}); |ours - pytorch| / loss = {abs(ours - theirs) / exact:.1e}, "
          f"float32 error ours {abs(ours - exact) / exact:.1e}, pytorch "
          f"{abs(theirs - exact) / exact:.1e}", flush=True)


def _fmt(row):
  def g(key, fmt, scale=1.0):
    return format(row[key] / scale, fmt) if key in row else "-"
  return (f"| {row['framework']} | {row['stage']} | {row['dtype']} | {row['classes']:,} | "
          f"{row['batch']} | {g('step_s', '.3f')} | {g('pairs_per_s', '.2f')} | "
          f"{g('gflop_per_step', '.0f')} | {g('tflop_per_s', '.3f')} | {g('mfu', '.1%')} | "
          f"{g('xla_bytes_per_device', '.2f', 2**30)} | {g('device_peak_bytes', '.2f', 2**30)} | "
          f"{g('w_share_bytes_per_device', '.2f', 2**30)} | {row.get('note', '')} |")


HEADER = ("| framework | stage | dtype | classes | batch | step s | pairs/s | GFLOP/step | "
          "TFLOP/s | MFU | XLA GiB/dev | peak GiB/dev | W_share GiB/dev | note |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--stages", default="1,2")
  parser.add_argument("--dtypes", default="float32")
  parser.add_argument("--num_classes", default="29783")
  parser.add_argument("--batch_size", type=int, default=8, help="global, over all devices")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--reference", choices=("torch", "none"), default="torch")
  parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                      help="losses of both frameworks from the same weights (with --reference)")
  parser.add_argument("--json", default="", help="also write the rows here")
  args = parser.parse_args()

  import jax
  sys.path.insert(0, ROOT)
  devices = jax.local_devices()
  print(f"{datetime.date.today()} | {platform.node()} | {os.cpu_count()} CPU cores | "
        f"{len(devices)} x {devices[0].device_kind} | jax {jax.__version__} | "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  torch_reference = None
  if args.reference == "torch":
    torch_reference = _load(os.path.join(ROOT, "benchmarks", "torch_reference.py"),
                            "torch_reference")
    import torch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
  classes = [int(c) for c in args.num_classes.split(",")]
  if torch_reference and args.check:
    for stage in (1, 2):
      check(stage, args.batch_size, classes[0], torch_reference)

  rows = []
  for stage in (int(s) for s in args.stages.split(",")):
    for num_classes in classes:
      group = [bench_ours(make_config(stage, args.batch_size, num_classes, dtype), devices)
               for dtype in args.dtypes.split(",")]
      if torch_reference:
        group.append(bench_torch(make_config(stage, args.batch_size, num_classes, "float32"),
                                 torch_reference))
      time_interleaved(group, args.warmup, args.steps)
      for row in group:
        print(_fmt(row), flush=True)
      for ours in group[:-1] if torch_reference else []:
        if "times" in ours:
          ours["vs_reference"] = paired_ratio(ours, group[-1])
          print(f"stage {stage}, {num_classes:,} classes, {ours['dtype']}: ours / pytorch = "
                f"{ours['vs_reference']:.2f}x (median of {args.steps} paired steps)", flush=True)
      rows.extend(group)
  print("\n" + HEADER)
  for row in rows:
    print(_fmt(row))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
