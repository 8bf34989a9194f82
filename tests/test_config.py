"""Config validation: every problem named by its dotted path, before anything is built."""

import pytest

from helpers import tiny_config
from instance_loss_jax import config as config_lib
from instance_loss_jax.config import (ConfigError, base_config, run_config, unknown_keys,
                                      validate_config)


def test_base_and_tiny_configs_are_valid():
  validate_config(base_config())
  validate_config(tiny_config())


def test_unknown_keys_are_listed():
  config = tiny_config()
  config.optim.momentun = 0.9
  config.model.text.depth = 3
  assert unknown_keys(config) == ["model.text.depth", "optim.momentun"]
  with pytest.raises(ConfigError, match="unknown config keys: model.text.depth, optim.momentun"):
    validate_config(config)


@pytest.mark.parametrize("field,value,message", [
    ("loss.lambdas", (1.0, 1.0), "need 3 weights"),
    ("loss.lambdas", (0.0, 0.0, 0.0), "not all zero"),
    ("loss.lambdas", (1.0, -1.0, 1.0), ">= 0"),
    ("loss.lambdas", (float("nan"), 1.0, 1.0), "finite"),
    ("loss.negatives", "semi-hard", "loss.negatives='semi-hard'"),
    ("loss.ranking", "clip", "loss.ranking='clip': one of"),
    ("data.pseudo_classes", 3, "data.pseudo_classes=3 clusters .* set backbone_init"),
    ("model.text.pooling", "sum", "model.text.pooling='sum'"),
    ("model.image.depth", 34, "model.image.depth=34"),
    ("model.image.stride_variant", "v2", "stride_variant='v2'"),
    ("model.dropout", 1.0, "model.dropout=1.0"),
    ("model.text.strides", (1, 2, 2), "same length"),
    ("backbone_bn", "train", "freeze_backbone=True with backbone_bn='train'"),
    ("stage", 3, "stage=3"),
    ("compute_dtype", "float16", "compute_dtype='float16'"),
])
def test_bad_values_are_named(field, value, message):
  config = tiny_config(**{field: value})
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    validate_config(config)


def test_unfrozen_backbone_needs_trained_statistics():
  config = tiny_config(**{"freeze_backbone": False})
  with pytest.raises(ConfigError, match="freeze_backbone=False needs backbone_bn='train'"):
    validate_config(config)


@pytest.mark.slow
def test_binary_names_an_unknown_override_without_a_traceback(tmp_path):
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, "-m", "instance_loss_jax.cli.train", "--config=configs/demo.py:stage1",
       f"--workdir={tmp_path}", "--config.optim.momentun=0.9"],
      cwd=root, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "error: unknown config field in the overrides: --config.optim.momentun (did you mean "
      "optim.momentum?)")
  assert "Traceback" not in result.stderr
  assert not os.listdir(tmp_path)  # nothing written


def test_mined_negatives_only_for_the_hinge():
  # The candidate pools are built (pipeline, batch check, step) only where the hinge ranks
  # against them: a contrastive ranking term takes the global batch and nothing else.
  from instance_loss_jax.config import uses_mined_negatives  # pylint: disable=g-import-not-at-top
  config = tiny_config(**{"loss.lambdas": (1.0, 1.0, 1.0), "loss.negatives": "mined"})
  assert uses_mined_negatives(config)
  config.loss.ranking = "infonce"
  assert not uses_mined_negatives(config)


def test_the_compile_cache_flag_names_one_directory():
  from instance_loss_jax.cli.runner import compile_cache_dir  # pylint: disable=g-import-not-at-top
  run = "gs://b/run/compile_cache"
  assert compile_cache_dir("off", run, {"JAX_COMPILATION_CACHE_DIR": "/x"}) is None
  assert compile_cache_dir("/mine", run, {"JAX_COMPILATION_CACHE_DIR": "/x"}) == "/mine"
  assert compile_cache_dir("auto", run, {"JAX_COMPILATION_CACHE_DIR": "/x"}) == "/x"
  assert compile_cache_dir("auto", run, {}) == run  # training: beside its checkpoints
  assert compile_cache_dir("auto", None, {"XDG_CACHE_HOME": "/c"}) == (
      "/c/instance_loss_jax/compile_cache")  # the readers: the user's


def test_the_run_config_names_local_paths_absolutely(tmp_path, monkeypatch):
  # A run trained with --config.data.json=data/dataset.json records the path from its folder:
  # the evaluation, export or Stage II started from another folder reads the same files.
  monkeypatch.chdir(tmp_path)
  c = base_config()
  c.data.json, c.data.image_root, c.init_from = "data/dataset.json", "images", "../stage1"
  c.data.word2vec = "gs://bucket/word2vec.bin"
  run = run_config(c, vocab_size=10, num_classes=5)
  assert run.data.json == str(tmp_path / "data" / "dataset.json")
  assert run.data.image_root == str(tmp_path / "images")
  assert run.init_from == str(tmp_path.parent / "stage1")
  assert run.data.word2vec == "gs://bucket/word2vec.bin"  # an object store's URI as it is
  assert run.tensorboard_dir == "" and run.backbone_init == ""  # unset stays unset
  assert c.data.json == "data/dataset.json"  # the caller's config is left as it was
  for key in config_lib.PATH_FIELDS:  # each names a field of the schema
    node = base_config()
    for part in key.split("."):
      node = node[part]
    assert isinstance(node, str), key
