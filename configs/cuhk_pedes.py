"""CUHK-PEDES (reid_raw.json; class = person id, 11,003 training identities; text->image with
any image of the person a hit). Stage as the argument: --config=configs/cuhk_pedes.py:stage1.
"""

from instance_loss_jax.config import base_config, set_stage


def get_config(stage="stage1"):
  c = set_stage(base_config(), stage)
  # loss.lambdas: the paper's, from set_stage (Stage I (0, 1, 1), Stage II (1, 1, 1)). The
  # original's training script weighted 2/1/0.5; with our averaged losses that is
  # (1.0, 1.0, 0.5) (config.py explains the factor 1/2 on the ranking term).
  # The dataset prepared once as TFDS records (docs/data.md; set data.tfds_data_dir). The
  # files as published: --config.data.format=cuhk_pedes with data.json and data.image_root.
  c.data.format = "tfds"
  c.data.tfds_name = "cuhk_pedes"
  c.model.text.max_len = 56
  c.model.dropout = 0.8
  # Epochs: Stage I ~160; Stage II 40, then 21 at lr/10.
  c.optim.schedule = ((160, 1.0),) if c.stage == 1 else ((40, 1.0), (21, 0.1))
  c.checkpoint_every = 2000
  c.eval.every_steps = 2000  # val split from memory; the final test uses the best by rsum
  return c
