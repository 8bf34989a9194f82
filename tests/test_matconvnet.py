"""MatConvNet DagNN ResNets (imagenet-resnet-*-dag.mat): files written here in `saveobj`'s layout
(MATLAB v5 through scipy.io, v7.3 through h5py in MATLAB's HDF5 conventions), ported, and
compared with a numpy executor of the DagNN graph, layer by layer, as MatConvNet computes it
(vl_nnconv, vl_nnbnorm with given moments, vl_nnpool with [top bottom left right] padding)."""

import os

import numpy as np
import pytest

from instance_loss_jax import backbone, matconvnet
from instance_loss_jax.cli import port_resnet
from instance_loss_jax.config import STAGE_SIZES

from test_port import assert_features_close, our_features
from test_training import data_dir  # noqa: F401  (a fixture)

IMAGE = 64


# ---------------------------------------------------------------- a DagNN ResNet, as Caffe's


class DagBuilder:
  """Adds layers and their random parameters to a DagNN's `saveobj` lists (`layers`,
  `params`), as dagnn.DagNN.addLayer would; each adder returns the layer's output variable."""

  def __init__(self, rng, layers=None, params=None):
    self.rng = rng
    self.layers = [] if layers is None else layers
    self.params = [] if params is None else params

  def param(self, name, value):
    self.params.append(dict(name=name, value=np.asarray(value, np.float32), learningRate=1.0,
                            weightDecay=1.0))
    return name

  def layer(self, name, kind, inputs, outputs, names, block):
    self.layers.append(dict(name=name, type=f"dagnn.{kind}", inputs=list(inputs),
                            outputs=list(outputs), params=list(names), block=block))
    return outputs[0]

  def conv(self, name, x, size, stride=1, pad=(0, 0, 0, 0), bias=False, names=None):
    """A conv of `size` [H W Cin Cout] (He-initialised; `names`: existing, shared params)."""
    w = self.rng.normal(0, np.sqrt(2 / np.prod(size[:3])), size)
    names = names or [self.param(f"{name}_filter", w)] + (
        [self.param(f"{name}_bias", self.rng.normal(0, 0.1, size[3]))] if bias else [])
    return self.layer(name, "Conv", [x], [name], names, dict(
        size=np.array(size, np.float64), hasBias=bias, pad=np.array(pad, np.float64),
        stride=np.array([stride, stride], np.float64), dilate=np.array([1.0, 1.0]), opts=[]))

  def bn(self, name, x, c, mult=(0.5, 1.5), sigma=(0.05, 1.5), epsilon=1e-5):
    # [mu, sigma]; sigmas down to 0.05, where an epsilon added twice (1e-5 / 0.05^2 = 0.4%) shows
    moments = np.stack([self.rng.normal(0, 0.2, c), self.rng.uniform(*sigma, c)], 1)
    return self.layer(name, "BatchNorm", [x], [name],
                      [self.param(f"{name}_mult", self.rng.uniform(*mult, c)),
                       self.param(f"{name}_bias", self.rng.normal(0, 0.1, c)),
                       self.param(f"{name}_moments", moments)],
                      dict(numChannels=float(c), epsilon=epsilon, opts=["NoCuDNN"]))

  def relu(self, name, x):
    return self.layer(name, "ReLU", [x], [name], [], dict(useShortCircuit=True, leak=0.0,
                                                          opts=[]))

  def dropout(self, name, x, rate=0.75):
    return self.layer(name, "DropOut", [x], [name], [], dict(rate=rate, frozen=False))


