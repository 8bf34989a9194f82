"""The authors' trained dual-path models (`net-epoch-N.mat` of layumi/Image-Text-Embedding) as
this project's DualPath variables, found by walking the DagNN graph.

Their network (`resnet52_new_hope_word2_pool.m` and its MSCOCO/CUHK-PEDES variants): the image
input `data` through the Caffe ResNet to `pool5`, then `n` x (1x1 conv without bias, BatchNorm,
ReLU) and a DropOut; the text input `data2`, a one-hot [1 x L x V] image, through a 1x1 conv
with bias (the word embedding: `fc2f`, `fc2b`), a BatchNorm, residual bottlenecks of 1x1 / 1x2
(left pad 1, the stage's stride) / 1x1 convs, a max pool over the remaining length, then its own
head; both heads' dropped-out features into one 1x1 conv whose parameters the two prediction
layers share (W_share: `fcsharef`, and `fcshareb` except in their MSCOCO model).

`dual_path_variables(dag) -> (variables, facts, unused)`: the variables in DualPath's tree
(backbone, image_head, text_encoder, text_head, w_share) and the config facts the graph fixes.
Word k of the authors' dictionary (column k of the one-hot input) is our index k + 1; row 0,
padding, is zeros, as an all-zero one-hot column gives the bias alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from instance_loss_jax.errors import BackboneError
from instance_loss_jax.matconvnet.dagnn import (
    DagNN, GraphWalk, only, pad_of, pair_of, walk_resnet)

IMAGE_INPUT, TEXT_INPUT = "data", "data2"


def _head(walk: GraphWalk, var: str, scope: str) -> tuple[int, float, str, int]:
  """(layers, dropout rate, the DropOut's output, width) of a head: conv-BN-ReLU until DropOut."""
  layers, width = 0, 0
  while True:
    nxt = walk.next_layers(var)
    drop = [layer for layer in nxt if layer.type == "DropOut"]
    if drop:
      return layers, float(drop[0].block.get("rate", 0.5)), drop[0].outputs[0], width
    conv = only(walk.dag, nxt, "Conv", var)
    layers += 1
    kernel = walk.dag.param(conv, 0)
    width = int(kernel.shape[-1])
    var = walk.relu(walk.conv_bn(conv, f"{scope}/fc{layers}", f"{scope}/bn{layers}",
                                 shape=(kernel.shape[-2], width)), conv.name)


def _size(conv) -> list[int]:
  return [int(v) for v in np.atleast_1d(conv.block.get("size"))]


def _text_cnn(walk: GraphWalk, var: str) -> tuple[dict[str, Any], str]:
  """Facts and output variable of the text CNN after the embedding's BatchNorm."""
  dag = walk.dag
  blocks, widths, first_mids, strides, mids = [], [], [], [], set()
  while (found := walk.next_block(var)) is not None:  # then the pool over the length
    branch, proj = found
    if proj is not None or not blocks:
      blocks.append(0)
    blocks[-1] += 1
    # Kernels [1 W Cin Cout] as ours: [W, Cin, Cout] (PointwiseConv W=1, PairConv W=2).
    var, chain = walk.residual_block(var, branch, proj,
                                     f"text_encoder/stage{len(blocks)}_block{blocks[-1]}",
                                     shape=lambda conv: tuple(_size(conv)[1:]))
    for i, conv in enumerate(chain, 1):
      if _size(conv)[:2] != ([1, 2] if i == 2 else [1, 1]):
        raise BackboneError(f"{dag.source}: {conv.name} is {_size(conv)[0]}x{_size(conv)[1]}; a "
                            f"text bottleneck's convolution {i} is {'1x2' if i == 2 else '1x1'}")
      if i != 2 and pair_of(conv.block, "stride")[1] != 1:  # ours strides the 1x2 conv only
        raise BackboneError(f"{dag.source}: {conv.name} has stride "
                            f"{pair_of(conv.block, 'stride')}; in our text bottleneck only the "
                            "1x2 convolution (and the projection) stride")
    if pad_of(chain[1].block) != [0, 0, 1, 0]:
      raise BackboneError(f"{dag.source}: {chain[1].name} pads {pad_of(chain[1].block)}; ours "
                          "pads one zero on the left, [0 0 1 0]")
    stride, mid = pair_of(chain[1].block, "stride")[1], _size(chain[0])[3]
    if proj is not None and pair_of(proj.block, "stride")[1] != stride:
      raise BackboneError(f"{dag.source}: projection {proj.name} strides "
                          f"{pair_of(proj.block, 'stride')[1]}, its block {stride}")
    if blocks[-1] == 1:  # a stage's first block sets its width, mid and stride
      widths.append(_size(chain[2])[3])
      first_mids.append(mid)
      strides.append(stride)
    elif stride != 1:
      raise BackboneError(f"{dag.source}: block {blocks[-1]} of text stage {len(blocks)} "
                          f"strides {stride}; ours strides a stage's first block only")
    else:
      mids.add(widths[-1] // mid)
  if len(mids) > 1:
    raise BackboneError(f"{dag.source}: the text blocks' bottleneck ratios differ: {sorted(mids)}")
  return dict(blocks=tuple(blocks), widths=tuple(widths), first_mids=tuple(first_mids),
              strides=tuple(strides), bottleneck_ratio=mids.pop() if mids else 4), var


def dual_path_variables(dag: DagNN) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
  """(variables, facts, unused parameter names) of the authors' dual-path model in `dag`.

  facts: `model.*` fields the graph fixes ({"image": {...}, "text": {...}, "embed_dim", ...})
  and `max_len` (the text pool's width times the stages' strides).
  """
  walk = GraphWalk(dag)
  inputs = {v for layer in dag.layers for v in layer.inputs} - set(dag.producer())
  missing = [v for v in (IMAGE_INPUT, TEXT_INPUT) if v not in inputs]
  if missing:
    raise BackboneError(f"{dag.source}: not a dual-path model: no input {', '.join(missing)} "
                        f"(its inputs: {sorted(inputs)})")
  # Image: the ResNet, pool5 (a global average), the head.
  image_facts, x = walk_resnet(walk, IMAGE_INPUT)
  image = {"params": walk.params, "batch_stats": walk.stats}
  walk.params, walk.stats, walk.epsilons = {}, {}, {}
  pool5 = only(dag, walk.next_layers(x), "Pooling", x)
  image_layers, image_drop, image_out, embed_dim = _head(walk, pool5.outputs[0], "image_head")
  # Text: the embedding (a 1x1 conv with bias over the one-hot input) and its BatchNorm.
  emb = only(dag, walk.next_layers(TEXT_INPUT), "Conv", TEXT_INPUT)
  table, bias = dag.param(emb, 0), dag.param(emb, 1)
  size = [int(v) for v in np.atleast_1d(emb.block.get("size"))]
  vocab, word_dim = size[2], size[3]
  walk.used.update(emb.params[:2])
  bn = only(dag, walk.next_layers(emb.outputs[0]), "BatchNorm", emb.name)
  walk.params["text_encoder"] = {"word_embedding": {
      "embedding": np.concatenate([np.zeros((1, word_dim), np.float32),
                                   table.reshape(vocab, word_dim)]),
      "bias": bias.reshape(word_dim).astype(np.float32)}}
  walk.batch_norm(bn, "text_encoder/embedding_bn")
  text_facts, y = _text_cnn(walk, bn.outputs[0])
  pool = only(dag, walk.next_layers(y), "Pooling", y)
  pooled_len = pair_of(pool.block, "poolSize")[1]
  text_layers, text_drop, text_out, text_dim = _head(walk, pool.outputs[0], "text_head")
  # W_share: one 1x1 conv after each head's dropout, the same parameters in both.
  share_img = only(dag, walk.next_layers(image_out), "Conv", image_out)
  share_txt = only(dag, walk.next_layers(text_out), "Conv", text_out)
  if share_img.params != share_txt.params or len(share_img.params) not in (1, 2):
    raise BackboneError(f"{dag.source}: {share_img.name} and {share_txt.name} do not share one "
                        f"weight (and bias) ({share_img.params} vs {share_txt.params})")
  w = dag.param(share_img, 0)
  classes = int(w.size // embed_dim)
  walk.used.update(share_img.params)
  walk.params["w_share"] = {"kernel": w.reshape(embed_dim, classes).astype(np.float32)}
  has_bias = len(share_img.params) == 2  # their MSCOCO model has none
  if has_bias:
    walk.params["w_share"]["bias"] = dag.param(share_img, 1).reshape(classes).astype(np.float32)
  if text_dim != embed_dim or image_drop != text_drop:
    raise BackboneError(f"{dag.source}: heads of widths {embed_dim} / {text_dim}, dropout "
                        f"{image_drop} / {text_drop}: ours has one of each")
  # Their BatchNorm class (matlab/+dagnn/BatchNorm.m of their repository) defaults to epsilon
  # 1e-3: every BN their .m files create has it; the ImageNet ResNet's keep the file's 1e-5.
  # Our text CNN shares one epsilon, the heads another (model.text.bn_epsilon,
  # model.head_bn_epsilon): the graph's own, the variances converted exactly where they differ.
  text_epsilon = walk.use_epsilon("text_encoder")
  head_epsilon = walk.use_epsilon("image_head", "text_head")
  params = {"backbone": image["params"], **walk.params}
  stats = {"backbone": image["batch_stats"], **walk.stats}
  text_facts.update(vocab_size=vocab + 1, word_dim=word_dim, bn_epsilon=text_epsilon,
                    pooling="max" if str(pool.block.get("method", "max")) == "max" else "mean")
  facts = dict(image=image_facts, text=text_facts, embed_dim=embed_dim,
               image_head_layers=image_layers, text_head_layers=text_layers,
               head_bn_epsilon=head_epsilon,
               dropout=image_drop, num_classes=classes, w_share_bias=has_bias,
               max_len=pooled_len * int(np.prod(text_facts["strides"])))
  unused = sorted(set(dag.params) - walk.used)
  return {"params": params, "batch_stats": stats}, facts, unused
