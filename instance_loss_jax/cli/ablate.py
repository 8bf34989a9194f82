r"""The paper's mechanism study (Tables 4, 6, 7 and Figure 7) on the built-in synthetic dataset;
with --study=losses, the ranking terms (hinge, InfoNCE, sigmoid) with and without instance loss
and Table 5's pseudo-classes.

    python -m instance_loss_jax.cli.ablate --config=configs/demo.py --workdir=DIR [--seeds=0,1,2]
    python -m instance_loss_jax.cli.ablate --study=losses --scenes=1600 --val_fraction=0.4 \
        --workdir=DIR

Trains and evaluates (on the val split, as the paper's study does) every row for every seed,
then writes DIR/report.md (ours as mean +- standard deviation over seeds beside the paper's
Flickr30k numbers, each of the paper's orderings checked) and the P/Q histograms of the three
Stage II models. Runs are ordinary workdirs: re-running the command resumes or reuses them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import sys
import time
from typing import Any

import numpy as np
from absl import flags
from ml_collections import config_flags

from instance_loss_jax import backbone, trainer
from instance_loss_jax import config as config_lib
from instance_loss_jax.cli import runner
from instance_loss_jax.data import records, synthetic
from instance_loss_jax.workdir import checkpoint

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  table: str
  label: str
  stage: int
  lambdas: tuple[float, float, float]
  # i2t R@1, R@10, t2i R@1, R@10 (Flickr30k val); None: a row of ours the paper does not have
  paper: tuple[float, float, float, float] | None
  init_from: str = ""  # the row whose Stage I run this Stage II run starts from
  overrides: tuple[tuple[str, Any], ...] = ()
  # Table 5: K pseudo-classes, K = training images / images_per_class (MSCOCO's ratios), over
  # the pool5 features of the frozen backbone of row `backbone_from`'s Stage I run (the same
  # backbone the instance-loss row trains on).
  images_per_class: float = 0.0
  backbone_from: str = ""


ROWS = (
    Row("s1_rank", "4", "Only ranking loss", 1, (1.0, 0.0, 0.0), (6.1, 27.3, 4.9, 27.8)),
    Row("s1_inst", "4", "Only instance loss", 1, (0.0, 1.0, 1.0), (39.9, 79.1, 28.2, 67.9)),
    Row("s1_both", "4", "Instance + ranking loss", 1, (1.0, 1.0, 1.0), (37.6, 75.1, 24.1, 65.6)),
    Row("s2_inst", "4", "Only instance loss", 2, (0.0, 1.0, 1.0), (50.5, 86.0, 34.9, 75.7),
        "s1_inst"),
    Row("s2_rank", "4", "Only ranking loss", 2, (1.0, 0.0, 0.0), (47.5, 85.4, 29.0, 68.7),
        "s1_inst"),
    Row("s2_full", "4", "Full model", 2, (1.0, 1.0, 1.0), (55.4, 89.3, 39.7, 80.8), "s1_inst"),
    Row("s1_random_init", "6", "Random initialization", 1, (0.0, 1.0, 1.0),
        (38.0, 78.7, 26.6, 66.6), overrides=(("data.word2vec", ""),)),
    Row("s1_left_align", "7", "Left alignment", 1, (0.0, 1.0, 1.0), (34.1, 73.1, 23.6, 61.4),
        overrides=(("data.position_shift", False),)),
    # Ours: the full model's ranking negatives (s2_full: the hardest in the global batch).
    Row("s2_full_random", "neg.", "Full model, random negatives", 2, (1.0, 1.0, 1.0), None,
        "s1_inst", overrides=(("loss.negatives", "random"),)),
    Row("s2_full_mined", "neg.", "Full model, mined negatives (original)", 2, (1.0, 1.0, 1.0),
        None, "s1_inst", overrides=(("loss.negatives", "mined"),)),
    # Ours: both stages in bfloat16 (config's float32_parts kept in float32).
    Row("s1_inst_bf16", "prec.", "Only instance loss, bfloat16", 1, (0.0, 1.0, 1.0), None,
        overrides=(("compute_dtype", "bfloat16"),)),
    Row("s2_full_bf16", "prec.", "Full model, bfloat16", 2, (1.0, 1.0, 1.0), None,
        "s1_inst_bf16", overrides=(("compute_dtype", "bfloat16"),)),
)
# Issue #52's study: the ranking term as the hinge, CLIP's InfoNCE or SigLIP's sigmoid, with and
# without instance loss; and Table 5 (MSCOCO, Stage I, R@1 only: i2t, t2i).
ROWS_LOSSES = (
    Row("s1_inst", "5", "Instance loss (one class per image)", 1, (0.0, 1.0, 1.0),
        (52.2, None, 37.2, None)),
    Row("s1_k_few", "5", "K-class loss, K = images / 37.8 (MSCOCO's 3,000)", 1, (0.0, 1.0, 1.0),
        (38.0, None, 26.1, None), images_per_class=113287 / 3000, backbone_from="s1_inst"),
    Row("s1_k_more", "5", "K-class loss, K = images / 11.3 (MSCOCO's 10,000)", 1,
        (0.0, 1.0, 1.0), (44.7, None, 31.3, None), images_per_class=113287 / 10000,
        backbone_from="s1_inst"),
    Row("s2_full", "rank", "Full model, hinge (triplet)", 2, (1.0, 1.0, 1.0), None, "s1_inst"),
    Row("s2_full_infonce", "rank", "Full model, InfoNCE", 2, (1.0, 1.0, 1.0), None, "s1_inst",
        overrides=(("loss.ranking", "infonce"),)),
    Row("s2_full_sigmoid", "rank", "Full model, sigmoid (SigLIP)", 2, (1.0, 1.0, 1.0), None,
        "s1_inst", overrides=(("loss.ranking", "sigmoid"),)),
    Row("s2_rank", "rank", "Hinge alone", 2, (1.0, 0.0, 0.0), None, "s1_inst"),
    Row("s2_rank_infonce", "rank", "InfoNCE alone", 2, (1.0, 0.0, 0.0), None, "s1_inst",
        overrides=(("loss.ranking", "infonce"),)),
    Row("s2_rank_sigmoid", "rank", "Sigmoid alone", 2, (1.0, 0.0, 0.0), None, "s1_inst",
        overrides=(("loss.ranking", "sigmoid"),)),
)
STUDIES = {"paper": ROWS, "losses": ROWS_LOSSES}
PAPER_S = dict(s2_rank=0.2563, s2_inst=0.1633, s2_full=0.0914)
METRICS = ("i2t_r1", "i2t_r10", "t2i_r1", "t2i_r10")


def run_row(row: Row, seed: int, config_path: str, workdir: str, data_dir: str,
            overrides: dict[str, Any]) -> dict[str, Any]:
  settings = {"data.json": os.path.join(data_dir, "dataset.json"),
              "data.image_root": os.path.join(data_dir, "images"),
              "data.word2vec": os.path.join(data_dir, "word2vec.bin"),
              **overrides, "seed": seed, "loss.lambdas": row.lambdas, "eval.split": "val",
              **dict(row.overrides)}
  if row.init_from:
    settings["init_from"] = os.path.join(workdir, f"seed{seed}", row.init_from)
  config = config_lib.load_config(f"{config_path}:stage{row.stage}", settings)
  if row.images_per_class:
    num_train = len(records.read_split(config, "train"))
    with config.unlocked():
      config.data.pseudo_classes = max(2, round(num_train / row.images_per_class))
      config.backbone_init = _saved_backbone(os.path.join(workdir, f"seed{seed}"),
                                             row.backbone_from, config)
  return trainer.train_and_evaluate(config, os.path.join(workdir, f"seed{seed}", row.name))


def _saved_backbone(seed_dir: str, row_name: str, config) -> str:
  """The frozen backbone of a Stage I run as a backbone directory (once): its random init, as
  the run trained on it, with the config's architecture and input convention."""
  path = os.path.join(seed_dir, f"{row_name}-backbone")
  if not os.path.isdir(path):
    mgr = checkpoint.manager(os.path.join(seed_dir, row_name), read_only=True)
    variables = checkpoint.restore_variables(mgr, mgr.latest_step())
    image = config.model.image
    backbone.save_backbone(path, {k: variables[k]["backbone"] for k in ("params", "batch_stats")},
                           dict(source=f"{row_name}'s frozen backbone", format="study",
                                depth=image.depth, width=image.width,
                                stride_variant=image.stride_variant, bn_epsilon=image.bn_epsilon,
                                stem_pool_pad=list(image.stem_pool_pad),
                                input=config_lib.input_convention(config)))
  return path