def dagnn_resnet(depth, width, rng, pool5=2):
  """The `saveobj` struct of a Caffe-style ResNet (MatConvNet's layer and parameter names:
  conv1, bn_conv1, pool1 with pad [0 1 0 1], res2a_branch1, bn2a_branch2a, res2a, ...,
  pool5, fc1000, prob), random weights; only conv1 and fc1000 have biases."""
  net = DagBuilder(rng)
  layer, conv, bn, relu = net.layer, net.conv, net.bn, net.relu

  x = relu("conv1_relu", bn("bn_conv1", conv("conv1", "data", [7, 7, 3, width], 2, [3, 3, 3, 3],
                                                 bias=True), width))
  layer("pool1", "Pooling", [x], ["pool1"], [], dict(
      method="max", poolSize=np.array([3.0, 3.0]), pad=np.array([0.0, 1.0, 0.0, 1.0]),
      stride=np.array([2.0, 2.0]), opts=["cuDNN"]))
  x, cin = "pool1", width
  for s, blocks in enumerate(STAGE_SIZES[depth]):
    mid = width * 2**s
    for b in range(blocks):
      # Caffe's names: res2a, res2b, ...; in ResNet-101/152's long stages res4a, res4b1, res4b2...
      tag = f"{s + 2}{'abcdef'[b]}" if blocks <= 6 or b == 0 else f"{s + 2}b{b}"
      stride = 2 if s > 0 and b == 0 else 1
      shortcut = x
      if b == 0:
        shortcut = bn(f"bn{tag}_branch1", conv(f"res{tag}_branch1", x, [1, 1, cin, 4 * mid],
                                                stride), 4 * mid)
      y = relu(f"res{tag}_branch2a_relu", bn(f"bn{tag}_branch2a", conv(
          f"res{tag}_branch2a", x, [1, 1, cin, mid], stride), mid))
      y = relu(f"res{tag}_branch2b_relu", bn(f"bn{tag}_branch2b", conv(
          f"res{tag}_branch2b", y, [3, 3, mid, mid], 1, [1, 1, 1, 1]), mid))
      # A residual branch's last BN scaled down (as trained ResNets have it), so that 33 blocks
      # of random weights keep the activations' scale.
      y = bn(f"bn{tag}_branch2c", conv(f"res{tag}_branch2c", y, [1, 1, mid, 4 * mid]), 4 * mid, mult=(0.05, 0.3))
      layer(f"res{tag}", "Sum", [shortcut, y], [f"res{tag}"], [], {})
      x, cin = relu(f"res{tag}_relu", f"res{tag}"), 4 * mid
  layer("pool5", "Pooling", [x], ["pool5"], [], dict(
      method="avg", poolSize=np.array([float(pool5)] * 2), pad=np.zeros(4),
      stride=np.array([1.0, 1.0]), opts=["cuDNN"]))
  conv("fc1000", "pool5", [1, 1, cin, 10], bias=True)
  layer("prob", "SoftMax", ["fc1000"], ["prob"], [], {})
  average = np.broadcast_to(np.array([123.68, 116.779, 103.939]), (4, 4, 3)).copy()
  average[0, 0] += 4.0  # a per-channel mean over a non-constant average image
  meta = dict(normalization=dict(averageImage=average, imageSize=np.array([224., 224, 3, 1]),
                                 interpolation="bilinear", keepAspect=True, border=[32., 32]),
              classes=dict(name=["a", "b"], description=["A", "B"]))
  vars_ = [dict(name=n, precious=False) for n in
           ["data"] + [o for entry in net.layers for o in entry["outputs"]]]
  return dict(vars=vars_, params=net.params, layers=net.layers, meta=meta)


# ---------------------------------------------------------------- MatConvNet's arithmetic


