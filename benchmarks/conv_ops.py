r"""Where the XLA:CPU ResNet-50 step loses to PyTorch: per-convolution times, and the backbone.

    python benchmarks/conv_ops.py              # each conv shape: forward, input and kernel grads
    python benchmarks/conv_ops.py --resnet50   # ResNet-50 fwd+bwd+SGD, ours vs PyTorch, paired
    XLA_FLAGS=--xla_cpu_enable_fast_math=true python benchmarks/conv_ops.py --resnet50

Shapes are ResNet-50's at batch 8 (224x224 input). For each: XLA's convolution
(`lax.conv_general_dilated` and its autodiff), the matrix-product forms of
instance_loss_jax.models.layers (1x1 as a product, kernel gradient as patches^T @ dy), and
PyTorch's `conv2d` / `conv2d_input` / `conv2d_weight`; best of 5 after 2 warm-up calls, ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from instance_loss_jax.models import layers  # noqa: E402

BATCH = 8
SHAPES = [  # (input size, in channels, out channels, kernel, stride)
    (224, 3, 64, 7, 2), (56, 64, 64, 1, 1), (56, 256, 64, 1, 1), (56, 64, 256, 1, 1),
    (56, 256, 128, 1, 2), (56, 64, 64, 3, 1), (28, 128, 128, 3, 1), (14, 256, 256, 3, 1),
    (7, 512, 512, 3, 1)]


def best_ms(fn, repeats=5):
  fn()
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * min(times)


def jax_times(conv, x, w, dy):
  fwd = jax.jit(conv)
  d_input = jax.jit(lambda x, w, g: jax.vjp(lambda v: conv(v, w), x)[1](g)[0])
  d_kernel = jax.jit(lambda x, w, g: jax.vjp(lambda k: conv(x, k), w)[1](g)[0])
  return [best_ms(lambda f=f, a=a: jax.block_until_ready(f(*a)))
          for f, a in ((fwd, (x, w)), (d_input, (x, w, dy)), (d_kernel, (x, w, dy)))]


def per_op():
  print("| input | in->out | kernel/stride | GFLOP | XLA conv fwd / dx / dw | ours fwd / dx / dw "
        "| PyTorch fwd / dx / dw |\n|---|---|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  for size, cin, cout, k, s in SHAPES:
    p = k // 2
    x = rng.normal(size=(BATCH, size, size, cin)).astype(np.float32)
    w = (0.05 * rng.normal(size=(k, k, cin, cout))).astype(np.float32)
    dy = rng.normal(size=(BATCH, size // s, size // s, cout)).astype(np.float32)
    xla = jax_times(lambda v, kk: layers._conv(v, kk, s, p), x, w, dy)
    if k == 1:
      ours = jax_times(lambda v, kk: jnp.dot(v[:, ::s, ::s], kk[0, 0]), x, w, dy)
    else:
      ours = jax_times(lambda v, kk: layers.conv_im2col_wgrad(v, kk, s, p), x, w, dy)
    tx = torch.tensor(x.transpose(0, 3, 1, 2))
    tw = torch.tensor(w.transpose(3, 2, 0, 1))
    tg = torch.tensor(dy.transpose(0, 3, 1, 2))
    with torch.no_grad():
      ref = [best_ms(lambda: F.conv2d(tx, tw, stride=s, padding=p)),
             best_ms(lambda: torch.nn.grad.conv2d_input(tx.shape, tw, tg, stride=s, padding=p)),
             best_ms(lambda: torch.nn.grad.conv2d_weight(tx, tw.shape, tg, stride=s,
                                                         padding=p))]
    gflop = 2 * BATCH * (size // s) ** 2 * cin * cout * k * k / 1e9
    fmt = lambda t: " / ".join(f"{v:.1f}" for v in t)  # noqa: E731
    print(f"| {size}x{size} | {cin}->{cout} | {k}x{k}/{s} | {gflop:.2f} | {fmt(xla)} | "
          f"{fmt(ours)} | {fmt(ref)} |", flush=True)


def resnet50(steps):
  """Our ResNet-50 (models/resnet.py) and the reference's, fwd + bwd + SGD, steps alternated."""
  import optax
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import step_speed as bench  # noqa: E402
  from instance_loss_jax.models import ResNet
  torch_reference = bench._load(os.path.join(ROOT, "benchmarks", "torch_reference.py"), "tr")
  model = ResNet(depth=50)
  x = jnp.ones((BATCH, 224, 224, 3), jnp.float32)
  variables = jax.jit(model.init, static_argnames="train")(jax.random.key(0), x, train=False)
  tx = optax.sgd(0.01, 0.9)

  @jax.jit
  def step(params, batch_stats, opt_state):
    def loss(p):
      feats, updates = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                   mutable=["batch_stats"])
      return jnp.mean(feats ** 2), updates["batch_stats"]
    (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, value

  state = [variables["params"], variables["batch_stats"], tx.init(variables["params"])]

  def ours():
    state[0], state[1], state[2], value = step(*state)
    value.block_until_ready()

  config = bench.make_config(2, BATCH, 1000, "float32")
  reference = torch_reference.ResNet(config.model).train()
  optimizer = torch.optim.SGD(reference.parameters(), lr=0.01, momentum=0.9)
  images = torch.ones(BATCH, 3, 224, 224)

  def theirs():
    optimizer.zero_grad()
    (reference(images) ** 2).mean().backward()
    optimizer.step()

  rows = [dict(run=ours, times=[]), dict(run=theirs, times=[])]
  for row in rows:
    row["run"]()
    row["run"]()
  for _ in range(steps):
    for row in rows:
      start = time.perf_counter()
      row["run"]()
      row["times"].append(time.perf_counter() - start)
  t_ours, t_ref = (statistics.median(r["times"]) for r in rows)
  ratio = statistics.median(b / a for a, b in zip(rows[0]["times"], rows[1]["times"]))
  print(f"ResNet-50 train step, batch {BATCH}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}: "
        f"ours {t_ours:.3f} s ({BATCH / t_ours:.2f} img/s), PyTorch {t_ref:.3f} s "
        f"({BATCH / t_ref:.2f} img/s); ours / PyTorch speed {ratio:.2f}x (median of {steps} "
        "paired steps)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--resnet50", action="store_true")
  parser.add_argument("--steps", type=int, default=6)
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads, {os.cpu_count()} CPU cores", flush=True)
  if args.resnet50:
    resnet50(args.steps)
  else:
    per_op()


if __name__ == "__main__":
  main()
