"""Porting ImageNet ResNets: Keras (both HDF5 layouts) and torchvision, against each framework."""

import os

import jax
import numpy as np
import pytest

from helpers import requires_torch
from instance_loss_jax import backbone
from instance_loss_jax.cli import port_resnet

IMAGE = 64  # small images keep the full-depth ResNet-50 cheap; every layer is still used


def assert_features_close(ours, reference):
  # float32 through 50 layers: agreement to ~1e-4 of the features' scale.
  scale = np.abs(reference).max()
  np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * scale)


def our_features(path, images):
  module, variables = backbone.load_backbone(path)
  return np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, images))


@pytest.fixture(scope="module")
def keras_model():
  os.environ.setdefault("KERAS_BACKEND", "tensorflow")
  import keras
  model = keras.applications.ResNet50(weights=None, include_top=False, pooling="avg",
                                      input_shape=(IMAGE, IMAGE, 3))
  rng = np.random.default_rng(0)
  for layer in model.layers:
    new = []
    for w in layer.weights:
      name = w.path.split("/")[-1]
      if name == "kernel":
        fan_in = np.prod(w.shape[:-1])
        value = rng.normal(size=w.shape) * np.sqrt(2.0 / fan_in)
      elif name in ("gamma", "moving_variance"):
        value = rng.uniform(0.5, 1.5, w.shape)
      else:  # conv bias, beta, moving_mean: nonzero so that folding the bias matters
        value = rng.normal(size=w.shape) * 0.1
      new.append(value.astype(np.float32))
    if new:
      layer.set_weights(new)
  return model


@pytest.mark.parametrize("layout", ["legacy", "keras3"])
def test_keras_resnet50_features_match_keras(keras_model, layout, tmp_path):
  source = str(tmp_path / ("resnet50_notop.h5" if layout == "legacy" else "r50.weights.h5"))
  if layout == "legacy":
    import h5py
    from keras.src.legacy.saving import legacy_h5_format
    with h5py.File(source, "w") as f:
      legacy_h5_format.save_weights_to_hdf5_group(f, keras_model)
  else:
    keras_model.save_weights(source)
  summary = port_resnet.port(source, str(tmp_path / "out"))
  assert summary["depth"] == 50 and summary["tensors_written"] == 53 * 5
  origin = backbone.read_origin(str(tmp_path / "out"))
  assert origin["stride_variant"] == "v1" and origin["input"]["bgr"] is True
  images = np.random.default_rng(1).normal(size=(3, IMAGE, IMAGE, 3)).astype(np.float32) * 50
  reference = np.asarray(keras_model(images, training=False))
  assert_features_close(our_features(str(tmp_path / "out"), images), reference)


def torchvision_state(depth, rng):
  """A state dict with torchvision's names and shapes (written out here, not by our porter)."""
  state = {}

  def conv_bn(conv, bn, cin, cout, k):
    state[f"{conv}.weight"] = rng.normal(size=(cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))
    state[f"{bn}.weight"] = rng.uniform(0.5, 1.5, cout)
    state[f"{bn}.bias"] = rng.normal(size=cout) * 0.1
    state[f"{bn}.running_mean"] = rng.normal(size=cout) * 0.1
    state[f"{bn}.running_var"] = rng.uniform(0.5, 1.5, cout)
    state[f"{bn}.num_batches_tracked"] = np.array(7)

  conv_bn("conv1", "bn1", 3, 64, 7)
  cin = 64
  for s, blocks in enumerate({50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]):
    width = 64 * 2**s
    for b in range(blocks):
      pre = f"layer{s + 1}.{b}"
      if b == 0:
        conv_bn(f"{pre}.downsample.0", f"{pre}.downsample.1", cin, 4 * width, 1)
      conv_bn(f"{pre}.conv1", f"{pre}.bn1", cin, width, 1)
      conv_bn(f"{pre}.conv2", f"{pre}.bn2", width, width, 3)
      conv_bn(f"{pre}.conv3", f"{pre}.bn3", width, 4 * width, 1)
      cin = 4 * width
  state["fc.weight"] = rng.normal(size=(1000, 2048)) * 0.01
  state["fc.bias"] = np.zeros(1000)
  return {k: v.astype(np.int64 if k.endswith("tracked") else np.float32) for k, v in state.items()}


