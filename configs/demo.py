"""The built-in synthetic dataset with a small model: both stages and the evaluation in minutes on
2 CPU cores (launch/demo.sh). Point data.json/image_root/word2vec at the generated folder:

    python -m instance_loss_jax.cli.synthetic --out=DATA --num_images=800 --w2v_dim=32
    python -m instance_loss_jax.cli.train --config=configs/demo.py:stage1 --workdir=runs/demo-1 \
        --config.data.json=DATA/dataset.json --config.data.image_root=DATA/images \
        --config.data.word2vec=DATA/word2vec.bin
"""

from instance_loss_jax.config import base_config, set_stage


def get_config(stage="stage1"):
  c = set_stage(base_config(), stage)
  c.data.format = "karpathy"
  c.data.resize_shorter = 64
  c.image_size = 56
  c.batch_size = 32
  c.model.image.depth = 14
  c.model.image.width = 8
  c.model.text.max_len = 24
  c.model.text.word_dim = 32
  c.model.text.blocks = (1, 1, 1, 1)
  c.model.text.widths = (64, 128, 128, 256)
  c.model.text.first_mids = (32, 64, 64, 128)
  c.model.embed_dim = 128
  c.model.dropout = 0.2
  # A few hundred steps instead of the datasets' hundreds of epochs: faster rates everywhere.
  c.optim.lr = 0.05
  c.optim.lr_mult.update(dict(backbone=1.0, word_embedding=1.0, text_cnn=1.0, heads=1.0,
                              w_share=1.0))
  c.optim.schedule = ((30, 1.0),) if c.stage == 1 else ((20, 1.0), (10, 0.1))
  c.checkpoint_every = 200
  c.log_every = 50
  c.eval.batch_size = 64
  return c
