"""The dual-path model, its losses and its SGD step in PyTorch eager: the outside reference.

`benchmarks/step_speed.py --reference=torch` times this beside our XLA step in the same process
and prints the ratio. The module mirrors `instance_loss_jax.models` layer for layer (the same
explicit paddings, the text CNN's one-zero left pad, unshared heads, one W_share), and
`load_flax_variables` copies a Flax variable tree into it, so "same weights in, same loss out"
can be checked (`check_equivalence`, and tests/test_torch_reference.py on a tiny config).

What it matches, from the run's config: stride variant, depth, text CNN shape, head layers,
dropout, lambdas, hardest negatives in the batch, SGD with Nesterov momentum, weight decay on
kernels only, per-group learning rates, Stage I's frozen backbone with running BN statistics.
What it does not: the "random"/"mined" negative modes and the backbone_bn="batch" mode; PyTorch
stores the unbiased batch variance in its running statistics where Flax stores the biased one
(training-mode outputs, hence losses, are the same either way).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from instance_loss_jax.config import STAGE_SIZES


def _bn(channels, momentum, eps=1e-5, dims=2):
  # Flax's momentum m keeps m of the old statistics; PyTorch's keeps 1 - m.
  cls = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
  return cls(channels, eps=eps, momentum=1.0 - momentum)


class Bottleneck(nn.Module):
  def __init__(self, cin, width, stride, variant, momentum, eps):
    super().__init__()
    s1, s3 = (stride, 1) if variant == "v1" else (1, stride)
    out = 4 * width
    self.conv1 = nn.Conv2d(cin, width, 1, s1, bias=False)
    self.bn1 = _bn(width, momentum, eps)
    self.conv2 = nn.Conv2d(width, width, 3, s3, padding=1, bias=False)
    self.bn2 = _bn(width, momentum, eps)
    self.conv3 = nn.Conv2d(width, out, 1, bias=False)
    self.bn3 = _bn(out, momentum, eps)
    self.proj_conv = self.proj_bn = None
    if cin != out or stride != 1:
      self.proj_conv = nn.Conv2d(cin, out, 1, stride, bias=False)
      self.proj_bn = _bn(out, momentum, eps)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    if self.proj_conv is not None:
      x = self.proj_bn(self.proj_conv(x))
    return F.relu(x + y)


class ResNet(nn.Module):
  def __init__(self, m):
    super().__init__()
    i = m.image
    self.stem_conv = nn.Conv2d(3, i.width, 7, 2, padding=3, bias=False)
    self.stem_bn = _bn(i.width, m.bn_momentum, i.bn_epsilon)
    blocks, cin = {}, i.width
    for stage, n in enumerate(STAGE_SIZES[i.depth]):
      for b in range(n):
        width = i.width * 2**stage
        blocks[f"stage{stage + 2}_block{b + 1}"] = Bottleneck(
            cin, width, 2 if stage > 0 and b == 0 else 1, i.stride_variant, m.bn_momentum,
            i.bn_epsilon)
        cin = 4 * width
    self.blocks = nn.ModuleDict(blocks)

  def forward(self, x):
    x = F.relu(self.stem_bn(self.stem_conv(x)))
    x = F.max_pool2d(x, 3, 2, padding=1)
    for block in self.blocks.values():
      x = block(x)
    return x.mean(dim=(2, 3))


class TextBottleneck(nn.Module):
  def __init__(self, cin, mid, out, stride, momentum, eps):
    super().__init__()
    self.conv1 = nn.Conv1d(cin, mid, 1, bias=False)
    self.bn1 = _bn(mid, momentum, eps, dims=1)
    self.conv2 = nn.Conv1d(mid, mid, 2, stride, bias=False)  # after a one-zero left pad
    self.bn2 = _bn(mid, momentum, eps, dims=1)
    self.conv3 = nn.Conv1d(mid, out, 1, bias=False)
    self.bn3 = _bn(out, momentum, eps, dims=1)
    self.proj_conv = self.proj_bn = None
    if cin != out or stride != 1:
      self.proj_conv = nn.Conv1d(cin, out, 1, stride, bias=False)
      self.proj_bn = _bn(out, momentum, eps, dims=1)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(F.pad(y, (1, 0)))))
    y = self.bn3(self.conv3(y))
    if self.proj_conv is not None:
      x = self.proj_bn(self.proj_conv(x))
    return F.relu(x + y)


class TextCNN(nn.Module):
  def __init__(self, m):
    super().__init__()
    t = m.text
    self.embedding = nn.Parameter(torch.randn(t.vocab_size, t.word_dim) * 0.1)
    self.embedding_bias = nn.Parameter(torch.zeros(t.word_dim))
    self.embedding_bn = _bn(t.word_dim, m.bn_momentum, t.bn_epsilon, dims=1)
    blocks, cin = {}, t.word_dim
    for stage, n in enumerate(t.blocks):
      for b in range(n):
        mid = t.first_mids[stage] if b == 0 else t.widths[stage] // t.bottleneck_ratio
        blocks[f"stage{stage + 1}_block{b + 1}"] = TextBottleneck(
            cin, mid, t.widths[stage], t.strides[stage] if b == 0 else 1, m.bn_momentum,
            t.bn_epsilon)
        cin = t.widths[stage]
    self.blocks = nn.ModuleDict(blocks)
    self.pooling = t.pooling

  def forward(self, tokens):
    x = F.embedding(tokens, self.embedding) + self.embedding_bias  # [B, L, C]
    x = self.embedding_bn(x.transpose(1, 2))  # [B, C, L]
    for block in self.blocks.values():
      x = block(x)
    return x.amax(dim=2) if self.pooling == "max" else x.mean(dim=2)


class Head(nn.Module):
  def __init__(self, in_dim, dim, num_layers, momentum, eps):
    super().__init__()
    self.layers = nn.ModuleList()
    for i in range(num_layers):
      self.layers.append(nn.Linear(in_dim if i == 0 else dim, dim, bias=False))
      self.layers.append(_bn(dim, momentum, eps, dims=1))
      self.layers.append(nn.ReLU())

  def forward(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


class DualPath(nn.Module):
  """Images [B, 3, H, W], tokens [B, L] -> (img_emb, txt_emb, img_logits, txt_logits)."""

  def __init__(self, config):
    super().__init__()
    m = config.model
    self.backbone = ResNet(m)
    self.text_encoder = TextCNN(m)
    self.image_head = Head(32 * m.image.width, m.embed_dim, m.image_head_layers, m.bn_momentum,
                           m.head_bn_epsilon)
    self.text_head = Head(m.text.widths[-1], m.embed_dim, m.text_head_layers, m.bn_momentum,
                          m.head_bn_epsilon)
    self.w_share = nn.Linear(m.embed_dim, config.num_classes)
    self.dropout = nn.Dropout(m.dropout)
    self.freeze_backbone = config.freeze_backbone
    if self.freeze_backbone:
      self.backbone.requires_grad_(False)

  def train(self, mode: bool = True):
    super().train(mode)
    if self.freeze_backbone:
      self.backbone.eval()  # Stage I: running statistics, nothing updated
    return self

  def forward(self, images, tokens):
    if self.freeze_backbone:
      with torch.no_grad():
        feats = self.backbone(images)
    else:
      feats = self.backbone(images)
    img = self.image_head(feats)
    txt = self.text_head(self.text_encoder(tokens))
    return (F.normalize(img, dim=1), F.normalize(txt, dim=1),
            self.w_share(self.dropout(img)), self.w_share(self.dropout(txt)))


def total_loss(outputs, labels, lambdas, margin):
  """Eq. 9 with hardest negatives in the batch (instance_loss_jax.training.losses' default mode)."""
  img_emb, txt_emb, img_logits, txt_logits = outputs
  l_rank, l_vis, l_txt = lambdas
  loss = l_vis * F.cross_entropy(img_logits, labels) + l_txt * F.cross_entropy(txt_logits, labels)
  if l_rank:
    sim = img_emb @ txt_emb.T
    pos = sim.diagonal()
    negative = labels[:, None] != labels[None, :]
    masked = sim.masked_fill(~negative, float("-inf"))
    has_i, has_t = negative.any(dim=1), negative.any(dim=0)
    hinge_i = torch.where(has_i, F.relu(margin - pos + masked.amax(dim=1)), 0.0)
    hinge_t = torch.where(has_t, F.relu(margin - pos + masked.amax(dim=0)), 0.0)
    loss = loss + l_rank * (hinge_i.mean() + hinge_t.mean())
  return loss


def _group(name: str) -> str:
  """The learning-rate group of a parameter (the names of
  instance_loss_jax.training.optim.param_group)."""
  if name in ("text_encoder.embedding", "text_encoder.embedding_bias"):
    return "word_embedding"
  top = name.split(".")[0]
  return {"text_encoder": "text_cnn", "image_head": "heads", "text_head": "heads"}.get(top, top)


def make_optimizer(model: DualPath, config, lr_factor: float = 1.0) -> torch.optim.SGD:
  """SGD, Nesterov momentum, weight decay on kernels only, one group per (lr group, decay)."""
  o = config.optim
  groups = {}
  for name, p in model.named_parameters():
    if not p.requires_grad:
      continue
    # Flax's decay mask: parameters with ndim > 1; the torch W_share bias is 1-D like Flax's.
    key = (_group(name), p.ndim > 1)
    groups.setdefault(key, []).append(p)
  return torch.optim.SGD(
      [dict(params=ps, lr=o.lr * lr_factor * o.lr_mult[g], weight_decay=o.weight_decay if d
            else 0.0) for (g, d), ps in groups.items()],
      lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)


def train_step(model, optimizer, images, tokens, labels, config) -> float:
  """One SGD step; returns the loss before the update."""
  optimizer.zero_grad(set_to_none=True)
  loss = total_loss(model(images, tokens), labels, tuple(config.loss.lambdas),
                    config.loss.margin)
  loss.backward()
  optimizer.step()
  return float(loss.detach())


def _copy_bn(bn, params, stats):
  bn.weight.data.copy_(torch.tensor(np.asarray(params["scale"])))
  bn.bias.data.copy_(torch.tensor(np.asarray(params["bias"])))
  bn.running_mean.copy_(torch.tensor(np.asarray(stats["mean"])))
  bn.running_var.copy_(torch.tensor(np.asarray(stats["var"])))


def _conv_weight(kernel):
  k = np.asarray(kernel)  # Flax: [*spatial, in, out]; torch: [out, in, *spatial]
  return torch.tensor(np.moveaxis(k, (-1, -2), (0, 1)))


def _copy_blocks(torch_blocks, params, stats):
  for name, block in torch_blocks.items():
    p, s = params[name], stats[name]
    for conv in ("conv1", "conv2", "conv3", "proj_conv"):
      if getattr(block, conv) is not None:
        getattr(block, conv).weight.data.copy_(_conv_weight(p[conv]["kernel"]))
        bn = conv.replace("conv", "bn")
        _copy_bn(getattr(block, bn), p[bn], s[bn])


def load_flax_variables(model: DualPath, variables) -> DualPath:
  """Copies a Flax DualPath variable tree ({"params", "batch_stats"}) into `model`."""
  params, stats = variables["params"], variables["batch_stats"]
  with torch.no_grad():
    bb, bbs = params["backbone"], stats["backbone"]
    model.backbone.stem_conv.weight.copy_(_conv_weight(bb["stem_conv"]["kernel"]))
    _copy_bn(model.backbone.stem_bn, bb["stem_bn"], bbs["stem_bn"])
    _copy_blocks(model.backbone.blocks, bb, bbs)
    te, tes = params["text_encoder"], stats["text_encoder"]
    model.text_encoder.embedding.copy_(torch.tensor(np.asarray(
        te["word_embedding"]["embedding"])))
    model.text_encoder.embedding_bias.copy_(torch.tensor(np.asarray(
        te["word_embedding"]["bias"])))
    _copy_bn(model.text_encoder.embedding_bn, te["embedding_bn"], tes["embedding_bn"])
    _copy_blocks(model.text_encoder.blocks, te, tes)
    for head_name in ("image_head", "text_head"):
      head, hp, hs = getattr(model, head_name), params[head_name], stats[head_name]
      for i in range(len(head.layers) // 3):
        head.layers[3 * i].weight.copy_(torch.tensor(np.asarray(hp[f"fc{i + 1}"]["kernel"]).T))
        _copy_bn(head.layers[3 * i + 1], hp[f"bn{i + 1}"], hs[f"bn{i + 1}"])
    model.w_share.weight.copy_(torch.tensor(np.asarray(params["w_share"]["kernel"]).T))
    model.w_share.bias.copy_(torch.tensor(np.asarray(params["w_share"]["bias"])))
  return model


def to_torch_batch(batch):
  """A host batch (images NHWC float32, tokens, labels; no device axis) as torch tensors."""
  images = torch.from_numpy(np.ascontiguousarray(np.asarray(batch["images"]).transpose(0, 3, 1, 2)))
  return (images, torch.tensor(np.asarray(batch["tokens"]).astype(np.int64)),
          torch.tensor(np.asarray(batch["labels"]).astype(np.int64)))


def check_equivalence(config, variables, batch, steps: int = 2,
                      torch_dtypes=(torch.float32,)):
  """Runs `steps` SGD steps of our train step (one device) and of this reference (once per
  dtype in `torch_dtypes`) from the same variables on the same batch (no device axis).

  Returns {"ours": [losses], "torch.float32": [losses], ...}. Dropout must be 0 in `config`
  (the two frameworks draw different masks). float64 is the arbiter at full size, where float32
  rounding alone moves the second step's loss by ~1e-3 (the gap of either float32 run to it).
  """
  import jax  # here, so that importing this module does not start JAX

  from instance_loss_jax import sharding, training as ts
  from instance_loss_jax.models import build_model
  from instance_loss_jax.training.optim import make_optimizer as make_tx

  if config.model.dropout:
    raise ValueError("check_equivalence needs model.dropout = 0 (masks differ by framework)")
  mesh = sharding.make_mesh(jax.local_devices()[:1])
  state = ts.TrainState.create(apply_fn=build_model(config).apply,
                               params=variables["params"], batch_stats=variables["batch_stats"],
                               tx=make_tx(config, 1000, variables["params"]))
  step = ts.make_train_step(config, 1000, mesh)
  state = ts.place_state(state, config, mesh)
  losses = {"ours": []}
  for _ in range(steps):
    state, metrics = step(state, {k: np.asarray(v) for k, v in batch.items()})
    losses["ours"].append(float(metrics["loss"]))
  images, tokens, labels = to_torch_batch(batch)
  for dtype in torch_dtypes:
    model = load_flax_variables(DualPath(config), variables).to(dtype).train()
    optimizer = make_optimizer(model, config)
    losses[str(dtype)] = [train_step(model, optimizer, images.to(dtype), tokens, labels, config)
                          for _ in range(steps)]
  return losses