def torch_reference(state, images_nhwc, depth):
  """ResNet v1.5 forward with torch.nn.functional (stride on the 3x3 conv)."""
  import torch
  import torch.nn.functional as F
  t = {k: torch.from_numpy(v) for k, v in state.items()}

  def bn(x, name):
    return F.batch_norm(x, t[f"{name}.running_mean"], t[f"{name}.running_var"],
                        t[f"{name}.weight"], t[f"{name}.bias"], training=False, eps=1e-5)

  with torch.no_grad():
    x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)
    x = F.relu(bn(F.conv2d(x, t["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    for s, blocks in enumerate({50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]):
      for b in range(blocks):
        pre = f"layer{s + 1}.{b}"
        stride = 2 if s > 0 and b == 0 else 1
        y = F.relu(bn(F.conv2d(x, t[f"{pre}.conv1.weight"]), f"{pre}.bn1"))
        y = F.relu(bn(F.conv2d(y, t[f"{pre}.conv2.weight"], stride=stride, padding=1),
                      f"{pre}.bn2"))
        y = bn(F.conv2d(y, t[f"{pre}.conv3.weight"]), f"{pre}.bn3")
        if b == 0:
          x = bn(F.conv2d(x, t[f"{pre}.downsample.0.weight"], stride=stride),
                 f"{pre}.downsample.1")
        x = F.relu(x + y)
    return F.adaptive_avg_pool2d(x, 1).flatten(1).numpy()


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
@requires_torch  # the reference forward is PyTorch's
def test_torchvision_resnet50_features_match_torch(fmt, tmp_path):
  state = torchvision_state(50, np.random.default_rng(2))
  source = str(tmp_path / f"resnet50.{fmt}")
  if fmt == "pth":
    import torch
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, source)
  else:
    from safetensors.numpy import save_file
    save_file(state, source)
  summary = port_resnet.port(source, str(tmp_path / "out"))
  assert summary["depth"] == 50 and summary["unused"] == ["fc.bias", "fc.weight"]
  assert backbone.read_origin(str(tmp_path / "out"))["stride_variant"] == "v1.5"
  images = np.random.default_rng(3).normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)
  assert_features_close(our_features(str(tmp_path / "out"), images),
                        torch_reference(state, images, 50))


def test_depth_is_detected_and_checked(tmp_path):
  from safetensors.numpy import save_file
  state = torchvision_state(101, np.random.default_rng(4))
  save_file(state, str(tmp_path / "r101.safetensors"))
  with pytest.raises(backbone.BackboneError, match="holds a ResNet-101, --depth=50"):
    port_resnet.port(str(tmp_path / "r101.safetensors"), str(tmp_path / "a"), depth=50)
  assert port_resnet.port(str(tmp_path / "r101.safetensors"), str(tmp_path / "b"))["depth"] == 101


def test_bad_sources_are_named_and_leave_nothing(tmp_path):
  from safetensors.numpy import save_file
  state = torchvision_state(50, np.random.default_rng(5))
  del state["layer3.2.bn2.running_var"]
  save_file(state, str(tmp_path / "missing.safetensors"))
  with pytest.raises(backbone.BackboneError, match=r"missing.safetensors: missing tensors .*"
                     r"layer3.2.bn2.running_var"):
    port_resnet.port(str(tmp_path / "missing.safetensors"), str(tmp_path / "out"))
  (tmp_path / "truncated.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 20)
  with pytest.raises(backbone.BackboneError, match="truncated.h5: not a readable HDF5 file"):
    port_resnet.port(str(tmp_path / "truncated.h5"), str(tmp_path / "out"))
  import h5py
  with h5py.File(tmp_path / "other.h5", "w") as f:
    f["dense/dense/kernel:0"] = np.zeros((3, 3))
  with pytest.raises(backbone.BackboneError, match=r"other.h5: missing tensors .*conv1_conv/kernel"):
    port_resnet.port(str(tmp_path / "other.h5"), str(tmp_path / "out"))
  (tmp_path / "x.safetensors").write_bytes(b"garbage")
  with pytest.raises(backbone.BackboneError, match="x.safetensors: not a readable safetensors"):
    port_resnet.port(str(tmp_path / "x.safetensors"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".backbone-")]
