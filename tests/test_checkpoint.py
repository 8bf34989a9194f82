"""Checkpoints: replicated arrays written whole or in Orbax's per-replica slices; which step a
reader uses (`resolve_step`)."""

import logging
import os
import types

import jax
import numpy as np
import pytest

from instance_loss_jax import sharding
from instance_loss_jax.workdir import checkpoint


def test_small_replicated_arrays_are_written_whole_and_large_ones_in_slices(tmp_path, caplog):
  mesh = sharding.make_mesh(jax.devices())
  assert mesh.size == 8
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rng = np.random.default_rng(0)
  # Shapes no other test uses: a jit(slice) compiled earlier in this process would not log.
  small = rng.normal(size=(56, 72)).astype(np.float32)  # 16 KB: under the slice threshold
  large = rng.normal(size=(16384, 137)).astype(np.float32)  # 1.07 MiB per slice of 8
  assert small.nbytes < checkpoint.MIN_REPLICA_SLICE_BYTES <= large.nbytes // 8
  params = {"small": jax.device_put(small, replicated), "large": jax.device_put(large, replicated)}
  state = types.SimpleNamespace(params=params, batch_stats={}, opt_state={},
                                step=jax.device_put(np.int32(3), replicated))
  mgr = checkpoint.manager(str(tmp_path))
  with caplog.at_level(logging.WARNING), jax.log_compiles(True):
    checkpoint.save(mgr, 3, state, dict(num_classes=1))
    mgr.wait_until_finished()
  slices = [r.getMessage() for r in caplog.records if "Compiling jit(slice)" in r.getMessage()]
  # Orbax slices only the large array, once per replica's offset (without the threshold: 16).
  assert len(slices) == 8 and all("float32[16384,137]" in s for s in slices), slices
  restored = checkpoint.restore_variables(checkpoint.manager(str(tmp_path), read_only=True), 3)
  np.testing.assert_array_equal(restored["params"]["small"], small)
  np.testing.assert_array_equal(restored["params"]["large"], large)


def test_resolve_step_is_the_given_the_newest_or_the_best_validated(tmp_path):
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = types.SimpleNamespace(params={"w": jax.device_put(np.ones(3, np.float32), one)},
                                batch_stats={}, opt_state={},
                                step=jax.device_put(np.int32(0), one))
  mgr = checkpoint.manager(str(tmp_path / "run"))
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in .*run/checkpoints"):
    checkpoint.resolve_step(mgr)
  checkpoint.save(mgr, 2, state, {})  # not validated: "best" falls back to the newest
  mgr.wait_until_finished()
  assert checkpoint.resolve_step(mgr, prefer="best") == checkpoint.resolve_step(mgr) == 2
  for step, rsum in ((4, 30.0), (6, 10.0)):
    checkpoint.save(mgr, step, state, {}, val_metrics={"rsum": rsum})
    mgr.wait_until_finished()
  assert checkpoint.resolve_step(mgr) == 6
  assert checkpoint.resolve_step(mgr, prefer="best") == 4
  assert checkpoint.resolve_step(mgr, 2, prefer="best") == 2  # a given step wins
  with pytest.raises(checkpoint.CheckpointError, match=r"no step 5 .*\(have \[2, 4, 6\]\)"):
    checkpoint.resolve_step(mgr, 5)
  with pytest.raises(ValueError, match="prefer='oldest'"):
    checkpoint.resolve_step(mgr, prefer="oldest")


