r"""Embed a gallery with a trained run's checkpoint and write a searchable index.

    python -m instance_loss_jax.cli.export --workdir=RUN --images=DIR_OR_GLOB --out=INDEX
    python -m instance_loss_jax.cli.export --workdir=RUN --split=test [--kind=captions] \
        --out=INDEX \
        [--config.data.json=... --config.data.image_root=...]
    python -m instance_loss_jax.cli.export --workdir=RUN --captions=sentences.txt --out=INDEX

The gallery is a folder (or glob) of JPEG/PNG files, a split of the run's recorded dataset
(`--config.data.*` overrides its fields), or a text file with one sentence per line. The
best checkpoint by validation rsum (runs with eval.every_steps), else the newest, is used unless
--step says otherwise. The index (embeddings.npy, items.json,
index.json) is what `instance_loss_jax.cli.search` and `instance_loss_jax.Index.load` read; paths
may be local or on an object store (gs://).
"""

import logging

from absl import flags
from ml_collections import config_flags

from instance_loss_jax.cli import runner
from instance_loss_jax.config import base_config

log = logging.getLogger(__name__)


def define_flags():
  runner.define_compile_cache_flag()
  flags.DEFINE_string("workdir", None, "The training run's directory.")
  flags.DEFINE_string("out", None, "Directory to write the index to.")
  flags.DEFINE_string("images", None, "Gallery: a folder of JPEG/PNG files, or a glob.")
  flags.DEFINE_string("split", None, "Gallery: a split of the run's dataset (e.g. test).")
  flags.DEFINE_enum("kind", "images", ["images", "captions"], "With --split: what to index.")
  flags.DEFINE_string("captions", None, "Gallery: a text file, one sentence per line.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the best by validation rsum "
                       "if the run validated during training, else the newest).")
  flags.DEFINE_enum("dtype", "float16", ["float16", "float32"], "Embeddings' storage type.")
  config_flags.DEFINE_config_dict("config", base_config(), "Overrides of the run's recorded "
                                  "config, e.g. --config.data.json=... (with --split).")
  # Its default is every field of a config: 100 lines of --help that say nothing here.
  flags.FLAGS["config"].default_as_str = None
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv  # runner.run refuses positional arguments
  runner.configure_logging()
  runner.use_compile_cache()
  # Imported here: the Index imports JAX, Flax and Orbax (seconds), which --help and a flag
  # error do not need.
  # pylint: disable=g-import-not-at-top
  from instance_loss_jax.index import Index
  f = flags.FLAGS
  index = Index.from_run(f.workdir, images=f.images, split=f.split, captions=f.captions,
                         step=f.step, overrides=config_flags.get_override_values(f["config"]),
                         dtype=f.dtype, split_kind=f.kind)
  index.save(f.out)
  log.info("wrote %s", f.out)
  print(f"{f.out}: {len(index.items)} {index.kind}, {index.embeddings.shape[1]}-d "
        f"{index.embeddings.dtype}, {f.workdir} step {index.run['step']}")


def run():
  """Console-script entry point."""
  runner.run(main, define_flags)


if __name__ == "__main__":
  run()
