r"""Write the built-in synthetic dataset (`instance_loss_jax.data.synthetic`).

    python -m instance_loss_jax.cli.synthetic --out=DIR --num_images=N --seed=S

writes DIR/images/*.png, DIR/dataset.json (Karpathy format: train/val/test splits) and
DIR/word2vec.bin (word2vec trained on the training captions).
"""

from absl import flags

from instance_loss_jax.cli import runner
from instance_loss_jax.data.synthetic import generate


def define_flags():
  """Flags of the binary only: importing the library defines none."""
  flags.DEFINE_string("out", None, "Output directory.", required=True)
  flags.DEFINE_integer("num_images", 1000, "Number of images (unique scenes).")
  flags.DEFINE_integer("seed", 0, "Random seed.")
  flags.DEFINE_integer("image_size", 96, "Side of the square PNG images.")
  flags.DEFINE_float("val_fraction", 0.1, "Fraction of images in the val split.")
  flags.DEFINE_float("test_fraction", 0.1, "Fraction of images in the test split.")
  flags.DEFINE_integer("w2v_dim", 300, "word2vec vector size.")


def main(argv):
  del argv
  f = flags.FLAGS
  summary = generate(f.out, f.num_images, f.seed, f.image_size, f.val_fraction, f.test_fraction,
                     f.w2v_dim)
  print(f"wrote {f.num_images} images to {f.out}: {summary}")


def run():
  """Console-script entry point."""
  runner.run(main, define_flags)


if __name__ == "__main__":
  run()