def _stats(values):
  return float(np.mean(values)), float(np.std(values))


def _fmt(values, digits=1):
  mean, std = _stats(values)
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _claim(results, text, better, worse, key, lower_is_better=False) -> str:
  """A claim that row `better` beats row `worse` on `key`, checked on the means over seeds."""
  (b, bs), (w, ws) = (_stats([m[key] for m in results[row]]) for row in (better, worse))
  holds = b < w if lower_is_better else b > w
  gap = abs(b - w)
  verdict = "holds" if holds else "does NOT hold"
  clear = "clearly (gap > both spreads)" if gap > max(bs, ws) else "within the spread"
  return f"- {text}: {verdict}, {clear}: {b:.3g} ± {bs:.2g} vs {w:.3g} ± {ws:.2g} ({key})"


def orderings(results: dict[str, list[dict[str, float]]]) -> list[str]:
  """Each of the paper's claims, checked on our means, with the spread named."""
  claim = functools.partial(_claim, results)

  lines = []
  for key in ("i2t_r1", "t2i_r1"):
    lines += [
        claim("Stage I: instance loss beats ranking loss", "s1_inst", "s1_rank", key),
        claim("Stage I: instance loss alone beats instance + ranking", "s1_inst", "s1_both", key),
        claim("Stage II: full model beats instance loss only", "s2_full", "s2_inst", key),
        claim("Stage II: full model beats ranking loss only", "s2_full", "s2_rank", key),
        claim("word2vec init beats random init (Table 6)", "s1_inst", "s1_random_init", key),
        claim("position shift beats left alignment (Table 7)", "s1_inst", "s1_left_align", key),
        claim("(ours) hardest negatives beat random ones", "s2_full", "s2_full_random", key),
        claim("(ours) hardest negatives beat the original's mined ones", "s2_full",
              "s2_full_mined", key),
        claim("(ours) float32 beats bfloat16 (full model)", "s2_full", "s2_full_bf16", key),
    ]
  lines += [claim("S: full model < instance only", "s2_full", "s2_inst", "S", True),
            claim("S: instance only < ranking only", "s2_inst", "s2_rank", "S", True)]
  return lines


