"""Flickr30k, ResNet-50 both branches (docs/design.md). Stage as the argument; the data as
prepared once by `python -m instance_loss_jax.cli.prepare --dataset=flickr30k` (docs/data.md):

    python -m instance_loss_jax.cli.train --config=configs/flickr30k.py:stage1 \
        --workdir=runs/f30k-1 --config.data.tfds_data_dir=DATA/tfds \
        --config.data.word2vec=DATA/GoogleNews-vectors-negative300.bin
    python -m instance_loss_jax.cli.train --config=configs/flickr30k.py:stage2 \
        --workdir=runs/f30k-2 \
        --config.init_from=runs/f30k-1 --config.data.tfds_data_dir=... (same data flags)

The files as published instead: --config.data.format=karpathy
--config.data.json=DATA/dataset_flickr30k.json --config.data.image_root=DATA/flickr30k-images.
"""

from instance_loss_jax.config import base_config, set_stage


def get_config(stage="stage1"):
  c = set_stage(base_config(), stage)
  # loss.lambdas: the paper's, from set_stage (Stage I (0, 1, 1), Stage II (1, 1, 1)). The
  # original's training script weighted 0/1/0.1; with our averaged losses that is
  # (0.0, 1.0, 0.1) (config.py explains the factor 1/2 on the ranking term).
  # The dataset prepared once as TFDS records (docs/data.md; set data.tfds_data_dir). The
  # files as published: --config.data.format=karpathy with data.json and data.image_root.
  c.data.format = "tfds"
  c.data.tfds_name = "flickr30k_karpathy"
  c.model.text.max_len = 32
  c.model.dropout = 0.75
  # Epochs: Stage I 240; Stage II 40, then 20 at lr/10.
  c.optim.schedule = ((240, 1.0),) if c.stage == 1 else ((40, 1.0), (20, 0.1))
  c.checkpoint_every = 2000
  c.eval.every_steps = 2000  # val split from memory; the final test uses the best by rsum
  return c
