"""Checkpoints move between meshes: save on 4 devices, resume on 8 and on 2; Stage I on 4
devices initialises Stage II on 8; the evaluation restores onto 1 device."""

import jax
import numpy as np
import pytest

import helpers
from helpers import host_train_state, random_batch, tiny_config
from instance_loss_jax import resume, sharding, training as ts, trainer
from instance_loss_jax.workdir import checkpoint
from instance_loss_jax.evaluation import evaluator
from instance_loss_jax import config as config_lib
from test_train_step import STAGE2, assert_close_to_scale
from test_training import data_dir, small_config  # noqa: F401  (a fixture)

STEPS_PER_EPOCH = 10
pytestmark = pytest.mark.slow  # several meshes, each its own compile


def _steps(config, mesh, state, batches):
  step = ts.make_train_step(config, STEPS_PER_EPOCH, mesh)
  for batch in batches:
    state, _ = step(state, batch)
  return state


@pytest.fixture(scope="module")
def saved_on_four(tmp_path_factory):
  """2 steps on 4 devices, saved; and the same run's next step, uninterrupted."""
  # 13 classes: padded to 16 on 4 and 8 devices, to 14 on 2, so the resume pads or cuts.
  config = tiny_config(**STAGE2, **{"num_classes": 13, "model.dropout": 0.5})
  batches = [random_batch(config, seed=s) for s in range(3)]
  mesh4 = sharding.make_mesh(jax.local_devices()[:4])
  init = host_train_state(config, jax.random.key(0), STEPS_PER_EPOCH)
  state = _steps(config, mesh4, ts.place_state(init, config, mesh4), batches[:2])
  directory = str(tmp_path_factory.mktemp("four"))
  mgr = checkpoint.manager(directory)
  checkpoint.save(mgr, 2, state, dict(num_classes=config.num_classes))
  mgr.wait_until_finished()
  saved = ts.host_state(state, config)
  straight = ts.host_state(_steps(config, mesh4, state, batches[2:]), config)
  return config, batches, directory, saved, straight


def _change(new, old):
  return jax.tree_util.tree_map(lambda a, b: np.asarray(a) - np.asarray(b), new, old)


@pytest.mark.xdist_group("saved_on_four")
@pytest.mark.parametrize("resume_devices", [8, 2])
def test_save_on_four_devices_resume_on_another_count(saved_on_four, resume_devices):
  config, batches, directory, saved, straight = saved_on_four
  devices = jax.local_devices()
  mesh = sharding.make_mesh(devices[:resume_devices])
  template = ts.abstract_train_state(config, STEPS_PER_EPOCH, mesh)
  restored = checkpoint.restore_state(checkpoint.manager(directory, read_only=True), 2,
                                      template)
  assert restored.params["w_share"]["kernel"].shape[-1] == (16 if resume_devices == 8 else 14)
  assert restored.params["w_share"]["kernel"].sharding.mesh.size == resume_devices
  assert int(restored.step) == 2
  # Restored whole: bit for bit what was saved (W_share's padding aside).
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ts.host_state(restored, config)),
                          jax.tree_util.tree_leaves(saved)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), jax.tree_util.keystr(path)
  resumed = ts.host_state(_steps(config, mesh, restored, batches[2:]), config)
  # Another device count sums in another order: the step's change agrees to float tolerance
  # (of each tensor's change; one step, as test_train_step.py's device test says why).
  for name in ("params", "batch_stats"):
    assert_close_to_scale(_change(getattr(resumed, name), getattr(saved, name)),
                          _change(getattr(straight, name), getattr(saved, name)), 1e-3,
                          floor=1e-5)
  assert_close_to_scale(resumed.opt_state, straight.opt_state, 1e-3, floor=1e-5)
  # The stored W_share has the saving mesh's zero padding; readers see the true 13 classes.
  variables = checkpoint.restore_variables(checkpoint.manager(directory, read_only=True), 2)
  assert variables["params"]["w_share"]["kernel"].shape[-1] == 13


def test_stage1_on_four_devices_initialises_stage2_on_eight(data_dir, tmp_path):  # noqa: F811
  devices = jax.local_devices()
  workdir1 = str(tmp_path / "stage1")
  config1 = small_config("stage1", data_dir, **{"optim.schedule": ((1, 1.0),),
                                                "eval.at_end": False})
  trainer.train_and_evaluate(config1, workdir1, sharding.make_mesh(devices[:4]))
  mgr1 = checkpoint.manager(workdir1, read_only=True)
  stage1_vars = checkpoint.restore_variables(mgr1, mgr1.latest_step())
  num_classes = checkpoint.read_meta(mgr1, mgr1.latest_step())["num_classes"]
  assert stage1_vars["params"]["w_share"]["kernel"].shape[-1] == num_classes == 32

  # Stage II's starting state on 8 devices is Stage I's variables, bit for bit.
  config2 = small_config("stage2", data_dir, init_from=workdir1)
  vocab, _ = resume.prepare_vocab(config2, str(tmp_path / "s2"), [], need_table=False)
  config2 = config_lib.run_config(config2, vocab.size, num_classes)
  meta = checkpoint.run_meta(config2, vocab.fingerprint)
  mesh8 = sharding.make_mesh(devices[:8])
  mgr2 = checkpoint.manager(str(tmp_path / "s2"))
  state, start = resume.initial_state(config2, str(tmp_path / "s2"), mgr2,
                                       checkpoint.reader(workdir1), meta, None, 4.0, mesh8)
  assert start == 0
  assert state.params["w_share"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
      None, sharding.AXIS)
  got = ts.variables_of(ts.host_state(state, config2))
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(stage1_vars),
                          jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
  # ... at step 0 with a fresh optimiser state (SGD's momentum at zero), every leaf laid out as
  # a freshly initialised state's would be.
  template = ts.abstract_train_state(config2, 4.0, mesh8)
  assert int(state.step) == 0
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(checkpoint.state_tree(state)),
                          jax.tree_util.tree_leaves(checkpoint.state_tree(template))):
    assert (x.shape, x.dtype, x.sharding) == (y.shape, y.dtype, y.sharding), path
  assert all(not np.asarray(x).any() for x in jax.tree_util.tree_leaves(state.opt_state))

  # And the evaluation restores the 4-device checkpoint onto 1 device: its features are those
  # of the restored variables (compared above), so its figures are the checkpoint's.
  # The same figures as on the four devices that trained it.
  one = evaluator.evaluate(config1, workdir1, "test", write=False, devices=devices[:1])
  four = evaluator.evaluate(config1, workdir1, "test", write=False, devices=devices[:4])
  assert one["step"] == four["step"] == mgr1.latest_step()
  assert set(one["metrics"]) == set(four["metrics"]) and "rsum" in one["metrics"]
  for key, value in four["metrics"].items():
    # Recalls and ranks are counts, equal unless two similarities tie within float rounding;
    # S, a histogram overlap, may move a pair to the next bin.
    assert one["metrics"][key] == pytest.approx(value, abs=0.02 if key == "S" else 1e-6), key
