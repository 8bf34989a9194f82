r"""Top-10 search over a large gallery: our blocked device top-k against numpy's full sort.

    python benchmarks/search_speed.py                 # 100k and 1M x 2048, 16 queries

Each (gallery size, method) runs in a fresh subprocess that builds the same random gallery
(float16 rows, L2-normalised, as `instance_loss_jax.cli.export` stores them) and then searches it:
- ours: `instance_loss_jax.inference.top_k` (blocks of 65,536 rows to the device,
  jax.lax.top_k per block, merged);
- numpy: the scores of every row in float32 (computed in blocks of the same size), then
  `np.argsort` of each query's full row, the top 10 taken.
Both must return the same rows. Reported: the median time of 3 searches after one warm-up, and
the process's peak resident memory above the gallery itself (ru_maxrss after the search minus
after the gallery was built; the gallery is generated in blocks of 4,096 rows so that its
building adds little to the peak; JAX is imported and started before the gallery is built).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = 65536


def _gallery(n, dim, seed=0):
  import numpy as np
  rng = np.random.default_rng(seed)
  out = np.empty((n, dim), np.float16)
  step = 4096  # small generation blocks: the process's peak before searching is the gallery
  for lo in range(0, n, step):
    x = rng.standard_normal((min(step, n - lo), dim), dtype=np.float32)
    out[lo:lo + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
  queries = rng.standard_normal((16, dim), dtype=np.float32)
  return out, queries / np.linalg.norm(queries, axis=1, keepdims=True)


def _numpy_top_k(queries, gallery, k):
  import numpy as np
  scores = np.empty((len(queries), len(gallery)), np.float32)
  for lo in range(0, len(gallery), BLOCK):
    scores[:, lo:lo + BLOCK] = queries @ gallery[lo:lo + BLOCK].astype(np.float32).T
  return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def child(method, n, dim, k):
  import numpy as np
  sys.path.insert(0, ROOT)
  if method == "ours":
    import jax
    from instance_loss_jax.inference import top_k
    jax.numpy.zeros(1).block_until_ready()  # the runtime's start-up is not the search's
    search = lambda: top_k(queries, gallery, k, block_rows=BLOCK)[1]
  else:
    search = lambda: _numpy_top_k(queries, gallery, k)
  gallery, queries = _gallery(n, dim)
  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  rows = search()  # warm-up (and compile)
  times = []
  for _ in range(3):
    start = time.perf_counter()
    rows = search()
    times.append(time.perf_counter() - start)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  print(json.dumps(dict(method=method, n=n, seconds=statistics.median(times),
                        extra_mib=(peak - base) / 1024, gallery_mib=gallery.nbytes / 2**20,
                        rows=np.asarray(rows).tolist())))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="100000,1000000")
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args.child[0], int(args.child[1]), args.dim, args.k)
    return
  print(f"{os.cpu_count()} cores; {args.dim}-d float16 gallery, 16 queries, top-{args.k}")
  print("| gallery | method | search s | peak MiB above the gallery | gallery MiB |\n"
        "|---|---|---|---|---|")
  for n in (int(s) for s in args.sizes.split(",")):
    results = {}
    for method in ("numpy", "ours"):
      out = subprocess.run([sys.executable, __file__, f"--dim={args.dim}", f"--k={args.k}",
                            "--child", method, str(n)], check=True, capture_output=True,
                           text=True, env=dict(os.environ, JAX_PLATFORMS="cpu")).stdout
      results[method] = json.loads(out.strip().splitlines()[-1])
    same = results["numpy"]["rows"] == results["ours"]["rows"]
    for method, r in results.items():
      print(f"| {n:,} | {method} | {r['seconds']:.3f} | {r['extra_mib']:.0f} | "
            f"{r['gallery_mib']:.0f} |")
    print(f"| {n:,} | ours / numpy time | {results['ours']['seconds'] / results['numpy']['seconds']:.3f}"
          f" | same rows: {same} | |", flush=True)


if __name__ == "__main__":
  main()
