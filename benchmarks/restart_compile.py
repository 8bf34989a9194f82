r"""Seconds from the training binary's start to its first logged step: when it resumes a Stage II
run, with a cold and with a warm persistent compilation cache; and when it starts a fresh
Stage I, in this checkout and in another (before and after a change) (issue #53).

    python benchmarks/restart_compile.py --out=/tmp/restart_compile --pairs=3
    git worktree add /tmp/before <commit>
    python benchmarks/restart_compile.py --scenario=fresh --compare_root=/tmp/before

On the demo config (configs/demo.py) and synthetic data: a short Stage I, then a Stage II run of
one epoch that writes its checkpoint and fills the cache (`--compile_cache=OUT/cache`). Each
trial copies that Stage II workdir and resumes it for a second epoch, alternately with
`--compile_cache=off` (every program compiled again, as a restart on a fresh machine without a
cache) and with the filled cache; it is timed from the process's start to the log's
`train step:` line (the first step done), then killed. Medians over `--pairs`, and each pair's
ratio.

`--scenario=fresh`: a Stage I run from a backbone directory (`backbone_init`: the config's
ResNet with random weights, saved as `cli.port_resnet` writes one) in a new workdir, no cache, as
a first run on a new machine; each pair runs this checkout's binary and `--compare_root`'s.
`--backbone_init=False` starts from a random backbone instead, as the demo does.
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
flags.DEFINE_enum("scenario", "resume", ["resume", "fresh"], "what is timed (see above)")
flags.DEFINE_string("compare_root", "", "fresh: another checkout to pair with this one")
flags.DEFINE_bool("backbone_init", True, "fresh: start from a saved backbone")


def train(workdir: str, stage: int, data_dir: str, epochs: int, cache: str,
          extra=(), until_first_step=False, root=ROOT) -> float:
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
  proc = subprocess.Popen(command, cwd=root, env=env, stderr=subprocess.PIPE, text=True,
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


def save_random_backbone(path: str) -> None:
  """The config's image ResNet with random weights, as a backbone directory."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  import runpy
  from instance_loss_jax import backbone
  image = runpy.run_path(os.path.join(ROOT, flags.FLAGS.config))["get_config"]().model.image
  module = backbone.ResNet(depth=image.depth, width=image.width,
                           stride_variant=image.stride_variant, bn_epsilon=image.bn_epsilon,
                           stem_pool_pad=tuple(image.stem_pool_pad))
  variables = jax.jit(module.init, static_argnames="train")(
      jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32), train=False)
  origin = dict(source="random", format="benchmark", depth=image.depth, width=image.width,
                stride_variant=image.stride_variant, bn_epsilon=image.bn_epsilon,
                stem_pool_pad=list(image.stem_pool_pad),
                input=dict(mean_rgb=[0.0] * 3, std_rgb=[1.0] * 3, bgr=False))
  backbone.save_backbone(path, jax.device_get(variables), origin)


def fresh(data_dir: str) -> None:
  """Pairs of fresh Stage I starts: this checkout, then --compare_root's."""
  f = flags.FLAGS
  extra = []
  if f.backbone_init:
    path = os.path.join(f.out, "backbone")
    if not os.path.isdir(path):
      save_random_backbone(path)
    extra = [f"--config.backbone_init={path}"]
  roots = {"this": ROOT, **({"compare": f.compare_root} if f.compare_root else {})}
  runs = {name: [] for name in roots}
  for i in range(f.pairs):
    for name, root in roots.items():
      trial = os.path.join(f.out, f"fresh-{i}-{name}")
      shutil.rmtree(trial, ignore_errors=True)
      runs[name].append(train(trial, 1, data_dir, 1, "off", extra, until_first_step=True,
                              root=root))
      shutil.rmtree(trial, ignore_errors=True)
  summary = {name: round(statistics.median(v), 2) for name, v in runs.items()}
  if f.compare_root:
    summary["this / compare, per pair"] = [round(a / b, 3) for a, b in zip(*runs.values())]
  summary["runs"] = {name: [round(x, 2) for x in v] for name, v in runs.items()}
  print(json.dumps(summary, indent=1))


def main(argv):
  del argv
  from instance_loss_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  data_dir, cache = os.path.join(f.out, "data"), os.path.join(f.out, "cache")
  if not os.path.isfile(os.path.join(data_dir, "dataset.json")):
    # The demo's word vectors are 32-d; the dataset configs' text CNN takes 300.
    synthetic.generate(data_dir, f.scenes, seed=0, image_size=64,
                       w2v_dim=32 if "demo" in f.config else 300)
  if f.scenario == "fresh":
    fresh(data_dir)
    return
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