def write_report(workdir: str, seeds: list[int], results, command: str, seconds: float) -> str:
  lines = [
      "# Mechanism study on the synthetic dataset", "",
      f"Command: `{command}`  ", f"Seeds: {seeds}; wall time {seconds / 60:.1f} min. "
      "Ours: mean ± standard deviation over seeds, R@1/R@10 in percent on the synthetic val "
      "split; paper: Flickr30k val (ResNet-50, Tables 4, 6, 7). Rows of table 'neg.' and "
      "'prec.' are ours (negatives of the ranking loss; bfloat16 against float32).", "",
      "| table | row | stage | ours i2t R@1 | i2t R@10 | t2i R@1 | t2i R@10 | paper i2t R@1 | "
      "i2t R@10 | t2i R@1 | t2i R@10 |", "|---" * 11 + "|"]
  for row in ROWS:
    ours = [_fmt([m[k] for m in results[row.name]]) for k in METRICS]
    lines.append(f"| {row.table} | {row.label} | {'I' if row.stage == 1 else 'II'} | "
                 + " | ".join(ours) + " | "
                 + " | ".join(f"{p}" for p in row.paper or ("-",) * 4) + " |")
  lines += ["", "Separability indicator S (Figure 7; lower is better):", "",
            "| model | ours | paper |", "|---|---|---|"]
  for name, label in (("s2_rank", "ranking loss only"), ("s2_inst", "instance loss only"),
                      ("s2_full", "full model")):
    lines.append(f"| {label} | {_fmt([m['S'] for m in results[name]], 4)} | {PAPER_S[name]} |")
  lines += ["", "## The paper's orderings, checked", ""] + orderings(results)
  lines += ["", "Histograms (seed %d): " % seeds[0] + ", ".join(
      f"[{n}]({n}-similarity.png)" for n in ("s2_rank", "s2_inst", "s2_full")), ""]
  path = os.path.join(workdir, "report.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))
  for name in ("s2_rank", "s2_inst", "s2_full"):
    evals = os.path.join(workdir, f"seed{seeds[0]}", name, "eval")
    plot = sorted(p for p in os.listdir(evals) if p.endswith("-similarity.png"))[-1]
    shutil.copy(os.path.join(evals, plot), os.path.join(workdir, f"{name}-similarity.png"))
  return path


def write_losses_report(workdir: str, seeds: list[int], results, command: str,
                        seconds: float) -> str:
  """Issue #52's study: the ranking terms with and without instance loss, and Table 5."""
  claim = functools.partial(_claim, results)
  lines = [
      "# Ranking terms and pseudo-classes on the synthetic dataset", "",
      f"Command: `{command}`  ", f"Seeds: {seeds}; wall time {seconds / 60:.1f} min. "
      "Ours: mean ± standard deviation over seeds, in percent on the synthetic val split; "
      "paper: Table 5 (MSCOCO 1K test, Stage I, R@1). Rows of table 'rank' are ours.", "",
      "| table | row | stage | i2t R@1 | i2t R@10 | t2i R@1 | t2i R@10 | rsum | S | "
      "paper i2t R@1 | paper t2i R@1 |", "|---" * 11 + "|"]
  for row in ROWS_LOSSES:
    ours = [_fmt([m[k] for m in results[row.name]]) for k in METRICS + ("rsum",)]
    paper = (row.paper[0], row.paper[2]) if row.paper else ("-", "-")
    lines.append(f"| {row.table} | {row.label} | {'I' if row.stage == 1 else 'II'} | "
                 + " | ".join(ours) + f" | {_fmt([m['S'] for m in results[row.name]], 3)} | "
                 + " | ".join(str(p) for p in paper) + " |")
  lines += ["", "## Orderings, checked", ""]
  for key in ("i2t_r1", "t2i_r1", "rsum"):
    lines += [
        claim("Table 5: instance loss beats K-class loss (the larger K)", "s1_inst",
              "s1_k_more", key),
        claim("Table 5: the larger K beats the smaller", "s1_k_more", "s1_k_few", key),
        claim("InfoNCE beats the hinge (full model)", "s2_full_infonce", "s2_full", key),
        claim("sigmoid beats the hinge (full model)", "s2_full_sigmoid", "s2_full", key),
        claim("instance loss helps the hinge", "s2_full", "s2_rank", key),
        claim("instance loss helps InfoNCE", "s2_full_infonce", "s2_rank_infonce", key),
        claim("instance loss helps the sigmoid loss", "s2_full_sigmoid", "s2_rank_sigmoid",
              key),
    ]
  path = os.path.join(workdir, "report.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return path


def define_flags():
  runner.define_compile_cache_flag()
  config_flags.DEFINE_config_file(
      "config", "configs/demo.py", "Config file with get_config(stage); --config.FIELD=VALUE "
      "overrides apply to every run (e.g. --config.optim.schedule='((5, 1.0),)').")
  flags.DEFINE_string("workdir", None, "Directory for the data, runs and report.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: every row is run once per seed.")
  flags.DEFINE_integer("scenes", 800, "Synthetic scenes to generate (if DIR/data has none).")
  flags.DEFINE_float("val_fraction", 0.1, "The share of the scenes in the val split the study "
                     "reports on (generated data only; as much again goes to test).")
  flags.DEFINE_enum("study", "paper", sorted(STUDIES), "paper: Tables 4, 6, 7 and Figure 7 "
                    "(with our negatives and bfloat16 rows); losses: the hinge, InfoNCE and "
                    "SigLIP's sigmoid as the ranking term, with and without instance loss, and "
                    "Table 5's pseudo-classes.")
  runner.define_print_config()
  runner.require_unless_print_config("workdir")


def main(argv):
  del argv
  runner.configure_logging()
  f = flags.FLAGS
  start = time.time()
  workdir = f.workdir
  config_path = config_flags.get_config_filename(f["config"]).split(":", 1)[0]
  overrides = config_flags.get_override_values(f["config"])
  # Rows share programs (the init, the evaluation, same-loss steps): compile each once.
  runner.use_compile_cache(os.path.join(workdir, "compile_cache"))
  data_dir = os.path.join(workdir, "data")
  if not os.path.isfile(os.path.join(data_dir, "dataset.json")):
    synthetic.generate(data_dir, f.scenes, seed=0, image_size=64, w2v_dim=32,
                       val_fraction=f.val_fraction, test_fraction=f.val_fraction)
  seeds = [int(s) for s in f.seeds]
  rows = STUDIES[f.study]
  results = {row.name: [] for row in rows}
  for seed in seeds:
    for row in rows:
      log.info("seed %d, %s (Table %s: %s, stage %d)", seed, row.name, row.table,
               row.label, row.stage)
      results[row.name].append(
          run_row(row, seed, config_path, workdir, data_dir, overrides)["metrics"])
  command = "python -m instance_loss_jax.cli.ablate " + " ".join(sys.argv[1:])
  write = write_report if f.study == "paper" else write_losses_report
  path = write(workdir, seeds, results, command, time.time() - start)
  print(open(path, encoding="utf-8").read())


def run():
  runner.run(main, define_flags)


if __name__ == "__main__":
  run()
