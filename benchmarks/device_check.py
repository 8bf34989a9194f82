r"""The figures a short accelerator lease is for, cheapest first, each printed once measured.

    bash benchmarks/device_check.sh                   # the wrapper: cache, wheels, time budget
    python benchmarks/device_check.py --dry_run       # CPU, the tests' tiny model (a test runs it)

Parts, in this order (issue #53); one whose estimated cost exceeds the time left is skipped with
a line that says so, and the parts after it still get their turn:
  1. Stage II, bfloat16, --batch_per_device (32): compile s, step s, pairs/s, TFLOP/s, MFU,
     XLA's memory account per device and the allocator's peak.
  2. The same at the largest of --larger (64,128,256) per device that fits: the size is
     predicted from part 1's memory account (temporaries grow with the batch), only that one
     is compiled, and the next smaller when XLA's account of it does not fit after all.
  3. Stage I, bfloat16, batches fed through data.device_prefetch 0 and 2 (ms per step, the
     loss read once at the end, as the trainer does between log lines).
  4. Stage II in float32 at --batch_per_device.
  5. W_share at --classes (113,287 and 1,000,000: MSCOCO's and a pod-sized class count).
Each figure is one JSON line on stdout and in --out/device_check.jsonl as soon as it is known,
so a lease cut short still leaves what it measured. No state is drawn by a random-init program
(step_speed.timing_state), and compiles go through JAX's persistent cache when the environment
names one (device_check.sh does): a rerun on the same machine starts where compiling stopped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "benchmarks")]
import step_speed  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


class Check:
  """The time budget, the config maker and the output; one per run."""

  def __init__(self, args):
    import jax  # pylint: disable=g-import-not-at-top
    self.args, self.jax = args, jax
    self.devices = jax.local_devices()
    self.deadline = time.monotonic() + args.budget_s
    self.compile_s = None  # the first full compile's seconds: the estimate for the others
    self.step_s = None
    self.rows = []  # every step row, for the closing table
    os.makedirs(args.out, exist_ok=True)
    self.log = open(os.path.join(args.out, "device_check.jsonl"), "a", encoding="utf-8")

  def config(self, stage, batch_per_device, dtype="bfloat16", num_classes=None):
    batch = batch_per_device * len(self.devices)
    if self.args.dry_run:
      from helpers import tiny_config  # pylint: disable=g-import-not-at-top
      stage2 = {"stage": 2, "freeze_backbone": False, "backbone_bn": "train",
                "loss.lambdas": (1.0, 1.0, 1.0)} if stage == 2 else {}
      # A batch's labels are distinct classes (step_speed.host_batch).
      return tiny_config(batch_size=batch, num_classes=max(num_classes or 64, batch),
                         compute_dtype=dtype, **stage2)
    return step_speed.make_config(stage, batch, num_classes or 29783, dtype)

  def emit(self, part, **fields):
    record = {"part": part, **fields}
    line = json.dumps(record)
    print(line, flush=True)
    self.log.write(line + "\n")
    self.log.flush()

  def left(self):
    return self.deadline - time.monotonic()

  def affordable(self, part, compiles, steps):
    """Whether `compiles` compiles and `steps` steps fit the time left (estimates from part 1;
    before it, everything is tried)."""
    if self.compile_s is None:
      return True
    need = compiles * self.compile_s + steps * (self.step_s or 0.0) * 3
    if need <= self.left():
      return True
    self.emit(part, skipped=f"needs about {need:.0f} s, {max(self.left(), 0):.0f} s left")
    return False

  def step_row(self, part, config):
    """Compiles and times a train step (step_speed's row), or says it does not fit."""
    start = time.perf_counter()
    try:
      row = step_speed.bench_ours(config, self.devices)
      if "run" in row:
        step_speed.time_interleaved([row], self.args.warmup, self.args.steps)
    except Exception as e:  # pylint: disable=broad-except
      if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
        raise
      row = dict(framework="jax/xla", stage=config.stage, dtype=config.compute_dtype,
                 classes=config.num_classes, batch=config.batch_size,
                 note=f"out of memory: {str(e).splitlines()[0]}")
    row.pop("times", None)
    self.emit(part, seconds=round(time.perf_counter() - start, 1), **row)
    self.rows.append(row)
    return row


def stage2_rows(check):
  args = check.args
  first = check.step_row("stage2_bf16", check.config(2, args.batch_per_device))
  check.compile_s, check.step_s = first.get("compile_s"), first.get("step_s", 0.0)
  # Part 2: temporaries (activations, their gradients) grow with the batch; the state does not.
  account = first.get("xla_bytes_per_device")
  budget = step_speed._memory_budget(check.devices[0])  # pylint: disable=protected-access
  if not account:
    check.emit("stage2_bf16_larger", skipped="no memory account on this backend")
    return
  temp = first.get("xla_temp_bytes_per_device", account)
  fixed, per_row = account - temp, temp / args.batch_per_device
  fits = [b for b in args.larger if fixed + per_row * b <= 0.85 * budget]
  check.emit("stage2_bf16_larger", predicted_fit=fits, budget_bytes=budget,
             predicted_bytes={b: int(fixed + per_row * b) for b in args.larger})
  for size in sorted(fits, reverse=True):
    if not check.affordable("stage2_bf16_larger", 1, args.warmup + args.steps):
      return
    row = check.step_row("stage2_bf16_larger", check.config(2, size))
    if "step_s" in row:
      return


def stage1_prefetch(check):
  """Stage I steps fed through DevicePrefetch of 0 and 2 batches, alternating."""
  # pylint: disable=g-import-not-at-top
  from instance_loss_jax import sharding, training as ts
  from instance_loss_jax.training.prefetch import DevicePrefetch
  args, jax = check.args, check.jax
  config = check.config(1, args.batch_per_device)
  mesh = sharding.make_mesh(check.devices)
  step = ts.make_train_step(config, 1000, mesh)
  state = step_speed.timing_state(config, mesh)
  host = [step_speed.host_batch(config, seed=s) for s in range(4)]

  def loop(size, n):
    nonlocal state
    start = time.perf_counter()
    with DevicePrefetch((host[i % 4] for i in range(n)), step.place, size) as batches:
      for batch in batches:
        state, metrics = step(state, batch)
    float(metrics["loss"])
    return (time.perf_counter() - start) / n

  start = time.perf_counter()
  loop(0, 1 + args.warmup)  # compiles
  compile_s = time.perf_counter() - start
  times = {0: [], 2: []}
  for _ in range(3):
    for size in times:
      times[size].append(loop(size, args.steps))
  ms = {f"prefetch_{k}_ms": round(1000 * statistics.median(v), 2) for k, v in times.items()}
  check.emit("stage1_prefetch", batch=config.batch_size, compile_and_warmup_s=round(compile_s, 1),
             **ms, prefetch_2_over_0=round(ms["prefetch_2_ms"] / ms["prefetch_0_ms"], 3))
  del state
  jax.clear_caches()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--budget_s", type=float, default=540.0,
                      help="seconds this run may take; later parts are skipped to fit")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "device_results"))
  parser.add_argument("--batch_per_device", type=int, default=32)
  parser.add_argument("--larger", default="64,128,256")
  parser.add_argument("--classes", default="113287,1000000")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--dry_run", action="store_true",
                      help="the tests' tiny model, batches 4 and 8, 64 classes (on CPU)")
  args = parser.parse_args()
  if args.dry_run:
    # The sweep's one size is part 1's class count: its program comes back from the cache (the
    # dry run exercises the parts; its figures mean nothing).
    args.batch_per_device, args.larger, args.classes = 4, "8", "64"
    args.warmup, args.steps = 1, 2
  args.larger = [int(b) for b in args.larger.split(",")]
  args.classes = [int(c) for c in args.classes.split(",")]
  check = Check(args)
  jax = check.jax
  check.emit("start", date=str(datetime.date.today()), jax=jax.__version__,
             device=check.devices[0].device_kind, devices=len(check.devices),
             budget_s=args.budget_s, dry_run=args.dry_run,
             cache=jax.config.jax_compilation_cache_dir or "off")
  stage2_rows(check)
  if check.affordable("stage1_prefetch", 1, 2 + 7 * args.steps):
    stage1_prefetch(check)
  if check.affordable("stage2_float32", 1, args.warmup + args.steps):
    check.step_row("stage2_float32", check.config(2, args.batch_per_device, "float32"))
  for classes in args.classes:
    if check.affordable(f"w_share_{classes}", 1, args.warmup + args.steps):
      check.step_row(f"w_share_{classes}", check.config(2, args.batch_per_device,
                                                        num_classes=classes))
  check.emit("end", seconds_left=round(check.left(), 1))
  # The step rows again as one markdown table (step_speed's columns), for RESULTS.md.
  print("\n" + step_speed.HEADER)
  for row in check.rows:
    print(step_speed._fmt(row))  # pylint: disable=protected-access


if __name__ == "__main__":
  main()
