r"""Where the time of one full-size train step goes, by XLA operation kind and model part.

    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python benchmarks/profile_step.py [--stage=2]

Traces two steps of benchmarks/step_speed.py's model with jax.profiler (a Perfetto trace, read
back here), and sums each executed XLA operation's time by kind (library matrix products and
convolutions, fusions, copies, ...) and, for products and convolutions, by the model part and
direction (forward / backward) recorded in the compiled program's metadata.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("text_encoder", "backbone", "image_head", "text_head", "w_share")


def index_hlo(hlo: str) -> dict[str, str]:
  """Instruction name -> the text of the computation it calls (fusions), from the compiled
  program's text."""
  bodies = {m.group(1): m.group(0) for m in re.finditer(r"^%?([\w.\-]+) .*?\n}", hlo, re.M | re.S)}
  calls = {}
  for m in re.finditer(r"^\s+(?:ROOT )?%?([\w.\-]+) = .*?calls=%?([\w.\-]+)", hlo, re.M):
    calls[m.group(1)] = bodies.get(m.group(2), "")
  return calls


def classify(bodies: dict[str, str], name: str) -> tuple[str, str]:
  """(kind, part): 'conv'/'dot'/fusion kind, and the model part and direction if known."""
  kind = re.sub(r"\.\d+$", "", name)
  body = bodies.get(name, "")
  if "convolution(" in body:
    kind = "convolution (library)"
  elif " dot(" in body:
    kind = "matrix product (library)"
  op = re.search(r'op_name="([^"]*)"', body)
  part = next((p for p in PARTS if op and p in op.group(1)), "")
  if part:
    part += " backward" if "transpose(" in op.group(1) else " forward"
  return kind, part


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--stage", type=int, default=2)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--dtype", default="float32")
  args = parser.parse_args()
  import jax
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  sys.path.insert(0, ROOT)
  import step_speed as bench

  from instance_loss_jax import sharding
  from instance_loss_jax import training as ts
  config = bench.make_config(args.stage, args.batch_size, 29783, args.dtype)
  mesh = sharding.make_mesh(jax.local_devices()[:1])
  step, compiled = bench.compile_step(config, mesh)
  state = ts.create_train_state(config, jax.random.key(0), 1000, mesh)
  batch = bench.host_batch(config)
  bodies = index_hlo(compiled.as_text())
  for _ in range(2):
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
  trace_dir = tempfile.mkdtemp(prefix="profile_step_")
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  for _ in range(2):
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
  jax.profiler.stop_trace()
  path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
  events = json.load(gzip.open(path))
  events = events["traceEvents"] if isinstance(events, dict) else events
  by_kind, by_part = collections.Counter(), collections.Counter()
  for e in events:
    name = e.get("name", "")
    if e.get("ph") != "X" or name.startswith(("$", "ThunkExecutor", "SlinkyThreadPool")):
      continue
    kind, part = classify(bodies, name)
    by_kind[kind] += e.get("dur", 0) / 2e3  # ms per step
    if kind.endswith("(library)"):
      by_part[f"{kind.split(' (')[0]}: {part or 'other (e.g. custom kernel gradients)'}"] += (
          e.get("dur", 0) / 2e3)
  total = sum(by_kind.values())
  print(f"stage {args.stage}, batch {args.batch_size}, {args.dtype}: {total:.0f} ms of XLA "
        f"operations per step\n\n| operation kind | ms/step | share |\n|---|---|---|")
  for kind, ms in by_kind.most_common(15):
    print(f"| {kind} | {ms:.0f} | {ms / total:.1%} |")
  print("\n| library products and convolutions | ms/step |\n|---|---|")
  for part, ms in by_part.most_common():
    print(f"| {part} | {ms:.0f} |")


if __name__ == "__main__":
  main()
