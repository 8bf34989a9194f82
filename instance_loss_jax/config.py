"""The configuration schema: every field, its default (docs/design.md: where each comes from),
and its checks.

`configs/*.py` files start from `base_config()` and override what their dataset and stage need.
`validate_config` runs before anything is built or compiled, so a typo or an inconsistent value
fails with the field's name instead of a shape error deep inside XLA.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import ml_collections
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from instance_loss_jax import paths
from instance_loss_jax.errors import ConfigError

STAGES = (1, 2)
# config.storage_retry_s's default, also the writer claim's when it is used without a config.
STORAGE_RETRY_S = 900.0
# Bottleneck blocks per ResNet stage by depth (depth = 3 * sum + 2); 14 and 26 are small variants
# for tests.
STAGE_SIZES = {
    14: (1, 1, 1, 1),
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
# The ranking loss's negatives (losses.ranking_loss): the batch's hardest, a random one, or the
# original code's mined captions.
NEGATIVE_MODES = ("hardest", "random", "mined")
# Eq. 9's ranking term: the paper's hinge (with NEGATIVE_MODES), CLIP's InfoNCE, SigLIP's sigmoid.
RANKING_LOSSES = ("triplet", "infonce", "sigmoid")
POOLINGS = ("max", "mean")
STRIDE_VARIANTS = ("v1", "v1.5")
# How the frozen backbone's BatchNorm behaves in Stage I:
#   running: normalise with the stored statistics, update nothing (our default);
#   batch:   normalise with the batch's statistics, keep the stored ones (the original code);
#   train:   normalise with batch statistics and update the stored ones (Stage II).
BACKBONE_BN_MODES = ("running", "batch", "train")
DATA_FORMATS = ("karpathy", "cuhk_pedes", "tfds")
# How captions and queries become words: "words" (lower-cased words and numbers; a Karpathy
# JSON's own `tokens`), "original" (the authors' MATLAB preparation: data/records.tokenizer).
TOKENIZERS = ("words", "original")
COMPUTE_DTYPES = ("float32", "bfloat16")
EVAL_FEATURES = ("after_relu", "original")
FLOAT32_PARTS = ("backbone", "text_cnn", "heads", "batch_norm", "w_share")
W_SHARE_SHARDINGS = ("classes", "replicated")
LR_BATCH_RULES = ("none", "linear", "sqrt")


# The TFDS name CUHK-PEDES is prepared under (data/tfds_source.py's SOURCES; a test keeps the
# two the same).
CUHK_PEDES_TFDS_NAME = "cuhk_pedes"


def person_retrieval(data) -> bool:
  """Whether `config.data` is CUHK-PEDES: text->image person retrieval, a class per person."""
  return data.format == "cuhk_pedes" or (
      data.format == "tfds" and data.tfds_name == CUHK_PEDES_TFDS_NAME)


def base_config() -> ml_collections.ConfigDict:
  """Every field the code reads, with the Flickr30k Stage I values (docs/design.md) as defaults."""
  c = ml_collections.ConfigDict()
  c.stage = 1
  c.seed = 0
  c.batch_size = 32  # global, over all devices and hosts
  c.num_classes = 0  # W_share's width: 0 = the training split's group count
  c.image_size = 224
  # Activations and matmuls: float32 or bfloat16 (the fast path on TPU and recent GPUs).
  # Parameters, optimiser state and BN statistics stay float32 either way, so a checkpoint
  # trained in one dtype resumes or evaluates in the other.
  c.compute_dtype = "float32"
  # With compute_dtype bfloat16, the parts still computed in float32: any of "backbone",
  # "text_cnn", "heads", "batch_norm" (every BN's normalisation output), "w_share" (the
  # classifier's logits and their gradients).
  c.float32_parts = ()

  c.data = ml_collections.ConfigDict()
  # karpathy (Flickr30k, MSCOCO) and cuhk_pedes: the published JSON and an image folder; tfds:
  # a dataset prepared by `python -m instance_loss_jax.cli.prepare` (docs/data.md), read by
  # record number (data.tfds_data_dir, data.tfds_name; data.json and image_root unused).
  c.data.format = "karpathy"
  c.data.json = ""  # dataset_flickr30k.json / dataset_coco.json / reid_raw.json
  c.data.image_root = ""
  c.data.train_splits = ("train",)  # MSCOCO: ("train", "restval")
  c.data.tfds_data_dir = ""  # tfds: the TFDS data_dir, local or gs://
  # tfds: flickr30k_karpathy, mscoco_karpathy, cuhk_pedes or synthetic_scenes
  c.data.tfds_name = ""
  c.data.word2vec = ""  # KeyedVectors file; "" = vocabulary from counts, random init
  c.data.min_word_count = 1  # the no-word2vec vocabulary's threshold
  # The paper's Table 5: K > 0 trains instance loss on K pseudo-classes, k-means clusters of the
  # training images' pool5 features from `backbone_init` (data/pseudo_classes.py), instead of one
  # class per image (0). Computed once, recorded in the workdir; Stage II takes Stage I's.
  c.data.pseudo_classes = 0
  c.data.pseudo_classes_iterations = 100  # Lloyd's iterations at most (stops when none moves)
  # "words", or "original": the authors' split on original_delimiters and spaces, case kept
  # (their Flickr30k and CUHK-PEDES preparation; MSCOCO's splits on "?" too).
  c.data.tokenizer = "words"
  c.data.original_delimiters = "-.,()"
  c.data.resize_shorter = 256
  c.data.crop_area = (0.64, 1.0)  # fraction of the largest crop of the drawn aspect ratio
  c.data.crop_aspect = (3 / 4, 4 / 3)  # log-uniform
  c.data.flip = True
  c.data.position_shift = True  # False: left alignment (the ablation baseline)
  c.data.mean_rgb = (119.86, 113.93, 103.93)  # on 0-255 (MSCOCO mean)
  c.data.std_rgb = (1.0, 1.0, 1.0)
  c.data.bgr = False  # channel order the backbone expects (Keras/caffe weights: True)
  # Two stages of read-ahead: tf.data prepares `prefetch` host (numpy) batches in its own
  # threads; `device_prefetch` of them are then checked against the config and copied onto the
  # mesh as global arrays, in a thread, ahead of the steps that use them (training/prefetch.py),
  # so the host-to-device copy overlaps the step before. 0: a batch is placed when its step
  # starts. Results do not depend on either.
  c.data.prefetch = 2
  c.data.device_prefetch = 2

  c.model = ml_collections.ConfigDict()
  c.model.image = ml_collections.ConfigDict()
  c.model.image.depth = 50  # 50, 101, 152 (or 14 / 26 for tests and demos)
  c.model.image.width = 64  # channels of the first stage; 64 gives the 2048-d ResNet output
  c.model.image.stride_variant = "v1"  # v1: MSRA/Keras/MatConvNet; v1.5: torchvision
  c.model.image.bn_epsilon = 1e-5
  # The stem max pool's (top, bottom, left, right) padding: (1, 1, 1, 1) Keras/torchvision,
  # (0, 1, 0, 1) MatConvNet/Caffe; a backbone directory records its own (backbone.py).
  c.model.image.stem_pool_pad = (1, 1, 1, 1)
  c.model.text = ml_collections.ConfigDict()
  c.model.text.vocab_size = 20000  # the data pipeline sets this from the saved vocabulary
  c.model.text.max_len = 32
  c.model.text.word_dim = 300
  # Original [3,4,6,1]; the paper's text says ResNet-50's [3,4,6,3].
  c.model.text.blocks = (3, 4, 6, 1)
  c.model.text.widths = (256, 512, 1024, 2048)  # output width of each stage
  c.model.text.first_mids = (128, 512, 1024, 2048)  # bottleneck width of each stage's 1st block
  c.model.text.strides = (1, 2, 2, 1)
  c.model.text.bottleneck_ratio = 4  # later blocks: width -> width / ratio -> width
  c.model.text.pooling = "max"
  # BatchNorm epsilon of the text CNN, and of both heads (model.head_bn_epsilon): the authors'
  # 1e-3, the default of their own BatchNorm class (matlab/+dagnn/BatchNorm.m in
  # layumi/Image-Text-Embedding), which every BN their network files create has; the ImageNet
  # ResNet keeps its own (model.image.bn_epsilon). Runs recorded before this field: 1e-5.
  c.model.text.bn_epsilon = 1e-3
  c.model.embed_dim = 2048
  c.model.image_head_layers = 2  # original: fc-BN-ReLU twice on images, once on text
  c.model.text_head_layers = 1
  c.model.head_bn_epsilon = 1e-3  # as model.text.bn_epsilon
  c.model.dropout = 0.75  # drop probability
  c.model.w_share_init_scale = 0.1  # W_share = He init x 0.1, as in the original
  # W_share's bias: the authors' Flickr30k and CUHK-PEDES models have one, their MSCOCO model
  # not (fc_img / fc_txt, hasBias false); an imported model sets it from its graph.
  c.model.w_share_bias = True
  c.model.bn_momentum = 0.9
  # How W_share (and its momentum) lie on the device mesh: "classes" splits its classes over
  # every device (memory / device count; the softmax is completed with collectives),
  # "replicated" keeps a copy on each. A layout, not a model: checkpoints move between them.
  c.model.w_share_sharding = "classes"

  c.loss = ml_collections.ConfigDict()
  # (rank, visual instance, textual instance), eq. 9, on losses averaged over the global batch
  # (instance: over samples; rank: mean over image anchors + mean over text anchors). The
  # original code's derOutputs weights (l1, l2, l3) are (l1 / 2, l2, l3) here: MatConvNet sums
  # vl_nnloss over the B samples and RankLoss.m over the B/2 anchor pairs (both directions), and
  # cnn_train_dag divides every gradient by B, so its instance terms are means and its ranking
  # term is half of ours. E.g. its MSCOCO script's 2/1/0.1 is (1.0, 1.0, 0.1) here. Configs use
  # the paper's (0, 1, 1) and (1, 1, 1), not an original script's.
  c.loss.lambdas = (0.0, 1.0, 1.0)
  # The ranking term (lambdas[0]): "triplet" (eq. 4's hinge, with `margin` and `negatives`),
  # "infonce" (CLIP, Radford et al. 2021) or "sigmoid" (SigLIP, Zhai et al. 2023), both over the
  # global batch with a learned temperature (params `contrastive/log_scale`, and SigLIP's
  # `contrastive/bias`), in their own learning-rate group (optim.lr_mult.contrastive).
  c.loss.ranking = "triplet"
  c.loss.margin = 1.0
  c.loss.negatives = "hardest"
  c.loss.num_mined = 256  # candidate captions per step in "mined" mode
  # The papers' starts: CLIP's temperature 0.07 (logit scale 1/0.07), SigLIP's scale 10 and
  # bias -10. CLIP clips the scale at 100; applied to both.
  c.loss.infonce_log_scale_init = math.log(1 / 0.07)
  c.loss.sigmoid_log_scale_init = math.log(10.0)
  c.loss.sigmoid_bias_init = -10.0
  c.loss.max_log_scale = math.log(100.0)

  c.freeze_backbone = True  # Stage I
  c.backbone_bn = "running"

  c.init_from = ""  # Stage II: Stage I's workdir (its newest checkpoint's variables)
  # A backbone directory (instance_loss_jax.backbone): ImageNet weights for a fresh run's image
  # branch; its input convention (channel order, mean, std) replaces data.mean_rgb/std_rgb/bgr.
  c.backbone_init = ""
  # TensorBoard's event files: "" = WORKDIR/tensorboard. (TensorFlow writes them through its own
  # file systems, gs:// included.)
  c.tensorboard_dir = ""
  # (first, last): a jax.profiler trace of these steps on process 0, written beside the run's
  # TensorBoard events (its Profile tab). () for none. From step 2 on: the first holds the
  # compile.
  c.profile_steps = ()
  c.checkpoint_every = 1000  # steps; also at the end
  c.keep_checkpoints = 3
  # Orbax's OCDBT layout: one small database per process instead of a file set per array (fewer,
  # larger objects: the fast path on GCS). Readers take either. False for a store that lacks
  # what it needs (e.g. object generations on downloads, which gcp-storage-emulator omits).
  c.checkpoint_ocdbt = True
  # Seconds that a checkpoint's save or restore (TensorStore, under Orbax) and the writer claim
  # keep retrying an object store that fails (429, 5xx, a reset) before the run stops with one
  # line, its written checkpoints intact; the waits grow from 1 s to 32 s. (TensorStore's own
  # default: 32 retries, about 15 minutes.) Other clients keep their own: docs/training.md.
  c.storage_retry_s = STORAGE_RETRY_S
  c.log_every = 50

  c.eval = ml_collections.ConfigDict()
  c.eval.at_end = True  # evaluate eval.split when training ends
  # Every N steps (and at the last), evaluate eval.val_split from memory: metrics and figures to
  # TensorBoard, a checkpoint saved with them; the best by rsum is kept beside the newest.
  # 0: no evaluation during training.
  c.eval.every_steps = 0
  c.eval.val_split = "val"
  c.eval.final_checkpoint = "best"  # the end's evaluation: "best" (by val rsum) or "newest"
  c.eval.split = "test"
  c.eval.batch_size = 128
  c.eval.flip_average = True  # image feature = mean of the image's and its mirror's
  c.eval.text_shift_sum = False  # caption feature = sum over all shift offsets (original code)
  # What is summed over those views before the L2 normalisation: "original" (the last
  # BatchNorm's raw output, before the ReLU, as the original's test scripts; docs/design.md,
  # Evaluation) or "after_relu" (each view's head output after its last ReLU, normalised). On
  # the demo, "original" gave rsum +12 to +33 over "after_relu" in each of 3 seeds (RESULTS.md).
  c.eval.features = "original"
  c.eval.block_bytes = 256 << 20  # similarity block size: bounds eval memory
  c.eval.coco_1k_folds = 0  # MSCOCO: 5 (the 1K protocol beside 5K)
  # Captions scored per image: each image's first N in the file's order, as the field's
  # Flickr30k and MSCOCO figures (VSE++, SCAN: MSCOCO's Karpathy test split has images with six
  # or seven sentences, scored five). 0: every caption. Person retrieval (CUHK-PEDES) scores
  # every caption whatever this says. Training always reads every caption.
  c.eval.captions_per_image = 5
  # Queries of each kind (best, worst text->image) on the evaluation's HTML page; 0: no page.
  c.eval.gallery_queries = 4
  c.eval.s_bins = 100  # histogram bins over [-1, 1] for the separability indicator S

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.optim.weight_decay = 1e-4
  # Effective rate of a group = lr * multiplier (docs/design.md, from the original code).
  c.optim.lr_mult = ml_collections.ConfigDict(dict(
      backbone=0.02, word_embedding=0.001, text_cnn=0.1, heads=0.1, w_share=0.01,
      # The contrastive ranking term's temperature and bias (the heads' rate; not the
      # original's: it has no such parameter).
      contrastive=0.1))
  # ((epochs, lr factor), ...): piecewise constant; the run's length is the sum of the epochs.
  c.optim.schedule = ((240, 1.0),)
  # Steps of linear warmup into the schedule: step s (from 0) runs at (s + 1) / warmup_steps of
  # its rate until s + 1 = warmup_steps. 0: none (the paper's batch of 32 needs none).
  c.optim.warmup_steps = 0
  # The rates above are for a global batch of `reference_batch` (the paper's 32 on one GPU).
  # lr_batch_rule scales them for another batch_size: "none" (as written), "linear" (x
  # batch_size / reference_batch: Goyal et al. 2017, with a warmup), "sqrt" (x its square
  # root). docs/training.md says when to use which.
  c.optim.reference_batch = 32
  c.optim.lr_batch_rule = "none"
  return c


# Fields added after runs were recorded without them, with the value those runs were built and
# evaluated with: a run's config.json and its checkpoints' meta read as the run was trained
# (the text CNN's and heads' BatchNorm epsilon), embedded (after the heads' ReLU) and scored
# (every caption).
RECORDED_BEFORE = {"model.text.bn_epsilon": 1e-5, "model.head_bn_epsilon": 1e-5,
                   "eval.features": "after_relu", "eval.captions_per_image": 0,
                   "loss.ranking": "triplet", "data.pseudo_classes": 0}


def with_recorded_defaults(recorded: dict[str, Any]) -> dict[str, Any]:
  """`recorded` (a run's config as a dict, or a checkpoint meta: both hold `model`) with each
  field of RECORDED_BEFORE that it lacks set to the value its run was built with."""
  for key, value in RECORDED_BEFORE.items():
    node, *parents, leaf = [recorded] + key.split(".")
    for p in parents:
      node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict) and leaf not in node:
      node[leaf] = value
  return recorded


def set_stage(c: ml_collections.ConfigDict, stage: str | int) -> ml_collections.ConfigDict:
  """Applies the paper's stage defaults: Stage I frozen backbone, instance loss only (lambdas
  0, 1, 1); Stage II everything trains, ranking loss on (1, 1, 1). `stage`: 1, 2, "stage1"..."""
  stage = int(str(stage).lower().removeprefix("stage"))
  if stage not in STAGES:
    raise ConfigError(f"stage {stage!r}: 1 or 2 (e.g. --config=configs/flickr30k.py:stage1)")
  c.stage = stage
  c.freeze_backbone = stage == 1
  c.backbone_bn = "running" if stage == 1 else "train"
  c.loss.lambdas = (0.0, 1.0, 1.0) if stage == 1 else (1.0, 1.0, 1.0)
  return c


def apply_overrides(c: ml_collections.ConfigDict,
                    overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted fields in place ({"model.text.max_len": 8}); an unknown field is a KeyError."""
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(f"unknown config field {key!r}")
    node[leaf] = value
  return c


