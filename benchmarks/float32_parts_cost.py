r"""What keeping parts in float32 costs under bfloat16: XLA's FLOP and byte accounts of the
full-size Stage II step (configs/flickr30k.py: ResNet-50 at 224, the 4-stage text CNN, 29,783
classes), one device, nothing allocated.

    python benchmarks/float32_parts_cost.py [--batch=32] [--parts=w_share,batch_norm,heads]

For float32, bfloat16, and bfloat16 with each of --parts alone in float32 (config
`float32_parts`), compiles the step from abstract shapes and prints the compiled program's
`flops` and `bytes accessed`, and their ratio to plain bfloat16. These are XLA's static
estimates for this backend (CPU here): a proxy for what the parts cost, not a timing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--classes", type=int, default=29783)
  parser.add_argument("--parts", default="w_share,batch_norm,heads,text_cnn,backbone")
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import step_speed as bench  # pylint: disable=g-import-not-at-top

  from instance_loss_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(jax.devices()[:1])
  variants = [("float32", ()), ("bfloat16", ())] + [
      ("bfloat16", (p,)) for p in args.parts.split(",") if p]
  rows = []
  for dtype, parts in variants:
    config = bench.make_config(2, args.batch, args.classes, dtype)
    config.float32_parts = parts
    start = time.perf_counter()
    _, compiled = bench.compile_step(config, mesh)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    rows.append((dtype + (f" + float32 {parts[0]}" if parts else ""), float(cost["flops"]),
                 float(cost["bytes accessed"]), time.perf_counter() - start))
    print(f"{rows[-1][0]}: compiled in {rows[-1][3]:.0f} s", flush=True)
  base = next(r for r in rows if r[0] == "bfloat16")
  print(f"\njax {jax.__version__}, {jax.devices()[0].device_kind}; Stage II, batch {args.batch}, "
        f"{args.classes} classes\n")
  print("| variant | GFLOP/step | GB accessed/step | FLOP vs bfloat16 | bytes vs bfloat16 |")
  print("|---|---|---|---|---|")
  for name, flops, nbytes, _ in rows:
    print(f"| {name} | {flops / 1e9:.1f} | {nbytes / 1e9:.2f} | {flops / base[1]:.3f} | "
          f"{nbytes / base[2]:.3f} |")


if __name__ == "__main__":
  main()
