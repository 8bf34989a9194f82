r"""Seconds from the training binary's start to its first logged step when it resumes a Stage II
run, with a cold and with a warm persistent compilation cache (issue #53).

    python benchmarks/restart_compile.py --out=/tmp/restart_compile --pairs=3

On the demo config (configs/demo.py) and synthetic data: a short Stage I, then a Stage II run of
one epoch that writes its checkpoint and fills the cache (`--compile_cache=OUT/cache`). Each
trial copies that Stage II workdir and resumes it for a second epoch, alternately with
`--compile_cache=off` (every program compiled again, as a restart on a fresh machine without a
cache) and with the filled cache; it is timed from the process's start to the log's
`train step:` line (the first step done), then killed. Medians over `--pairs`, and each pair's
ratio.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]

flags.DEFINE_string("out", "/tmp/restart_compile", "working folder")
flags.DEFINE_integer("pairs", 3, "cold/warm pairs of resumes")
flags.DEFINE_integer("scenes", 200, "synthetic scenes")
flags.DEFINE_string("config", "configs/demo.py", "config file (configs/flickr30k.py: full size, "
                    "read from the synthetic JSON and folder)")
flags.DEFINE_integer("batch_size", 0, "global batch (0: the config's)")


def train(workdir: str, stage: int, data_dir: str, epochs: int, cache: str,
          extra=(), until_first_step=False) -> float:
  """Runs the training binary; returns the seconds to its first step (then kills it) or to its
  end."""
  f = flags.FLAGS
  command = [sys.executable, "-m", "instance_loss_jax.cli.train",
             f"--config={f.config}:stage{stage}", f"--workdir={workdir}",
             "--config.data.format=karpathy", "--config.eval.every_steps=0",
             *([f"--config.batch_size={f.batch_size}"] if f.batch_size else []),
             f"--config.data.json={data_dir}/dataset.json",
             f"--config.data.image_root={data_dir}/images",
             f"--config.data.word2vec={data_dir}/word2vec.bin",
             f"--config.optim.schedule=(({epochs}, 1.0),)", "--config.eval.at_end=False",
             f"--compile_cache={cache}", *extra]
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  start = time.perf_counter()
  proc = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
                          stdout=subprocess.DEVNULL)
  for line in proc.stderr:
    if until_first_step and "train step:" in line:
      seconds = time.perf_counter() - start
      proc.kill()
      proc.wait()
      return seconds
  if proc.wait() != 0:
    raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode})")
  return time.perf_counter() - start


def main(argv):
  del argv
  from instance_loss_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  data_dir, cache = os.path.join(f.out, "data"), os.path.join(f.out, "cache")
  if not os.path.isfile(os.path.join(data_dir, "dataset.json")):
    # The demo's word vectors are 32-d; the dataset configs' text CNN takes 300.
    synthetic.generate(data_dir, f.scenes, seed=0, image_size=64,
                       w2v_dim=32 if "demo" in f.config else 300)
  one, two = os.path.join(f.out, "stage1"), os.path.join(f.out, "stage2")
  if not os.path.isdir(two):
    train(one, 1, data_dir, 1, "off")
    train(two, 2, data_dir, 1, cache, [f"--config.init_from={one}"])
  runs = {"cold (off)": [], "warm": []}
  for i in range(f.pairs):
    for name, choice in (("cold (off)", "off"), ("warm", cache)):
      trial = os.path.join(f.out, f"trial-{i}-{choice == 'off'}")
      shutil.rmtree(trial, ignore_errors=True)
      shutil.copytree(two, trial, ignore=shutil.ignore_patterns("compile_cache", "WRITER.json"))
      runs[name].append(train(trial, 2, data_dir, 2, choice, [f"--config.init_from={one}"],
                              until_first_step=True))
      shutil.rmtree(trial, ignore_errors=True)
  summary = {name: round(statistics.median(v), 2) for name, v in runs.items()}
  summary["warm / cold, per pair"] = [round(w / c, 3) for c, w in zip(*runs.values())]
  summary["runs"] = {name: [round(x, 2) for x in v] for name, v in runs.items()}
  summary["cache MB"] = round(sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in
                                  os.walk(cache) for n in ns) / 2**20, 1)
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  app.run(main)
