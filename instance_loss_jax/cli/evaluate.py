r"""Evaluate a run's checkpoint on a split: retrieval metrics as JSON and a markdown table.

    python -m instance_loss_jax.cli.evaluate --workdir=DIR [--step=N] [--split=test] \
        [--config.FIELD=VALUE ...] [--print_config]
    python -m instance_loss_jax.cli.evaluate --config=configs/flickr30k.py:stage2 --workdir=DIR

Without --config, the run is evaluated as it was trained: its recorded DIR/config.json (data
paths included), with any --config.FIELD=VALUE on top (another split's data, another data
path, eval.* settings). With --config, that file's config describes the model and data instead
(it is checked against the checkpoint). The vocabulary is the run's own DIR/vocab.json.

Writes DIR/eval/<split>-<step>.json and .md, the similarity histograms and feature correlation
as PNG, and a page of the best and worst text->image queries (HTML). Checkpoints from any
number of devices restore here onto this process's devices.
"""

import logging
import sys

from absl import flags
from ml_collections import config_flags

from instance_loss_jax.cli import runner
from instance_loss_jax.config import ConfigError, base_config, validate_config

log = logging.getLogger(__name__)


def _config_file_given(argv: list[str]) -> bool:
  """Whether the command line names a config file (`--config=FILE` or `--config FILE`), as
  opposed to overrides of the run's recorded config (`--config.FIELD=VALUE`)."""
  return any(a == "--config" or a.startswith("--config=") for a in argv[1:])


def define_flags():
  runner.define_compile_cache_flag()
  if _config_file_given(sys.argv):
    config_flags.DEFINE_config_file(
        "config", None, "Config file and stage, e.g. configs/flickr30k.py:stage2; without it, "
        "the run's recorded config.", lock_config=True)
  else:
    # Overrides of the run's recorded config: checked against the schema here, applied to the
    # recorded config in `resolve_config`.
    config_flags.DEFINE_config_dict(
        "config", base_config(), "Without a file: --config.FIELD=VALUE overrides of the run's "
        "recorded config (e.g. --config.data.json=...). Or a config file and stage, e.g. "
        "--config=configs/flickr30k.py:stage2.")
    flags.FLAGS["config"].default_as_str = None  # 100 lines of --help that say nothing here
  flags.DEFINE_string("workdir", None, "The training run's directory.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the best by validation rsum "
                       "if the run validated during training, else the newest; as export, "
                       "search and the Index read a run).")
  flags.DEFINE_string("split", None, "Split to evaluate (default: config.eval.split).")
  runner.define_print_config()
  runner.require_unless_print_config("workdir")


def resolve_config(f):
  """The config the run is evaluated with: --config's file, else the run's recorded config
  with the command line's --config.FIELD=VALUE overrides."""
  if _config_file_given(sys.argv):
    return f.config
  if f.workdir is None:
    raise ConfigError("--print_config without --config prints a run's recorded config: give "
                      "--workdir=RUN, or --config=FILE")
  # Imported here: the checkpoint module imports Orbax and JAX, which --help does not need.
  # pylint: disable=g-import-not-at-top
  from instance_loss_jax.workdir import checkpoint
  from instance_loss_jax.config import apply_overrides
  return apply_overrides(checkpoint.read_config(f.workdir),
                         config_flags.get_override_values(f["config"]))


def main(argv):
  del argv  # runner.run refuses positional arguments
  runner.configure_logging()
  runner.use_compile_cache()
  # Imported here: TensorFlow (under the evaluation's input pipeline) takes seconds to import,
  # which --help, --print_config and a flag error do not need.
  # pylint: disable=g-import-not-at-top
  from instance_loss_jax.evaluation.evaluator import evaluate
  from instance_loss_jax.evaluation.tables import markdown_table
  f = flags.FLAGS
  config = resolve_config(f)
  validate_config(config)  # (--print_config: the runner validates what resolve_config gives)
  results = evaluate(config, f.workdir, f.split or config.eval.split, f.step)
  log.info("wrote %s", results["written"])
  print(markdown_table(results))


def run():
  """Console-script entry point."""
  runner.run(main, define_flags)


if __name__ == "__main__":
  run()