def run_dagnn(net, images, until, input_name="data"):
  """Executes the DagNN on NHWC `images` given as input `input_name`, in numpy, each layer as
  MatConvNet's vl_nn* function computes it at test time (DropOut passes through); returns
  variable `until`. Layers whose inputs never come (another input's branch, losses) wait."""
  values = {input_name: images.astype(np.float64)}
  params = {p["name"]: np.asarray(p["value"], np.float64) for p in net["params"]}
  pending = list(net["layers"])
  while until not in values:
    ready = [e for e in pending if all(v in values for v in e["inputs"])]
    assert ready, "the graph is stuck"
    for e in ready:
      pending.remove(e)
      x, block = [values[v] for v in e["inputs"]], e["block"]
      kind = e["type"].split(".")[1]
      if kind == "Conv":
        w = params[e["params"][0]]
        b = params[e["params"][1]] if block["hasBias"] else 0.0
        y = _conv(x[0], w, block["stride"].astype(int), block["pad"].astype(int)) + b
      elif kind == "BatchNorm":
        mult, bias, moments = (params[n] for n in e["params"])
        y = mult / moments[:, 1] * (x[0] - moments[:, 0]) + bias  # no epsilon: given moments
      elif kind == "ReLU":
        y = np.maximum(x[0], 0)
      elif kind == "DropOut":
        y = x[0]
      elif kind == "Sum":
        y = sum(x)
      elif kind == "Pooling":
        y = _pool(x[0], block["poolSize"].astype(int), block["stride"].astype(int),
                  block["pad"].astype(int), block["method"])
      elif kind == "SoftMax":
        z = np.exp(x[0] - x[0].max(-1, keepdims=True))
        y = z / z.sum(-1, keepdims=True)
      else:
        raise AssertionError(kind)
      values[e["outputs"][0]] = y
  return values[until]


def _windows(x, size, stride, pad, fill):
  top, bottom, left, right = pad
  x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=fill)
  h = (x.shape[1] - size[0]) // stride[0] + 1
  w = (x.shape[2] - size[1]) // stride[1] + 1
  for i in range(size[0]):
    for j in range(size[1]):
      yield i, j, x[:, i:i + stride[0] * (h - 1) + 1:stride[0], j:j + stride[1] * (w - 1) + 1:
                    stride[1]]


def _conv(x, w, stride, pad):
  return sum(patch @ w[i, j] for i, j, patch in _windows(x, w.shape[:2], stride, pad, 0.0))


def _pool(x, size, stride, pad, method):
  patches = [p for _, _, p in _windows(x, size, stride, pad, -np.inf if method == "max" else 0)]
  return np.max(patches, 0) if method == "max" else np.mean(patches, 0)


# ---------------------------------------------------------------- the two MATLAB formats


def save_v5(path, net):
  from scipy import io as scipy_io

  def convert(value):
    if isinstance(value, dict):
      return {k: convert(v) for k, v in value.items()}
    if isinstance(value, list) and value and isinstance(value[0], dict):
      keys = list(value[0])
      out = np.empty((1, len(value)), dtype=[(k, object) for k in keys])
      for i, item in enumerate(value):
        for k in keys:
          out[0, i][k] = convert(item[k])
      return out
    if isinstance(value, list):
      out = np.empty((1, len(value)), dtype=object)
      for i, item in enumerate(value):
        out[0, i] = convert(item)
      return out
    return value

  scipy_io.savemat(path, {k: convert(v) for k, v in net.items()}, format="5",
                   long_field_names=True)