def load_config(spec: str, overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """A config file's `get_config(ARG)` from "path.py[:ARG]", loaded as the binaries' --config
  flag loads it (ml_collections' parser), with dotted `overrides` applied (unknown fields are
  errors). The one loader of binaries, benchmarks and tests."""
  try:
    config = ConfigFileFlagParser(name="config", lock_config=False).parse(spec)
  except ValueError as e:  # get_config's own errors, re-raised by the parser with a traceback
    raise ConfigError(f"{spec}: {str(e).strip().splitlines()[-1]}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{spec}: no config file there (or get_config returned nothing)")
  try:
    return apply_overrides(config, overrides or {})
  except KeyError as e:
    raise ConfigError(str(e).strip("'\"")) from None


def input_convention(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """What the image branch's weights expect of its input pixels (recorded in checkpoints)."""
  return dict(mean_rgb=[float(x) for x in c.data.mean_rgb],
              std_rgb=[float(x) for x in c.data.std_rgb], bgr=bool(c.data.bgr))


def with_input_convention(c: ml_collections.ConfigDict,
                          convention: dict[str, Any]) -> ml_collections.ConfigDict:
  c = c.copy_and_resolve_references()
  with c.unlocked():
    c.data.mean_rgb = tuple(convention["mean_rgb"])
    c.data.std_rgb = tuple(convention["std_rgb"])
    c.data.bgr = bool(convention["bgr"])
  return c


# The fields that name files or directories (local, or an object store's URIs).
PATH_FIELDS = ("data.json", "data.image_root", "data.tfds_data_dir", "data.word2vec",
               "init_from", "backbone_init", "tensorboard_dir")


def run_config(c: ml_collections.ConfigDict, vocab_size: int, num_classes: int,
               convention: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """The config as the model is built, resolved in this one place for the trainer and the
  evaluation: vocabulary size and class count from the data, the input convention (channel
  order, mean, std) the image branch's weights were trained with, when known, and each local
  path made absolute (the run's config.json, which the trainer records with
  `checkpoint.write_config`, then reads the same files from any folder)."""
  c = c.copy_and_resolve_references()
  with c.unlocked():
    c.model.text.vocab_size = vocab_size
    c.num_classes = num_classes
    for key in PATH_FIELDS:
      *parents, leaf = key.split(".")
      node = functools.reduce(getattr, parents, c)
      if node[leaf]:
        node[leaf] = paths.absolute(node[leaf])
  return with_input_convention(c, convention) if convention else c


def _flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in cfg.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flatten(value, path + "."))
    else:
      out[path] = value
  return out


def as_flags(cfg: ml_collections.ConfigDict) -> str:
  """Every field as the flag that sets it, `FIELD=VALUE` a line in the config's order, what
  `--print_config` shows: each line works as `--config.FIELD=VALUE` (quote it for the shell)."""
  def as_tuples(value):  # a run's recorded config holds JSON's lists
    return tuple(as_tuples(v) for v in value) if isinstance(value, list) else value

  lines = ["# Every field, as --config.FIELD=VALUE sets it; what each one means: the comments of",
           "# instance_loss_jax/config.py (base_config) and docs/design.md."]
  lines += [f"{key}={as_tuples(value)!r}" for key, value in _flatten(cfg).items()]
  return "\n".join(lines)


def unknown_keys(cfg: ml_collections.ConfigDict,
                 reference: ml_collections.ConfigDict | None = None) -> list[str]:
  """Dotted paths in `cfg` that the schema does not have (typos, stale fields)."""
  known = _flatten(reference if reference is not None else base_config())
  known_prefixes = {p.rsplit(".", 1)[0] for p in known if "." in p}
  return sorted(p for p in _flatten(cfg) if p not in known and p not in known_prefixes)


def uses_mined_negatives(cfg: ml_collections.ConfigDict) -> bool:
  """Whether the step ranks against mined negatives, so that each batch carries a candidate
  pool (`mined_tokens`, `mined_labels`): the ranking term is on and its negatives are mined.
  The one rule the pipeline, the batch check and the step read."""
  return (float(cfg.loss.lambdas[0]) > 0 and cfg.loss.ranking == "triplet"
          and cfg.loss.negatives == "mined")


def frozen_scopes(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The top-level modules that do not train: the one declaration of Stage I's freezing.

  The optimiser labels their parameters FROZEN (no update), the model stops the gradient at
  their output (no backward pass through them), and the train step keeps their parameters and
  BN statistics bit-identical. `cfg.freeze_backbone` is the switch.
  """
  return ("backbone",) if cfg.freeze_backbone else ()


def float32_parts(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """cfg.float32_parts as names: `--config.float32_parts=w_share,heads` arrives as one string."""
  return tuple(p.strip() for item in cfg.float32_parts for p in str(item).split(",") if p.strip())


# Fields whose values are sequences of pairs: the form a user writes, shown when it is wrong.
PAIR_SEQUENCES = {"optim.schedule": "((epochs, lr factor), ...), e.g. '((20, 1.0), (10, 0.1))'"}


def _form_problems(key: str, value: Any, want: Any) -> list[str]:
  """What is wrong with the form of `key`'s value against the base config's `want` (its type):
  a sequence where a sequence belongs, pairs of numbers in PAIR_SEQUENCES, numbers and
  booleans of their kind. [] when it has the right form."""
  number = (int, float)
  if key in PAIR_SEQUENCES:
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(
            isinstance(x, number) and not isinstance(x, bool) for x in p) for p in value)
    return [] if ok else [f"{key}={value!r}: expected {PAIR_SEQUENCES[key]} (a one-phase "
                          "schedule needs the trailing comma: '((20, 1.0),)')"]
  if isinstance(want, (list, tuple)):
    return [] if isinstance(value, (list, tuple)) else [
        f"{key}={value!r}: expected a tuple like {tuple(want)!r}"]
  if isinstance(want, bool):
    return [] if isinstance(value, bool) else [f"{key}={value!r}: expected True or False"]
  if isinstance(want, number):
    return [] if isinstance(value, number) and not isinstance(value, bool) else [
        f"{key}={value!r}: expected a number like {want!r}"]
  if isinstance(want, str):
    return [] if isinstance(value, str) else [f"{key}={value!r}: expected a string"]
  return []


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError listing every problem found, or returns None."""
  problems = []
  extra = unknown_keys(cfg)
  if extra:
    problems.append(f"unknown config keys: {', '.join(extra)}")
  flat = _flatten(cfg)
  reference = _flatten(base_config())
  missing = sorted(set(reference) - set(flat))
  if missing:
    problems.append(f"missing config keys: {', '.join(missing)}")
  problems += [p for key, want in reference.items() if key in flat
               for p in _form_problems(key, flat[key], want)]
  if problems:
    raise ConfigError("; ".join(problems))

  def check(ok, msg):
    if not ok:
      problems.append(msg)

  m, t, loss, opt = cfg.model, cfg.model.text, cfg.loss, cfg.optim
  check(cfg.stage in STAGES, f"stage={cfg.stage!r}: must be 1 or 2")
  check(cfg.batch_size >= 1, f"batch_size={cfg.batch_size}: must be >= 1")
  check(cfg.storage_retry_s > 0, f"storage_retry_s={cfg.storage_retry_s}: must be > 0")
  profile = tuple(cfg.profile_steps)
  # 2 at least: the first step holds the compile, and clu's Profile starts its trace after the
  # step before `first`.
  check(not profile or (len(profile) == 2 and 2 <= profile[0] <= profile[1]),
        f"profile_steps={profile}: () or (first, last) with 2 <= first <= last")
  check(cfg.data.prefetch >= 1 and cfg.data.device_prefetch >= 0,
        f"data.prefetch={cfg.data.prefetch}, data.device_prefetch={cfg.data.device_prefetch}: "
        "need >= 1 and >= 0")
  check(cfg.compute_dtype in COMPUTE_DTYPES,
        f"compute_dtype={cfg.compute_dtype!r}: one of {COMPUTE_DTYPES}")
  check(cfg.eval.features in EVAL_FEATURES,
        f"eval.features={cfg.eval.features!r}: one of {EVAL_FEATURES}")
  unknown_parts = sorted(set(float32_parts(cfg)) - set(FLOAT32_PARTS))
  check(not unknown_parts, f"float32_parts: unknown {unknown_parts}; any of {FLOAT32_PARTS}")
  check(cfg.num_classes >= 0, f"num_classes={cfg.num_classes}: >= 0 (0: from the data)")
  check(m.image.stride_variant in STRIDE_VARIANTS,
        f"model.image.stride_variant={m.image.stride_variant!r}: one of {STRIDE_VARIANTS}")
  check(len(m.image.stem_pool_pad) == 4 and all(0 <= p <= 2 for p in m.image.stem_pool_pad),
        f"model.image.stem_pool_pad={tuple(m.image.stem_pool_pad)}: (top, bottom, left, right), "
        "each 0, 1 or 2 (the pool is 3x3)")
  check(m.image.depth in STAGE_SIZES,
        f"model.image.depth={m.image.depth}: one of {sorted(STAGE_SIZES)}")
  lengths = {len(t.blocks), len(t.widths), len(t.first_mids), len(t.strides)}
  check(len(lengths) == 1, "model.text.blocks, widths, first_mids and strides must have the "
        f"same length (got {len(t.blocks)}, {len(t.widths)}, {len(t.first_mids)}, "
        f"{len(t.strides)})")
  check(t.pooling in POOLINGS, f"model.text.pooling={t.pooling!r}: one of {POOLINGS}")
  check(t.max_len >= 1 and t.vocab_size >= 2,
        f"model.text.max_len={t.max_len}, vocab_size={t.vocab_size}: need >= 1 and >= 2")
  check(m.w_share_sharding in W_SHARE_SHARDINGS,
        f"model.w_share_sharding={m.w_share_sharding!r}: one of {W_SHARE_SHARDINGS}")
  check(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout}: a drop probability in [0, 1)")
  check(m.image_head_layers >= 1 and m.text_head_layers >= 1,
        "model.image_head_layers and text_head_layers must be >= 1")

  lambdas = tuple(loss.lambdas)
  if len(lambdas) != 3:
    problems.append(f"loss.lambdas={lambdas}: need 3 weights (rank, visual, textual)")
  else:
    check(all(math.isfinite(x) and x >= 0 for x in lambdas) and any(x > 0 for x in lambdas),
          f"loss.lambdas={lambdas}: finite, >= 0 and not all zero")
  check(loss.ranking in RANKING_LOSSES,
        f"loss.ranking={loss.ranking!r}: one of {RANKING_LOSSES}")
  check(loss.negatives in NEGATIVE_MODES,
        f"loss.negatives={loss.negatives!r}: one of {NEGATIVE_MODES}")
  check(loss.margin > 0, f"loss.margin={loss.margin}: must be > 0")
  check(cfg.backbone_bn in BACKBONE_BN_MODES,
        f"backbone_bn={cfg.backbone_bn!r}: one of {BACKBONE_BN_MODES}")
  check(not (cfg.freeze_backbone and cfg.backbone_bn == "train"),
        "freeze_backbone=True with backbone_bn='train' would change the frozen backbone's "
        "BN statistics; use 'running' or 'batch'")
  check(cfg.freeze_backbone or cfg.backbone_bn == "train",
        f"freeze_backbone=False needs backbone_bn='train' (got {cfg.backbone_bn!r})")
  check(all(v >= 0 for v in opt.lr_mult.values()), "optim.lr_mult values must be >= 0")
  check(opt.warmup_steps >= 0, f"optim.warmup_steps={opt.warmup_steps}: must be >= 0")
  check(opt.lr_batch_rule in LR_BATCH_RULES,
        f"optim.lr_batch_rule={opt.lr_batch_rule!r}: one of {LR_BATCH_RULES}")
  check(opt.reference_batch >= 1, f"optim.reference_batch={opt.reference_batch}: must be >= 1")
  check(len(opt.schedule) >= 1 and all(len(p) == 2 and p[0] > 0 for p in opt.schedule),
        f"optim.schedule={opt.schedule}: ((epochs > 0, lr factor), ...)")
  check(cfg.eval.captions_per_image >= 0,
        f"eval.captions_per_image={cfg.eval.captions_per_image}: >= 0 (0: every caption)")
  check(cfg.eval.every_steps >= 0, f"eval.every_steps={cfg.eval.every_steps}: >= 0 (0: off)")
  check(cfg.eval.final_checkpoint in ("best", "newest"),
        f"eval.final_checkpoint={cfg.eval.final_checkpoint!r}: 'best' or 'newest'")
  d = cfg.data
  check(d.format in DATA_FORMATS, f"data.format={d.format!r}: one of {DATA_FORMATS}")
  check(d.pseudo_classes >= 0 and d.pseudo_classes_iterations >= 1,
        f"data.pseudo_classes={d.pseudo_classes}, data.pseudo_classes_iterations="
        f"{d.pseudo_classes_iterations}: need >= 0 and >= 1")
  check(not d.pseudo_classes or cfg.backbone_init or cfg.init_from,
        f"data.pseudo_classes={d.pseudo_classes} clusters the frozen backbone's pool5 features: "
        "set backbone_init (a backbone directory), or init_from a run that has them")
  check(d.tokenizer in TOKENIZERS, f"data.tokenizer={d.tokenizer!r}: one of {TOKENIZERS}")
  check(len(d.crop_area) == 2 and 0 < d.crop_area[0] <= d.crop_area[1] <= 1,
        f"data.crop_area={d.crop_area}: (low, high) with 0 < low <= high <= 1")
  check(len(d.crop_aspect) == 2 and 0 < d.crop_aspect[0] <= d.crop_aspect[1],
        f"data.crop_aspect={d.crop_aspect}: (low, high) with 0 < low <= high")
  check(len(d.mean_rgb) == 3 and len(d.std_rgb) == 3 and all(s > 0 for s in d.std_rgb),
        "data.mean_rgb and data.std_rgb: 3 values each, std > 0")
  if problems:
    raise ConfigError("invalid config: " + "; ".join(problems))
