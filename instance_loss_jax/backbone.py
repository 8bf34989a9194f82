"""Backbone files: an image ResNet's variables plus the record of where they came from.

A backbone directory holds `variables/` (an Orbax checkpoint of the ResNet's `params` and
`batch_stats`) and `origin.json`: source file and format, depth, (width, if not 64), stride
variant, BN epsilon and the input convention the weights expect (channel order, mean and std on
the 0-255 scale). Training
with `backbone_init=DIR` merges these variables into the image branch (strictly, by name and
shape) and takes the input convention from the record, not from a constant elsewhere.

Public: `load_backbone(path) -> (module, variables)`, with
`module.apply(variables, images_nhwc, train=False)` giving the pooled 2048-d features.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import orbax.checkpoint as ocp

from instance_loss_jax import paths
from instance_loss_jax.errors import BackboneError
from instance_loss_jax.models.resnet import ResNet

ORIGIN_FILE = "origin.json"
VARIABLES_DIR = "variables"
ORIGIN_KEYS = ("source", "format", "depth", "stride_variant", "bn_epsilon", "input")
# What a record leaves out is the ResNet's own default (models/resnet.py): ImageNet ResNets are
# 64 wide (small test backbones record theirs); a record without a stem pool padding is from a
# Keras or torchvision file, written before the field existed.
RECORD_DEFAULTS = {"width": ResNet.width, "stem_pool_pad": list(ResNet.stem_pool_pad)}


def save_backbone(path: str, variables: dict[str, Any], origin: dict[str, Any]) -> None:
  """Writes `path` atomically: everything goes to a temporary sibling, renamed at the end, so a
  failure leaves nothing half-written."""
  missing = [k for k in ORIGIN_KEYS if k not in origin]
  if missing:
    raise BackboneError(f"origin record lacks {missing}")
  path = paths.absolute(path)
  if paths.path(path).exists():
    raise BackboneError(f"{path} exists; choose a new output directory")
  tree = dict(params=variables["params"], batch_stats=variables["batch_stats"])
  if paths.is_remote(path):  # no directory rename there: the origin record, written last,
    with ocp.StandardCheckpointer() as ckpt:  # marks a complete backbone directory
      ckpt.save(paths.join(path, VARIABLES_DIR), tree)
    paths.write_text(paths.join(path, ORIGIN_FILE), json.dumps(origin, indent=1, sort_keys=True))
    return
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".backbone-", dir=parent)
  try:
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(os.path.join(tmp, VARIABLES_DIR), tree)
    with open(os.path.join(tmp, ORIGIN_FILE), "w", encoding="utf-8") as f:
      json.dump(origin, f, indent=1, sort_keys=True)
    os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def read_origin(path: str) -> dict[str, Any]:
  file = paths.join(path, ORIGIN_FILE)
  if not paths.path(file).is_file():
    raise BackboneError(f"{path}: not a backbone directory (no {ORIGIN_FILE})")
  origin = paths.read_json(file, BackboneError)
  missing = [k for k in ORIGIN_KEYS if k not in origin]
  if missing:
    raise BackboneError(f"{file}: missing {missing}")
  return origin


def load_backbone(path: str) -> tuple[ResNet, dict[str, Any]]:
  """(ResNet module as the record describes it, its variables)."""
  origin = read_origin(path)
  try:
    with ocp.StandardCheckpointer() as ckpt:
      variables = ckpt.restore(paths.join(paths.absolute(path), VARIABLES_DIR))
  except Exception as e:  # Orbax raises several types for a damaged checkpoint
    raise BackboneError(f"{path}: cannot read its variables ({e})") from None
  origin = {**RECORD_DEFAULTS, **origin}
  module = ResNet(depth=origin["depth"], width=origin["width"],
                  stride_variant=origin["stride_variant"], bn_epsilon=origin["bn_epsilon"],
                  stem_pool_pad=tuple(origin["stem_pool_pad"]))
  return module, variables


def origin_mismatches(origin: dict[str, Any], image_config) -> list[str]:
  """Fields of the run's `model.image` that the backbone record contradicts."""
  origin = {**RECORD_DEFAULTS, **origin}
  out = []
  for key in ("depth", "width", "stride_variant", "bn_epsilon", "stem_pool_pad"):
    ours, theirs = image_config[key], origin[key]
    if key == "stem_pool_pad":  # a tuple in the config, a list in JSON
      ours, theirs = list(ours), list(theirs)
    if ours != theirs:
      out.append(f"model.image.{key}={ours!r} but the backbone has {theirs!r}")
  return out