@pytest.mark.parametrize("ocdbt", [True, False])
def test_either_layout_is_read_back_by_the_default_reader(tmp_path, ocdbt):
  # checkpoint_ocdbt=False (a file set per array) is for stores that lack what OCDBT needs; the
  # readers (restore_variables, init_from, the evaluation) open both without being told which.
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  w = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
  state = types.SimpleNamespace(params={"w": jax.device_put(w, one)}, batch_stats={},
                                opt_state={}, step=jax.device_put(np.int32(1), one))
  mgr = checkpoint.manager(str(tmp_path), ocdbt=ocdbt)
  checkpoint.save(mgr, 1, state, dict(num_classes=5))
  mgr.wait_until_finished()
  saved = tmp_path / "checkpoints" / "1" / "state"
  assert (saved / "manifest.ocdbt").exists() == ocdbt
  assert (saved / "params.w" / ".zarray").exists() == (not ocdbt)
  restored = checkpoint.restore_variables(checkpoint.reader(str(tmp_path)), 1)
  np.testing.assert_array_equal(restored["params"]["w"], w)


def test_readers_read_only_the_variables_they_use(tmp_path):
  # The data of the optimiser state and of W_share is deleted from the checkpoint on disk (the
  # file-set layout keeps each array in its own directory: .zarray, its shape and dtype, and
  # the chunks): a reader that loaded everything and then dropped them would fail;
  # restore_variables reads params' and batch_stats' data only, W_share's only when asked for.
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  put = lambda x: jax.device_put(np.asarray(x), one)
  rng = np.random.default_rng(0)
  head, w_share = (rng.normal(size=s).astype(np.float32) for s in ((6, 4), (4, 8)))
  state = types.SimpleNamespace(
      params={"text_head": {"kernel": put(head)}, "w_share": {"kernel": put(w_share)}},
      batch_stats={"text_head": {"mean": put(np.arange(4, dtype=np.float32))}},
      opt_state={"trace": {"text_head": {"kernel": put(np.ones((6, 4), np.float32))}}},
      step=put(np.int32(2)))
  mgr = checkpoint.manager(str(tmp_path), ocdbt=False)
  checkpoint.save(mgr, 2, state, dict(num_classes=5))  # 8 columns: 3 of them padding
  mgr.wait_until_finished()
  saved = tmp_path / "checkpoints" / "2" / "state"
  with_w_share = checkpoint.restore_variables(checkpoint.reader(str(tmp_path)), 2)
  np.testing.assert_array_equal(with_w_share["params"]["w_share"]["kernel"], w_share[:, :5])
  unread = [saved / n for n in os.listdir(saved) if n.startswith(("opt_state.", "params.w_share."))]
  assert len(unread) == 2
  for array in unread:
    chunks = [f for f in os.listdir(array) if f != ".zarray"]
    assert chunks
    for chunk in chunks:
      os.remove(array / chunk)
  without = checkpoint.restore_variables(checkpoint.reader(str(tmp_path)), 2, w_share=False)
  assert sorted(without["params"]) == ["text_head"] and sorted(without) == ["batch_stats",
                                                                            "params"]
  np.testing.assert_array_equal(without["params"]["text_head"]["kernel"], head)
  np.testing.assert_array_equal(without["batch_stats"]["text_head"]["mean"], np.arange(4))


def test_a_run_recorded_before_the_text_and_head_epsilons_reads_as_it_was_trained(tmp_path):
  """Runs recorded before model.text.bn_epsilon / model.head_bn_epsilon were trained with 1e-5;
  today's default is the authors' 1e-3. A recorded value is kept."""
  import json
  from helpers import tiny_config
  from instance_loss_jax.config import with_recorded_defaults
  recorded = json.loads(tiny_config().to_json())
  del recorded["model"]["text"]["bn_epsilon"], recorded["model"]["head_bn_epsilon"]
  (tmp_path / "config.json").write_text(json.dumps(recorded))
  config = checkpoint.read_config(str(tmp_path))
  assert (config.model.text.bn_epsilon, config.model.head_bn_epsilon) == (1e-5, 1e-5)
  assert config.model.image.bn_epsilon == 1e-5 and tiny_config().model.head_bn_epsilon == 1e-3
  meta = with_recorded_defaults({"model": {"text": {"bn_epsilon": 2e-3}}})
  assert meta == {"model": {"text": {"bn_epsilon": 2e-3}, "head_bn_epsilon": 1e-5}}
