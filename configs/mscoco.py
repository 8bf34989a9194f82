"""MSCOCO (Karpathy split: train + restval = 113,287 classes; 5K and 1K test). Stage as the
argument: --config=configs/mscoco.py:stage1 or :stage2 (with --config.init_from=STAGE1_WORKDIR).
"""

from instance_loss_jax.config import base_config, set_stage


def get_config(stage="stage1"):
  c = set_stage(base_config(), stage)
  # loss.lambdas: the paper's, from set_stage (Stage I (0, 1, 1), Stage II (1, 1, 1)). The
  # original's training script weighted 2/1/0.1; with our averaged losses that is
  # (1.0, 1.0, 0.1) (config.py explains the factor 1/2 on the ranking term).
  # The dataset prepared once as TFDS records (docs/data.md; set data.tfds_data_dir). The
  # files as published: --config.data.format=karpathy with data.json and data.image_root.
  c.data.format = "tfds"
  c.data.tfds_name = "mscoco_karpathy"
  c.data.train_splits = ("train", "restval")
  c.data.original_delimiters = "-.,()?"  # with data.tokenizer="original": the authors' MSCOCO split
  c.model.text.max_len = 32
  c.model.dropout = 0.5
  # Epochs: Stage I ~80; Stage II 15, 5 at lr/10, 1 at lr/100.
  c.optim.schedule = ((80, 1.0),) if c.stage == 1 else ((15, 1.0), (5, 0.1), (1, 0.01))
  c.eval.coco_1k_folds = 5
  c.checkpoint_every = 5000
  c.eval.every_steps = 5000  # val split from memory; the final test uses the best by rsum
  return c