def save_v73(path, net):
  """MATLAB's v7.3 layout: an HDF5 file after a 512-byte header; structs are groups, struct
  arrays groups of reference arrays, cells reference arrays into #refs#, dimensions reversed."""
  import h5py
  counter = [0]

  def put(parent, name, value, f):
    if isinstance(value, dict):
      group = parent.create_group(name)
      group.attrs["MATLAB_class"] = np.bytes_("struct")
      for k, v in value.items():
        put(group, k, v, f)
    elif isinstance(value, list) and value and isinstance(value[0], dict):
      group = parent.create_group(name)
      group.attrs["MATLAB_class"] = np.bytes_("struct")
      for k in value[0]:
        refs = [ref(item[k], f) for item in value]
        group.create_dataset(k, data=np.array(refs, dtype=h5py.ref_dtype).reshape(-1, 1))
    elif isinstance(value, list):
      if not value:
        d = parent.create_dataset(name, data=np.array([0, 0], np.uint64))
        d.attrs["MATLAB_class"], d.attrs["MATLAB_empty"] = np.bytes_("cell"), 1
        return
      refs = [ref(item, f) for item in value]
      d = parent.create_dataset(name, data=np.array(refs, dtype=h5py.ref_dtype).reshape(-1, 1))
      d.attrs["MATLAB_class"] = np.bytes_("cell")
    elif isinstance(value, str):
      d = parent.create_dataset(name, data=np.array([ord(c) for c in value],
                                                    np.uint16).reshape(-1, 1))
      d.attrs["MATLAB_class"], d.attrs["MATLAB_int_decode"] = np.bytes_("char"), 2
    elif isinstance(value, (bool, np.bool_)):
      d = parent.create_dataset(name, data=np.array([[int(value)]], np.uint8))
      d.attrs["MATLAB_class"] = np.bytes_("logical")
    else:
      array = np.asarray(value)
      array = array.reshape(1, 1) if array.ndim == 0 else (
          array.reshape(1, -1) if array.ndim == 1 else array)
      d = parent.create_dataset(name, data=array.T)  # MATLAB is column-major
      d.attrs["MATLAB_class"] = np.bytes_("single" if array.dtype == np.float32 else "double")

  def ref(value, f):
    counter[0] += 1
    name = f"r{counter[0]}"
    put(f["#refs#"], name, value, f)
    return f["#refs#"][name].ref

  with h5py.File(path, "w", userblock_size=512) as f:
    f.create_group("#refs#")
    for k, v in net.items():
      put(f, k, v, f)
  with open(path, "r+b") as f:
    f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .")


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("save", [save_v5, save_v73], ids=["v5", "v7.3"])
def test_ported_dagnn_resnet_gives_matconvnets_pool5(save, tmp_path):
  rng = np.random.default_rng(0)
  net = dagnn_resnet(26, 8, rng)
  path = str(tmp_path / "imagenet-resnet-26-dag.mat")
  save(path, net)
  summary = port_resnet.port(path, str(tmp_path / "backbone"))
  assert summary["depth"] == 26 and summary["format"] == "matconvnet-dagnn"
  assert summary["unused"] == ["fc1000_bias", "fc1000_filter"]
  origin = backbone.read_origin(str(tmp_path / "backbone"))
  assert origin["stem_pool_pad"] == [0, 1, 0, 1] and origin["stride_variant"] == "v1"
  assert origin["width"] == 8 and origin["bn_epsilon"] == 1e-5
  mean = np.asarray(net["meta"]["normalization"]["averageImage"]).reshape(-1, 3).mean(0)
  np.testing.assert_allclose(origin["input"]["mean_rgb"], mean)
  assert origin["input"]["bgr"] is False and origin["input"]["std_rgb"] == [1.0, 1.0, 1.0]
  images = rng.normal(0, 50, (2, IMAGE, IMAGE, 3)).astype(np.float32)
  reference = run_dagnn(net, images, "pool5").reshape(2, -1)
  assert_features_close(our_features(str(tmp_path / "backbone"), images), reference)


def test_resnet101_names_and_depth(tmp_path):
  # ResNet-101's stage 4 is res4a, res4b1 ... res4b22: the graph, not the names, says the depth.
  rng = np.random.default_rng(5)
  net = dagnn_resnet(101, 2, rng)
  assert "res4b22" in {entry["name"] for entry in net["layers"]}
  save_v5(str(tmp_path / "r101.mat"), net)
  with pytest.raises(backbone.BackboneError, match="holds a ResNet-101, --depth=50"):
    port_resnet.port(str(tmp_path / "r101.mat"), str(tmp_path / "a"), depth=50)
  assert port_resnet.port(str(tmp_path / "r101.mat"), str(tmp_path / "b"))["depth"] == 101
  images = rng.normal(0, 50, (1, IMAGE, IMAGE, 3)).astype(np.float32)
  assert_features_close(our_features(str(tmp_path / "b"), images),
                        run_dagnn(net, images, "pool5").reshape(1, -1))


