"""MatConvNet DagNN files (.mat, as `dagnn.DagNN.saveobj` writes them) read into plain Python.

A saved DagNN is a struct with `vars` (name, precious), `params` (name, value, learningRate,
weightDecay), `layers` (name, type such as 'dagnn.Conv', inputs, outputs, params: cells of
names; block: the layer's properties, e.g. Conv's size, pad [top bottom left right], stride,
hasBias) and `meta` (e.g. `normalization.averageImage`). MatConvNet's pretrained files store
these fields at the top level (`save(file, '-struct', 'net')`); a training snapshot
(`net-epoch-N.mat`) stores them in a variable `net`. Both MATLAB formats are read: v5/v7 with
scipy.io, v7.3 (HDF5) with h5py.

`read_dagnn(path) -> DagNN` is the reader; `resnet_variables(dag)` turns an ImageNet ResNet
(`imagenet-resnet-50/101/152-dag.mat`) into this project's backbone variables by walking its
graph, not by fixed layer names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from instance_loss_jax.config import STAGE_SIZES
from instance_loss_jax.errors import BackboneError

DAGNN_FIELDS = ("vars", "params", "layers")


@dataclasses.dataclass(frozen=True)
class Layer:
  name: str
  type: str  # the block's class without "dagnn.": Conv, BatchNorm, ReLU, Pooling, Sum, ...
  inputs: tuple[str, ...]
  outputs: tuple[str, ...]
  params: tuple[str, ...]
  block: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class DagNN:
  layers: tuple[Layer, ...]
  params: dict[str, np.ndarray]
  meta: dict[str, Any]
  source: str

  def producer(self) -> dict[str, Layer]:
    return {v: layer for layer in self.layers for v in layer.outputs}

  def consumers(self) -> dict[str, list[Layer]]:
    out: dict[str, list[Layer]] = {}
    for layer in self.layers:
      for v in layer.inputs:
        out.setdefault(v, []).append(layer)
    return out

  def param(self, layer: Layer, i: int) -> np.ndarray:
    if i >= len(layer.params) or layer.params[i] not in self.params:
      raise BackboneError(f"{self.source}: layer {layer.name} ({layer.type}) lacks its parameter "
                          f"{i + 1} ({layer.params[i] if i < len(layer.params) else 'unnamed'})")
    return self.params[layer.params[i]]


# ------------------------------------------------------------------------ MATLAB v5 / v7


def _from_scipy(x):
  """scipy.io's objects (squeeze_me, struct_as_record=False) as dicts, lists, arrays, str."""
  # Imported here: SciPy's MATLAB types, for v5/v7 files only (SciPy comes with gensim).
  from scipy.io.matlab import mat_struct  # pylint: disable=g-import-not-at-top
  if isinstance(x, mat_struct):
    return {k: _from_scipy(getattr(x, k)) for k in x._fieldnames}
  if isinstance(x, np.ndarray) and x.dtype == object:
    return [_from_scipy(v) for v in x.ravel(order="F")]
  if isinstance(x, np.ndarray) and x.dtype.kind == "U":
    return str(x) if x.ndim == 0 else [str(v) for v in x.ravel(order="F")]
  return x


def _read_v5(path: str) -> dict[str, Any]:
  # Imported here: SciPy's MATLAB reader, for v5/v7 files only.
  from scipy import io as scipy_io  # pylint: disable=g-import-not-at-top
  try:
    data = scipy_io.loadmat(path, squeeze_me=True, struct_as_record=False, chars_as_strings=True)
  except (ValueError, TypeError, OSError) as e:
    raise BackboneError(f"{path}: not a readable MATLAB file ({e})") from None
  return {k: _from_scipy(v) for k, v in data.items() if not k.startswith("__")}


# ------------------------------------------------------------------------ MATLAB v7.3 (HDF5)


