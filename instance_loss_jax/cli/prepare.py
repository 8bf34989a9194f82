r"""Prepare a dataset once as a TFDS dataset (ArrayRecord) from the files a user has.

    python -m instance_loss_jax.cli.prepare --dataset=flickr30k|mscoco|cuhk_pedes|synthetic \
        --manual_dir=DIR --data_dir=LOCAL_OR_GS_DIR

docs/data.md says which files each manual_dir holds and where they come from.
"""

from absl import flags

from instance_loss_jax.cli import runner

DATASETS = ("flickr30k", "mscoco", "cuhk_pedes", "synthetic")


def define_flags():
  """Flags of the binary only: importing the library defines none."""
  flags.DEFINE_enum("dataset", None, DATASETS, "Which dataset.", required=True)
  flags.DEFINE_string("manual_dir", None, "Folder with the dataset's annotation file and images "
                      "(for synthetic: a folder the synthetic generator wrote).", required=True)
  flags.DEFINE_string("data_dir", None, "TFDS data_dir to write to: local or gs://.",
                      required=True)
  flags.DEFINE_integer("num_shards", 0, "Files per split (0: TFDS's choice, about 1 per GiB).")
  flags.DEFINE_string("staging_dir", None, "Local folder a gs:// data_dir's dataset is built in "
                      "before its upload (default: the system's temporary folder).")
  flags.DEFINE_bool("overwrite", False, "Remove the prepared dataset and build it again (a "
                    "dataset prepared from other files is refused without it).")


def main(argv):
  del argv
  # Imported here: TensorFlow Datasets loads TensorFlow, which --help need not wait for.
  from instance_loss_jax.data import prepare  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  done = prepare.prepare(f.dataset, f.manual_dir, f.data_dir, f.num_shards, f.staging_dir,
                         f.overwrite)
  verb = "already prepared, reused" if done.reused else f"prepared in {done.seconds:.1f} s"
  print(f"{f.dataset}: {done.path} {verb}: {done.files} files, {done.bytes / 2**20:,.1f} MiB")
  print(done.table())
  name = prepare.tfds_datasets.SOURCES[f.dataset].builder
  print(f"Train and evaluate on it with: --config.data.format=tfds "
        f"--config.data.tfds_data_dir={f.data_dir} --config.data.tfds_name={name}")


def run():
  """Console-script entry point."""
  runner.run(main, define_flags)


if __name__ == "__main__":
  run()
