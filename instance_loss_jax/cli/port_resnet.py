r"""Port ImageNet ResNet weights (Keras or torchvision/timm files) into a backbone directory.

    python -m instance_loss_jax.cli.port_resnet --source=FILE --output=DIR [--depth=50]

Sources:
  * Keras ImageNet HDF5 files (`resnet50_weights_tf_dim_ordering_tf_kernels[_notop].h5`: the
    legacy layout, datasets `<layer>/<layer>/kernel:0`) and Keras 3 `.weights.h5` files (layers
    stored as `layers/conv2d_N/vars/i` in model order). ResNet v1 (stride on the first 1x1
    conv); each conv's bias is folded exactly into the BatchNorm that follows (mean -= bias).
  * torchvision / timm state dicts (`.pth`, `.pt`, `.safetensors`): ResNet v1.5, OIHW kernels
    transposed to HWIO.
  * MatConvNet DagNN files (`imagenet-resnet-50/101/152-dag.mat`, the Caffe ResNets the paper
    started from; MATLAB v5/v7 or v7.3): read by following the graph (`matconvnet/dagnn.py`); the
    stem pool's Caffe padding (0, 1, 0, 1) and the input mean of `meta.normalization` are
    recorded.
The output is a backbone directory (see `instance_loss_jax.backbone`) with the input convention of
the source framework. Tensors of the source that a backbone does not use (the 1000-way
classifier, BN step counters) are listed in the summary.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import numpy as np
from absl import flags

from instance_loss_jax.cli import runner
from instance_loss_jax.config import STAGE_SIZES
from instance_loss_jax import matconvnet
from instance_loss_jax.matconvnet.dagnn import put_leaves
from instance_loss_jax.backbone import BackboneError, save_backbone

KERAS_EPSILON = 1.001e-5
TORCH_EPSILON = 1e-5
# Keras: "caffe" preprocessing: BGR, per-channel mean (B, G, R) = (103.939, 116.779, 123.68).
KERAS_INPUT = dict(mean_rgb=[123.68, 116.779, 103.939], std_rgb=[1.0, 1.0, 1.0], bgr=True)
# torchvision: RGB / 255, then mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225).
TORCH_INPUT = dict(mean_rgb=[0.485 * 255, 0.456 * 255, 0.406 * 255],
                   std_rgb=[0.229 * 255, 0.224 * 255, 0.225 * 255], bgr=False)


def _ours(stage: int, block: int, layer: str) -> str:
  return f"stage{stage}_block{block}/{layer}"


def keras_layers(depth: int) -> list[tuple[str, str, str]]:
  """(keras conv name, keras bn name, our conv path), in the Keras model's layer order: a
  stage's first block is ordered 1, 2, 0 (the shortcut), 3, which is the order in which Keras 3
  numbers the layers of a `.weights.h5` file."""
  out = [("conv1_conv", "conv1_bn", "stem_conv")]
  for s, blocks in enumerate(STAGE_SIZES[depth]):
    for b in range(blocks):
      pre = f"conv{s + 2}_block{b + 1}"
      for i in ((1, 2, 0, 3) if b == 0 else (1, 2, 3)):
        ours = _ours(s + 2, b + 1, "proj_conv" if i == 0 else f"conv{i}")
        out.append((f"{pre}_{i}_conv", f"{pre}_{i}_bn", ours))
  return out


def _bn_path(conv_path: str) -> str:
  return (conv_path.replace("stem_conv", "stem_bn").replace("proj_conv", "proj_bn")
          .replace("/conv", "/bn"))


def _read_h5(path: str) -> dict[str, np.ndarray]:
  # Imported here: only for Keras .h5 weights.
  import h5py  # pylint: disable=g-import-not-at-top
  tensors = {}
  try:
    with h5py.File(path, "r") as f:
      def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
          tensors[name] = np.asarray(obj)
      f.visititems(visit)
  except OSError as e:
    raise BackboneError(f"{path}: not a readable HDF5 file ({e})") from None
  return tensors


def read_keras(path: str, depth: int):
  """(keras layer name -> {variable: array}, unused tensor names) from either HDF5 layout."""
  tensors = _read_h5(path)
  layers: dict[str, dict[str, np.ndarray]] = {}
  if any(k.startswith("layers/") for k in tensors):  # Keras 3 .weights.h5
    convs = sorted({m.group(1) for k in tensors if (m := re.match(r"layers/(conv2d(?:_\d+)?)/", k))},
                   key=lambda n: int(n.rsplit("_", 1)[1]) if "_" in n[6:] else 0)
    bns = sorted({m.group(1) for k in tensors
                  if (m := re.match(r"layers/(batch_normalization(?:_\d+)?)/", k))},
                 key=lambda n: int(n.rsplit("_", 1)[1]) if n != "batch_normalization" else 0)
    expected = keras_layers(depth)
    if len(convs) != len(expected) or len(bns) != len(expected):
      raise BackboneError(f"{path}: {len(convs)} conv and {len(bns)} BN layers, a Keras "
                          f"ResNet-{depth} has {len(expected)} of each")
    used = set()
    for (conv, bn, _), stored_conv, stored_bn in zip(expected, convs, bns):
      keys = [f"layers/{stored_conv}/vars/{i}" for i in range(2)]
      keys += [f"layers/{stored_bn}/vars/{i}" for i in range(4)]
      layers[conv] = dict(kernel=tensors[keys[0]], bias=tensors[keys[1]])
      layers[bn] = dict(zip(("gamma", "beta", "moving_mean", "moving_variance"),
                            (tensors[k] for k in keys[2:])))
      used.update(keys)
    return layers, sorted(set(tensors) - used)
  for name, value in tensors.items():  # legacy: <layer>/<layer>/<variable>[:0]
    parts = name.split("/")
    layers.setdefault(parts[0], {})[parts[-1].split(":")[0]] = value
  wanted = {n for pair in keras_layers(depth) for n in pair[:2]}
  unused = sorted(k for k in tensors if k.split("/")[0] not in wanted)
  return layers, unused


def keras_to_variables(layers: dict[str, dict[str, np.ndarray]], depth: int, source: str):
  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}
  missing = []
  for conv, bn, ours in keras_layers(depth):
    c, b = layers.get(conv, {}), layers.get(bn, {})
    need = [f"{conv}/{v}" for v in ("kernel", "bias") if v not in c]
    need += [f"{bn}/{v}" for v in ("gamma", "beta", "moving_mean", "moving_variance")
             if v not in b]
    if need:
      missing.extend(need)
      continue
    bias = c["bias"].astype(np.float32)
    put_leaves(params, ours, dict(kernel=c["kernel"].astype(np.float32)))
    put_leaves(params, _bn_path(ours), dict(scale=b["gamma"], bias=b["beta"]))
    # BN(conv(x) + c) = BN'(conv(x)) with the running mean shifted by c: exact.
    put_leaves(stats, _bn_path(ours), dict(mean=b["moving_mean"] - bias, var=b["moving_variance"]))
  if missing:
    raise BackboneError(f"{source}: missing tensors for a ResNet-{depth}: "
                        + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
  return dict(params=params, batch_stats=stats)


def read_torch(path: str) -> dict[str, np.ndarray]:
  """A torchvision/timm state dict as numpy arrays."""
  if path.endswith(".safetensors"):
    # Imported here: only for .safetensors weights.
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      return dict(load_file(path))
    except Exception as e:  # safetensors raises its own error types
      raise BackboneError(f"{path}: not a readable safetensors file ({e})") from None
  try:
    # Imported here: PyTorch is optional (not a dependency), only for .pth files.
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise BackboneError(f"{path}: reading .pth needs PyTorch (the package's torch extra: pip "
                        "install -e '.[torch]'), or convert the file to .safetensors") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for a damaged file
    raise BackboneError(f"{path}: not a readable PyTorch file ({e})") from None
  state = state.get("state_dict", state) if isinstance(state, dict) else state
  return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}


def torch_depth(state: dict[str, np.ndarray]) -> int:
  blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")})
                 for i in range(1, 5))
  for depth, sizes in STAGE_SIZES.items():
    if sizes == blocks:
      return depth
  raise BackboneError(f"blocks per stage {blocks} match no ResNet ({STAGE_SIZES})")


def torch_to_variables(state: dict[str, np.ndarray], depth: int, source: str):
  pairs = [("conv1", "bn1", "stem_conv")]
  for s, blocks in enumerate(STAGE_SIZES[depth]):
    for b in range(blocks):
      pre = f"layer{s + 1}.{b}"
      if b == 0:
        pairs.append((f"{pre}.downsample.0", f"{pre}.downsample.1",
                      _ours(s + 2, b + 1, "proj_conv")))
      for i in (1, 2, 3):
        pairs.append((f"{pre}.conv{i}", f"{pre}.bn{i}", _ours(s + 2, b + 1, f"conv{i}")))
  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}
  missing, used = [], set()
  for conv, bn, ours in pairs:
    keys = [f"{conv}.weight"] + [f"{bn}.{v}" for v in ("weight", "bias", "running_mean",
                                                       "running_var")]
    absent = [k for k in keys if k not in state]
    if absent:
      missing.extend(absent)
      continue
    used.update(keys + [f"{bn}.num_batches_tracked"])
    w, g, beta, mean, var = (state[k] for k in keys)
    put_leaves(params, ours, dict(kernel=np.transpose(w, (2, 3, 1, 0))))  # OIHW -> HWIO
    put_leaves(params, _bn_path(ours), dict(scale=g, bias=beta))
    put_leaves(stats, _bn_path(ours), dict(mean=mean, var=var))
  if missing:
    raise BackboneError(f"{source}: missing tensors for a ResNet-{depth}: "
                        + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
  return dict(params=params, batch_stats=stats), sorted(set(state) - used)


def port(source: str, output: str, depth: int | None = None) -> dict[str, Any]:
  """Reads `source`, writes the backbone directory `output`; returns a summary."""
  if not os.path.isfile(source):
    raise BackboneError(f"{source}: no such file")
  if source.endswith(".h5"):
    depth = depth or 50
    layers, unused = read_keras(source, depth)
    variables = keras_to_variables(layers, depth, source)
    fmt = "keras-weights.h5" if source.endswith(".weights.h5") else "keras-legacy-h5"
    origin = dict(stride_variant="v1", bn_epsilon=KERAS_EPSILON, input=KERAS_INPUT)
    read = sum(len(v) for v in layers.values())
  elif source.endswith((".pth", ".pt", ".bin", ".safetensors")):
    state = read_torch(source)
    found = torch_depth(state)
    if depth and depth != found:
      raise BackboneError(f"{source}: holds a ResNet-{found}, --depth={depth} was asked")
    depth = found
    variables, unused = torch_to_variables(state, depth, source)
    fmt = "safetensors" if source.endswith(".safetensors") else "torch"
    origin = dict(stride_variant="v1.5", bn_epsilon=TORCH_EPSILON, input=TORCH_INPUT)
    read = len(state)
  elif source.endswith(".mat"):
    dag = matconvnet.read_dagnn(source)
    variables, facts, unused = matconvnet.resnet_variables(dag)
    if depth and depth != facts["depth"]:
      raise BackboneError(f"{source}: holds a ResNet-{facts['depth']}, --depth={depth} was asked")
    depth = facts.pop("depth")
    fmt = "matconvnet-dagnn"
    origin = dict(facts, input=matconvnet.input_convention(dag))
    if origin["width"] == 64:
      del origin["width"]
    read = len(dag.params)
  else:
    raise BackboneError(f"{source}: unknown format (.h5, .weights.h5, .pth, .pt, .safetensors, "
                        ".mat)")
  origin.update(source=os.path.abspath(source), format=fmt, depth=depth)
  save_backbone(output, variables, origin)
  written = len(jax.tree_util.tree_leaves(variables))
  return dict(format=fmt, depth=depth, tensors_read=read, tensors_written=written,
              unused=unused, output=os.path.abspath(output), origin=origin)


def define_flags():
  flags.DEFINE_string("source", None, "Keras .h5/.weights.h5, torch .pth/.safetensors or "
                      "MatConvNet DagNN .mat.")
  flags.DEFINE_string("output", None, "Backbone directory to create.")
  flags.DEFINE_integer("depth", None, "50, 101 or 152 (Keras default 50; torch, .mat: detected).")
  flags.mark_flags_as_required(["source", "output"])


def main(argv):
  del argv
  f = flags.FLAGS
  summary = port(f.source, f.output, f.depth)
  print(f"ported {f.source} ({summary['format']}, ResNet-{summary['depth']}) -> "
        f"{summary['output']}: {summary['tensors_read']} tensors read, "
        f"{summary['tensors_written']} written; not used: {summary['unused'] or 'none'}")
  pad = summary["origin"].get("stem_pool_pad")
  if pad and list(pad) != [1, 1, 1, 1]:  # runs must build the same stem (backbone.py checks)
    print(f"train with --config.model.image.stem_pool_pad='{tuple(pad)}' (the stem pool's "
          "padding these weights were trained with)")


def run():
  """Console-script entry point."""
  runner.run(main, define_flags)


if __name__ == "__main__":
  run()