def _from_h5(f, obj):
  """A v7.3 object as the v5 reader gives it: MATLAB stores arrays column-major, so numeric
  arrays come back transposed; cells and struct arrays are arrays of object references."""
  # Imported here: h5py, for v7.3 files only.
  import h5py  # pylint: disable=g-import-not-at-top
  if isinstance(obj, h5py.Group):  # a struct (1x1), or a struct array: fields of references
    fields = {k: obj[k] for k in obj if not k.startswith("#")}
    if obj.attrs.get("MATLAB_class", b"struct") not in (b"struct", "struct"):
      raise ValueError(f"unsupported MATLAB class {obj.attrs.get('MATLAB_class')}")
    refs = [d for d in fields.values()
            if isinstance(d, h5py.Dataset) and d.dtype == h5py.ref_dtype]
    if fields and len(refs) == len(fields) and all("MATLAB_class" not in d.attrs for d in refs):
      # A struct array: every field an array of references (one per element) with no MATLAB
      # class of its own; a scalar struct's cell field says 'cell'.
      n = next(iter(fields.values())).size
      columns = {k: [_from_h5(f, f[r]) for r in np.asarray(d).T.ravel()] for k, d in fields.items()}
      items = [{k: columns[k][i] for k in fields} for i in range(n)]
      return items[0] if n == 1 else items
    return {k: _from_h5(f, v) for k, v in fields.items()}
  cls = obj.attrs.get("MATLAB_class", b"")
  cls = cls.decode() if isinstance(cls, bytes) else str(cls)
  if obj.attrs.get("MATLAB_empty", 0):
    return "" if cls == "char" else ([] if cls == "cell" else np.zeros((0,), np.float32))
  value = np.asarray(obj)
  if cls == "cell":
    items = [_from_h5(f, f[r]) for r in value.T.ravel()]
    return items[0] if len(items) == 1 else items
  if cls == "char":
    return "".join(chr(c) for c in value.T.ravel())
  if cls == "logical":
    value = value.astype(bool)
  value = value.T
  value = np.squeeze(value)
  return value.item() if value.ndim == 0 else value


def _read_v73(path: str) -> dict[str, Any]:
  # Imported here: h5py, for v7.3 files only.
  import h5py  # pylint: disable=g-import-not-at-top
  try:
    with h5py.File(path, "r") as f:
      return {k: _from_h5(f, f[k]) for k in f if not k.startswith("#")}
  except (OSError, ValueError, KeyError) as e:
    raise BackboneError(f"{path}: not a readable MATLAB v7.3 file ({e})") from None


def read_mat(path: str) -> dict[str, Any]:
  """A .mat file's variables, either format: structs as dicts, struct arrays and cells as lists
  (a single element as itself), char as str, numeric arrays in MATLAB's shape (squeezed)."""
  with open(path, "rb") as f:
    header = f.read(512)
  if header[:4] == b"\x89HDF" or b"MATLAB 7.3" in header[:128]:
    return _read_v73(path)
  return _read_v5(path)


# ------------------------------------------------------------------------ the DagNN


def _names(x) -> tuple[str, ...]:
  if x is None or isinstance(x, np.ndarray) and x.size == 0:
    return ()
  return (x,) if isinstance(x, str) else tuple(str(v) for v in x)


def _as_list(x) -> list:
  return x if isinstance(x, list) else [x]


def read_dagnn(path: str) -> DagNN:
  """The DagNN in `path`; a file that is not one (a SimpleNN `layers` cell, missing fields) is a
  BackboneError naming what is missing."""
  data = read_mat(path)
  net = data.get("net") if isinstance(data.get("net"), dict) else data
  if "layers" in net and "vars" not in net and "params" not in net:
    raise BackboneError(f"{path}: a SimpleNN network (a `layers` cell, no `vars` or `params`), not "
                        "a DagNN: convert it in MATLAB with dagnn.DagNN.fromSimpleNN and save "
                        "its saveobj()")
  missing = [k for k in DAGNN_FIELDS if k not in net]
  if missing:
    raise BackboneError(f"{path}: not a MatConvNet DagNN (no {', '.join(missing)}; found "
                        f"{', '.join(sorted(net)) or 'nothing'})")
  layers = []
  for i, entry in enumerate(_as_list(net["layers"])):
    if not isinstance(entry, dict) or "name" not in entry or "type" not in entry:
      raise BackboneError(f"{path}: layers({i + 1}) has no name or type")
    block = entry.get("block") if isinstance(entry.get("block"), dict) else {}
    layers.append(Layer(str(entry["name"]), str(entry["type"]).removeprefix("dagnn."),
                        _names(entry.get("inputs")), _names(entry.get("outputs")),
                        _names(entry.get("params")), block))
  params = {}
  for i, entry in enumerate(_as_list(net["params"])):
    if not isinstance(entry, dict) or "name" not in entry or "value" not in entry:
      raise BackboneError(f"{path}: params({i + 1}) has no name or value")
    params[str(entry["name"])] = np.asarray(entry["value"], np.float32)
  meta = net.get("meta") if isinstance(net.get("meta"), dict) else {}
  return DagNN(tuple(layers), params, meta, path)