def test_both_formats_read_the_same(tmp_path):
  net = dagnn_resnet(14, 4, np.random.default_rng(1))
  save_v5(str(tmp_path / "a.mat"), net)
  save_v73(str(tmp_path / "b.mat"), net)
  a, b = (matconvnet.read_dagnn(str(tmp_path / n)) for n in ("a.mat", "b.mat"))
  assert [(l.name, l.type, l.inputs, l.outputs, l.params) for l in a.layers] == [
      (l.name, l.type, l.inputs, l.outputs, l.params) for l in b.layers]
  assert a.layers[0].type == "Conv" and a.layers[0].inputs == ("data",)
  assert sorted(a.params) == sorted(b.params)
  for name in a.params:
    np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)


def test_what_is_not_a_dagnn_resnet_is_named(tmp_path):
  from scipy import io as scipy_io
  rng = np.random.default_rng(2)
  simple = str(tmp_path / "simple.mat")
  scipy_io.savemat(simple, {"layers": np.array([[{"type": "conv", "name": "c"}]], dtype=object)})
  with pytest.raises(backbone.BackboneError, match="a SimpleNN network"):
    port_resnet.port(simple, str(tmp_path / "out"))
  net = dagnn_resnet(14, 4, rng)
  net["params"] = [p for p in net["params"] if p["name"] != "bn3a_branch2b_moments"]
  save_v5(str(tmp_path / "missing.mat"), net)
  with pytest.raises(backbone.BackboneError, match=r"layer bn3a_branch2b \(BatchNorm\) lacks its "
                     r"parameter 3 \(bn3a_branch2b_moments\)"):
    port_resnet.port(str(tmp_path / "missing.mat"), str(tmp_path / "out"))
  net = dagnn_resnet(14, 4, rng)
  for entry in net["layers"]:
    if entry["name"] == "res3a_branch2a_relu":
      entry["type"] = "dagnn.LRN"
  save_v73(str(tmp_path / "lrn.mat"), net)
  with pytest.raises(backbone.BackboneError, match=r"expected one ReLU layer after "
                     r"res3a_branch2a, found \['res3a_branch2a_relu \(LRN\)'\]|"
                     r"expected one ReLU layer after bn3a_branch2a"):
    port_resnet.port(str(tmp_path / "lrn.mat"), str(tmp_path / "out"))
  (tmp_path / "garbage.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\0" * 200)
  with pytest.raises(backbone.BackboneError, match="garbage.mat: not a readable MATLAB file"):
    port_resnet.port(str(tmp_path / "garbage.mat"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".backbone-")]


@pytest.mark.slow  # a Stage I run
def test_stage1_starts_from_a_ported_dagnn(data_dir, tmp_path):
  import jax
  from instance_loss_jax import trainer
  from instance_loss_jax.workdir import checkpoint
  from test_training import small_config
  net = dagnn_resnet(14, 4, np.random.default_rng(3))
  save_v73(str(tmp_path / "net.mat"), net)
  path = str(tmp_path / "backbone")
  port_resnet.port(str(tmp_path / "net.mat"), path)
  _, ported = backbone.load_backbone(path)
  # The stem must be the file's: a run that would pool with torchvision's padding is refused.
  with pytest.raises(backbone.BackboneError, match=r"model.image.stem_pool_pad=\[1, 1, 1, 1\] "
                     r"but the backbone has \[0, 1, 0, 1\]"):
    trainer.train_and_evaluate(small_config("stage1", data_dir, backbone_init=path),
                               str(tmp_path / "refused"))
  workdir = str(tmp_path / "run")
  results = trainer.train_and_evaluate(small_config(
      "stage1", data_dir, backbone_init=path, **{
          "model.image.stem_pool_pad": (0, 1, 0, 1), "optim.schedule": ((2, 1.0),)}), workdir)
  assert np.isfinite(results["metrics"]["rsum"])
  mgr = checkpoint.manager(workdir, read_only=True)
  got = checkpoint.restore_variables(mgr, mgr.latest_step())
  for (p, x), y in zip(jax.tree_util.tree_leaves_with_path(ported["params"]),
                       jax.tree_util.tree_leaves(got["params"]["backbone"])):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(p))  # frozen in Stage I
  meta = checkpoint.read_meta(mgr, mgr.latest_step())
  assert meta["input"] == backbone.read_origin(path)["input"]  # meta.normalization's mean
