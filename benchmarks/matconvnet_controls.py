r"""How far our ports of MatConvNet models are from MatConvNet's arithmetic, and how far the
mistakes the tests guard against would put them (negative controls).

    python benchmarks/matconvnet_controls.py

On the tests' random DagNNs (tests/test_matconvnet.py, tests/test_matconvnet_dual_path.py),
against their numpy executor of the graph: the ResNet's pooled features (max relative error)
as ported, with torchvision's stem pool padding instead of Caffe's, and with BatchNorm's
epsilon added a second time; the authors' text features (min cosine, max relative error) as
imported, with a nonzero padding row, and with a 1x2 convolution's two taps swapped. The tests
accept a relative error of 1e-4 and a cosine of 0.9999.
"""

import argparse
import json
import os
import sys
import tempfile

if __name__ == "__main__":  # no options; --help answered before the imports below (seconds)
  argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0]).parse_args()

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

# pylint: disable=wrong-import-position
import test_matconvnet as resnet_tests  # noqa: E402
import test_matconvnet_dual_path as dual_tests  # noqa: E402
from instance_loss_jax import backbone, matconvnet  # noqa: E402
from instance_loss_jax.cli import port_resnet  # noqa: E402
from instance_loss_jax.matconvnet import dual_path  # noqa: E402
from instance_loss_jax.models.resnet import ResNet  # noqa: E402


def _copy(tree):
  return jax.tree_util.tree_map(np.array, tree)


def resnet_controls(out: str) -> dict[str, float]:
  rng = np.random.default_rng(0)
  net = resnet_tests.dagnn_resnet(26, 8, rng)
  resnet_tests.save_v5(os.path.join(out, "r.mat"), net)
  port_resnet.port(os.path.join(out, "r.mat"), os.path.join(out, "bb"))
  module, variables = backbone.load_backbone(os.path.join(out, "bb"))
  images = rng.normal(0, 50, (2, 64, 64, 3)).astype(np.float32)
  want = resnet_tests.run_dagnn(net, images, "pool5").reshape(2, -1)

  def error(m, v):
    got = np.asarray(m.apply(v, images, train=False))
    return float(np.abs(got - want).max() / np.abs(want).max())

  twice = _copy(variables)
  for path, leaf in jax.tree_util.tree_leaves_with_path(twice["batch_stats"]):
    if jax.tree_util.keystr(path).endswith("['var']"):
      leaf += 1e-5
  return {"ported": error(module, variables),
          "torchvision_pool_pad": error(ResNet(depth=26, width=8, stem_pool_pad=(1, 1, 1, 1)),
                                        variables),
          "epsilon_twice": error(module, twice)}


def text_controls(out: str) -> dict[str, list[float]]:
  rng = np.random.default_rng(0)
  net = dual_tests.authors_model(rng)
  resnet_tests.save_v5(os.path.join(out, "n.mat"), {"net": net})
  variables, facts, _ = dual_path.dual_path_variables(
      matconvnet.read_dagnn(os.path.join(out, "n.mat")))
  model = dual_tests.our_model(facts)
  tokens = rng.integers(1, dual_tests.VOCAB + 1, (3, dual_tests.MAX_LEN))
  tokens[0, 9:] = 0
  want = resnet_tests.run_dagnn(net, dual_tests.one_hot(tokens), "fc5_2x",
                                input_name="data2").reshape(3, -1)

  def score(v):
    got = np.asarray(model.apply(v, tokens, method=model.text_features))
    cos = np.sum(got * want, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    return [float(cos.min()), float(np.abs(got - want).max() / np.abs(want).max())]

  padding = _copy(variables)
  padding["params"]["text_encoder"]["word_embedding"]["embedding"][0] += 0.5
  swapped = _copy(variables)
  conv2 = swapped["params"]["text_encoder"]["stage2_block1"]["conv2"]
  conv2["kernel"] = conv2["kernel"][::-1].copy()
  return {"imported": score(variables), "padding_row_nonzero": score(padding),
          "pair_taps_swapped": score(swapped)}


if __name__ == "__main__":
  with tempfile.TemporaryDirectory() as tmp:
    print(json.dumps({"resnet_max_rel_error": resnet_controls(tmp),
                      "text_min_cosine_and_max_rel_error": text_controls(tmp)}, indent=1))