# ------------------------------------------------------------------------ ImageNet ResNets


def only(dag: DagNN, layers: list[Layer], want: str, after: str) -> Layer:
  found = [layer for layer in layers if layer.type == want]
  if len(found) != 1:
    raise BackboneError(f"{dag.source}: expected one {want} layer after {after}, found "
                        f"{[f'{layer.name} ({layer.type})' for layer in layers] or 'none'}")
  return found[0]


def pad_of(block, key="pad") -> list[int]:
  pad = np.atleast_1d(np.asarray(block.get(key, 0), np.int64)).tolist()
  return pad * 4 if len(pad) == 1 else [pad[0], pad[0], pad[1], pad[1]] if len(pad) == 2 else pad


def pair_of(block, key) -> list[int]:
  value = np.atleast_1d(np.asarray(block.get(key, 1), np.int64)).tolist()
  return value * 2 if len(value) == 1 else value


class GraphWalk:
  """Follows a ResNet's graph from one variable to the next, collecting conv + BN pairs."""

  def __init__(self, dag: DagNN):
    self.dag, self.consumers = dag, dag.consumers()
    self.used: set[str] = set()
    self.params: dict[str, Any] = {}
    self.stats: dict[str, Any] = {}
    self.epsilons: dict[str, float] = {}  # BatchNorm path -> the layer's epsilon

  def next_layers(self, var: str) -> list[Layer]:
    return self.consumers.get(var, [])

  def conv_bn(self, conv: Layer, ours: str, bn_name: str, shape=None) -> str:
    """Stores conv `conv` and its BatchNorm as ours (at the /-separated paths `ours` and
    `bn_name`, the kernel reshaped to `shape`, default MatConvNet's [H W Cin Cout]: our HWIO);
    returns the BN's output variable."""
    dag = self.dag
    kernel = dag.param(conv, 0)
    bn = only(dag, self.next_layers(conv.outputs[0]), "BatchNorm", conv.name)
    shift = None
    if bool(conv.block.get("hasBias", len(conv.params) > 1)) and len(conv.params) > 1:
      shift = dag.param(conv, 1).ravel()  # BN(conv(x) + c): the mean moves by c, exactly
      self.used.add(conv.params[1])
    self.used.update(conv.params[:1])
    # The reader squeezes singleton dimensions (a 1x1 conv's [1 1 Cin Cout]): the block's
    # `size` restores MatConvNet's [H W Cin Cout], which is our HWIO.
    size = tuple(int(v) for v in np.atleast_1d(conv.block.get("size", kernel.shape)))
    if int(np.prod(size)) != kernel.size:
      raise BackboneError(f"{dag.source}: {conv.name}'s filter has {kernel.size} values, its "
                          f"size is {list(size)}")
    put_leaves(self.params, ours, dict(kernel=kernel.reshape(shape or size)))
    return self.batch_norm(bn, bn_name, shift)

  def batch_norm(self, bn: Layer, bn_name: str, mean_shift=None) -> str:
    """Stores BatchNorm `bn` as ours at `bn_name` (its input's mean less `mean_shift`, a bias
    folded in); returns its output variable. Its epsilon, read from the layer, is recorded in
    `epsilons` (MatConvNet's own class defaults to 1e-4, the authors' override to 1e-3)."""
    dag = self.dag
    mult, bias, moments = (dag.param(bn, i) for i in range(3))
    moments = moments.reshape(-1, 2, order="F") if moments.ndim == 1 else moments
    mean, sigma = moments[:, 0], moments[:, 1]
    if mean_shift is not None:
      mean = mean - mean_shift
    epsilon = float(bn.block.get("epsilon", 1e-4))
    self.epsilons[bn_name] = epsilon
    self.used.update(bn.params[:3])
    # MatConvNet's test-mode BN divides by the stored sigma (= sqrt(var + epsilon), no epsilon
    # added again); ours by sqrt(var + epsilon): var = sigma^2 - epsilon gives the same sigma.
    # `use_epsilon` converts to another epsilon, exactly.
    put_leaves(self.params, bn_name, dict(scale=mult.ravel(), bias=bias.ravel()))
    put_leaves(self.stats, bn_name, dict(mean=mean, var=sigma.astype(np.float64) ** 2 - epsilon))
    return bn.outputs[0]

  def use_epsilon(self, *scopes: str) -> float | None:
    """One epsilon for the BatchNorms under `scopes` (what our model's layers there share):
    theirs when they agree, else the smallest (sigma^2 >= each layer's own epsilon, so every
    variance stays >= 0). The stored variances are converted to it, exactly: test mode divides
    by the stored sigma whatever the epsilon. None when no BatchNorm lies there."""
    found = {k: v for k, v in self.epsilons.items() if k.split("/")[0] in scopes}
    if not found:
      return None
    epsilon = min(found.values())
    for name, own in found.items():
      node = self.stats
      for part in name.split("/"):
        node = node[part]
      node["var"] = (node["var"].astype(np.float64) + own - epsilon).astype(np.float32)
    return epsilon

  def relu(self, var: str, after: str) -> str:
    return only(self.dag, self.next_layers(var), "ReLU", after).outputs[0]

  def next_block(self, var: str) -> tuple[Layer, Layer | None] | None:
    """(the residual branch's first conv, the projection's conv or None) of the bottleneck that
    reads `var`, or None when no conv reads it (the network's pooling follows). The
    projection's conv feeds its BN straight into the Sum; the branch's goes on."""
    convs = [layer for layer in self.next_layers(var) if layer.type == "Conv"]
    if not convs:
      return None

    def into_sum(conv):
      bn = only(self.dag, self.next_layers(conv.outputs[0]), "BatchNorm", conv.name)
      return any(layer.type == "Sum" for layer in self.next_layers(bn.outputs[0]))

    proj = [c for c in convs if into_sum(c)]
    branch = [c for c in convs if not into_sum(c)]
    if len(branch) != 1 or len(proj) > 1:
      raise BackboneError(f"{self.dag.source}: after {var} expected a residual branch and at "
                          f"most one projection, found {[c.name for c in convs]}")
    return branch[0], proj[0] if proj else None

  def residual_block(self, var: str, branch: Layer, proj: Layer | None, name: str,
                     shape=None) -> tuple[str, list[Layer]]:
    """Stores the bottleneck `next_block(var)` found (conv-BN-ReLU, conv-BN-ReLU, conv-BN, the
    projection's conv-BN, their Sum) as `name`/conv1..3, bn1..3, proj_conv, proj_bn, each
    kernel reshaped by `shape(conv)` (default: HWIO); returns the block's output (after the
    Sum's ReLU) and the branch's three convs."""
    shape = shape or (lambda conv: None)
    y, conv, chain = var, branch, []
    for i in (1, 2, 3):
      chain.append(conv)
      y = self.conv_bn(conv, f"{name}/conv{i}", f"{name}/bn{i}", shape(conv))
      if i < 3:
        y = self.relu(y, conv.name)
        conv = only(self.dag, self.next_layers(y), "Conv", y)
    shortcut = var
    if proj is not None:
      shortcut = self.conv_bn(proj, f"{name}/proj_conv", f"{name}/proj_bn", shape(proj))
    total = only(self.dag, self.next_layers(y), "Sum", y)
    if set(total.inputs) != {y, shortcut}:
      raise BackboneError(f"{self.dag.source}: {total.name} adds {total.inputs}, not {y} and "
                          f"{shortcut}")
    return self.relu(total.outputs[0], total.name), chain


def put_leaves(tree, path: str, leaves: dict[str, np.ndarray]):
  """Sets float32 `leaves` at the /-separated `path` of a nested variables dict (every port's
  way of building our tree: MatConvNet's here, Keras' and torchvision's in cli/port_resnet.py)."""
  node = tree
  for part in path.split("/"):
    node = node.setdefault(part, {})
  node.update({k: np.asarray(v, np.float32) for k, v in leaves.items()})


def resnet_variables(dag: DagNN, input_var: str | None = None):
  """(variables, facts, unused parameter names) of the bottleneck ResNet in `dag`.

  facts: depth, width, stride_variant, bn_epsilon, stem_pool_pad, as the graph has them.
  """
  walk = GraphWalk(dag)
  facts, _ = walk_resnet(walk, input_var)
  unused = sorted(set(dag.params) - walk.used)
  return dict(params=walk.params, batch_stats=walk.stats), facts, unused


def walk_resnet(walk: GraphWalk, input_var: str | None = None) -> tuple[dict[str, Any], str]:
  """Collects the ResNet that starts at `input_var` (default: the graph's one input) into
  `walk`; returns its facts and the variable after its last block (what pool5 pools)."""
  dag = walk.dag
  inputs = {v for layer in dag.layers for v in layer.inputs} - set(dag.producer())
  if input_var is None:
    if len(inputs) != 1:
      raise BackboneError(f"{dag.source}: expected one input variable, found {sorted(inputs)}")
    input_var = next(iter(inputs))
  stem = only(dag, walk.next_layers(input_var), "Conv", f"the input {input_var}")
  if pair_of(stem.block, "stride") != [2, 2] or pad_of(stem.block) != [3, 3, 3, 3]:
    raise BackboneError(f"{dag.source}: stem {stem.name} has stride {pair_of(stem.block, 'stride')}"
                        f" and pad {pad_of(stem.block)}; a ResNet's is 7x7/2, pad 3")
  x = walk.relu(walk.conv_bn(stem, "stem_conv", "stem_bn"), stem.name)
  pool = only(dag, walk.next_layers(x), "Pooling", "the stem")
  if str(pool.block.get("method", "max")) != "max" or pair_of(pool.block, "poolSize") != [3, 3] \
      or pair_of(pool.block, "stride") != [2, 2]:
    raise BackboneError(f"{dag.source}: {pool.name} is not the stem's 3x3/2 max pool")
  stem_pool_pad = pad_of(pool.block)
  x = pool.outputs[0]
  stages: list[int] = []
  strides: list[str] = []
  while (found := walk.next_block(x)) is not None:  # then pool5 and the classifier
    branch, proj = found
    if proj is not None or not stages:
      stages.append(0)
    stages[-1] += 1
    x, chain = walk.residual_block(x, branch, proj, f"stage{len(stages) + 1}_block{stages[-1]}")
    layer_strides = [pair_of(conv.block, "stride")[0] for conv in chain]
    if max(layer_strides) > 1:
      strides.append("v1" if layer_strides[0] > 1 else "v1.5")
  blocks = tuple(stages)
  depth = next((d for d, sizes in STAGE_SIZES.items() if sizes == blocks), None)
  if depth is None:
    raise BackboneError(f"{dag.source}: blocks per stage {blocks} match no ResNet "
                        f"({dict(STAGE_SIZES)})")
  epsilons = sorted(set(walk.epsilons.values()))
  if len(set(strides)) > 1 or len(epsilons) > 1:
    raise BackboneError(f"{dag.source}: mixed stride placements {strides} or BN epsilons "
                        f"{epsilons}")
  width = int(walk.params["stem_conv"]["kernel"].shape[-1])
  facts = dict(depth=depth, width=width, stride_variant=strides[0] if strides else "v1",
               bn_epsilon=epsilons[0], stem_pool_pad=stem_pool_pad)
  return facts, x


def input_convention(dag: DagNN) -> dict[str, Any]:
  """The pixels the network expects, from `meta.normalization`: RGB on 0-255, minus the
  average image's per-channel mean (a 224x224x3 image in the ImageNet files, or a 3-vector)."""
  norm = dag.meta.get("normalization", {}) if isinstance(dag.meta, dict) else {}
  average = np.asarray(norm.get("averageImage", np.zeros(3)), np.float64)
  if average.size < 3 or average.shape[-1] != 3 and average.size != 3:
    raise BackboneError(f"{dag.source}: meta.normalization.averageImage has shape "
                        f"{average.shape}, not ...x3")
  mean = average.reshape(-1, 3).mean(axis=0) if average.size != 3 else average.ravel()
  return dict(mean_rgb=[float(v) for v in mean], std_rgb=[1.0, 1.0, 1.0], bgr=False)
