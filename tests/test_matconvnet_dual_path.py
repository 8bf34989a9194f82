"""The authors' dual-path DagNN (layumi/Image-Text-Embedding, resnet52_new_hope_word2_pool.m),
written here with small sizes and random weights in `saveobj`'s layout, read into DualPath's
variables by walking the graph, and compared with the numpy DagNN executor of
test_matconvnet.py on images and one-hot sentences (unknown words and padding included)."""

import jax
import numpy as np
import pytest

from helpers import tiny_config
from instance_loss_jax import matconvnet
from instance_loss_jax.errors import BackboneError
from instance_loss_jax.matconvnet import dual_path
from instance_loss_jax.models import build_model

import os

from test_matconvnet import DagBuilder, dagnn_resnet, run_dagnn, save_v5, save_v73
from test_training import data_dir  # noqa: F401  (a fixture)

VOCAB, WORD_DIM, CLASSES, EMBED, MAX_LEN = 30, 12, 7, 48, 16
TEXT = dict(blocks=(1, 2, 1, 1), widths=(16, 32, 32, 64), first_mids=(8, 32, 32, 64),
            strides=(1, 2, 2, 1), ratio=4)


# Their BatchNorm class (matlab/+dagnn/BatchNorm.m of layumi/Image-Text-Embedding) defaults to
# epsilon 1e-3: every BN of their network files has it; the ImageNet ResNet's keep 1e-5.
AUTHORS_EPSILON = 1e-3


def authors_model(rng, image_head_layers=2, vocab=VOCAB, classes=CLASSES, share_bias=True,
                  epsilons=None):
  """Their Stage I graph: Caffe ResNet (depth 14, width 4, BN epsilon 1e-5) to pool5, image
  head (fc1, fc1_1), the text CNN over a one-hot `data2`, its head (fc5_2), and W_share shared
  by fc_img and fc_txt (params fcsharef, fcshareb). Their BNs have epsilon 1e-3, or
  `epsilons[name]` for the BN layers it names."""
  net = dagnn_resnet(14, 4, rng)
  net["layers"] = [e for e in net["layers"] if e["name"] not in ("fc1000", "prob")]
  net["params"] = [p for p in net["params"] if not p["name"].startswith("fc1000")]
  build = DagBuilder(rng, net["layers"], net["params"])
  param, layer, conv, relu, dropout = (build.param, build.layer, build.conv, build.relu,
                                       build.dropout)

  def bn(name, x, c, mult=(0.5, 1.5)):
    # sigmas from 0.1: an epsilon of 1e-3 converted wrongly (var = sigma^2 - 1e-5) moves a
    # feature by up to 1e-3 / 0.1^2 / 2 = 5%.
    return build.bn(name, x, c, mult, sigma=(0.1, 1.5),
                    epsilon=(epsilons or {}).get(name, AUTHORS_EPSILON))

  # Image head: pool5 (128 channels) -> fc1 -> ... -> dropout.
  x, cin = "pool5", 128
  for i in range(image_head_layers):
    tag = "fc1" if i == 0 else f"fc1_{i}"
    x = relu(f"{tag}x", bn(f"{tag}bn", conv(tag, x, [1, 1, cin, EMBED]), EMBED))
    cin = EMBED
  image_out = dropout("dropout", x)
  # Text: the embedding as a 1x1 conv with bias over the one-hot input, its BN, the blocks.
  x = bn("fc2bn", conv("fc2", "data2", [1, 1, vocab, WORD_DIM], bias=True), WORD_DIM)
  cin = WORD_DIM
  for s, blocks in enumerate(TEXT["blocks"]):
    width = TEXT["widths"][s]
    for b in range(blocks):
      tag = f"t{s + 1}_{b + 1}"
      stride = TEXT["strides"][s] if b == 0 else 1
      mid = TEXT["first_mids"][s] if b == 0 else width // TEXT["ratio"]
      shortcut = x
      if b == 0:
        shortcut = bn(f"{tag}bbn", conv(f"{tag}b", x, [1, 1, cin, width], stride), width)
      y = relu(f"{tag}_1x", bn(f"{tag}_1bn", conv(f"{tag}_1", x, [1, 1, cin, mid]), mid))
      y = relu(f"{tag}_2x", bn(f"{tag}_2bn", conv(f"{tag}_2", y, [1, 2, mid, mid], stride,
                                                  (0, 0, 1, 0)), mid))
      y = bn(f"{tag}_3bn", conv(f"{tag}_3", y, [1, 1, mid, width]), width, mult=(0.1, 0.4))
      x = relu(f"{tag}x", layer(f"{tag}sum", "Sum", [shortcut, y], [f"{tag}sum"], [], {}))
      cin = width
  pooled = MAX_LEN // int(np.prod(TEXT["strides"]))
  x = layer("fc5_1", "Pooling", [x], ["fc5_1bnx"], [], dict(
      method="max", poolSize=np.array([1.0, pooled]), pad=np.zeros(4), stride=np.ones(2),
      opts=["cuDNN"]))
  x = relu("fc5_2x", bn("fc5_2bn", conv("fc5_2", x, [1, 1, cin, EMBED]), EMBED))
  text_out = dropout("dropout2", x)
  share = [param("fcsharef", rng.normal(0, 0.05, (1, 1, EMBED, classes)))]
  if share_bias:  # their MSCOCO model has none
    share.append(param("fcshareb", rng.normal(0, 0.1, classes)))
  conv("fc_img", image_out, [1, 1, EMBED, classes], bias=share_bias, names=share)
  conv("fc_txt", text_out, [1, 1, EMBED, classes], bias=share_bias, names=share)
  for pred, label in (("fc_img", "label_img"), ("fc_txt", "label_txt")):
    layer(f"softmaxloss_{pred}", "Loss", [pred, label], [f"objective_{pred}"], [],
          dict(loss="softmaxlog", opts=[]))
  net["vars"] = [dict(name=n, precious=False) for n in sorted(
      {v for e in net["layers"] for v in e["inputs"] + e["outputs"]})]
  return net


def our_model(facts):
  config = tiny_config(num_classes=facts["num_classes"], **{
      f"model.image.{k}": tuple(v) if isinstance(v, list) else v
      for k, v in facts["image"].items()}, **{
      f"model.text.{k}": v for k, v in facts["text"].items()}, **{
      "model.text.max_len": facts["max_len"], "model.embed_dim": facts["embed_dim"],
      "model.image_head_layers": facts["image_head_layers"],
      "model.text_head_layers": facts["text_head_layers"], "model.dropout": facts["dropout"],
      "model.head_bn_epsilon": facts["head_bn_epsilon"],
      "model.w_share_bias": facts["w_share_bias"], "image_size": 64})
  return build_model(config)


def one_hot(tokens, vocab=VOCAB):
  """[N, L] indices (0 = padding, k + 1 = dictionary word k) -> MatConvNet's [N, 1, L, V]."""
  out = np.zeros(tokens.shape + (vocab,), np.float32)
  for (n, j), t in np.ndenumerate(tokens):
    if t:
      out[n, j, t - 1] = 1.0
  return out[:, None]


@pytest.mark.parametrize("save,share_bias,epsilons", [
    (save_v5, True, None), (save_v73, False, None),
    # Not theirs: one text BN and one head BN at another epsilon; each converts exactly, and
    # the model takes the smallest of each part.
    (save_v5, True, {"t2_2_2bn": 1e-5, "fc1bn": 1e-2})], ids=["v5", "v7.3-mscoco", "mixed"])
def test_authors_model_gives_their_features(save, share_bias, epsilons, tmp_path):
  rng = np.random.default_rng(0)
  net = authors_model(rng, share_bias=share_bias, epsilons=epsilons)
  path = str(tmp_path / "net-epoch-1.mat")
  save(path, {"net": net, "state": {"epoch": 1.0}})  # a training snapshot: the DagNN in `net`
  variables, facts, unused = dual_path.dual_path_variables(matconvnet.read_dagnn(path))
  assert unused == []
  assert facts["image"] == dict(depth=14, width=4, stride_variant="v1", bn_epsilon=1e-5,
                                stem_pool_pad=[0, 1, 0, 1])
  assert facts["text"] == dict(blocks=TEXT["blocks"], widths=TEXT["widths"],
                               first_mids=TEXT["first_mids"], strides=TEXT["strides"],
                               bottleneck_ratio=4, vocab_size=VOCAB + 1, word_dim=WORD_DIM,
                               pooling="max", bn_epsilon=1e-5 if epsilons else 1e-3)
  assert facts["head_bn_epsilon"] == 1e-3
  assert (facts["embed_dim"], facts["num_classes"], facts["max_len"], facts["dropout"],
          facts["w_share_bias"]) == (EMBED, CLASSES, MAX_LEN, 0.75, share_bias)
  model = our_model(facts)
  # Sentences of different lengths, with padding; index 0 never hits a dictionary column.
  tokens = rng.integers(1, VOCAB + 1, (3, MAX_LEN))
  tokens[0, 9:] = 0
  tokens[1, 2:] = 0
  images = rng.normal(0, 50, (2, 64, 64, 3)).astype(np.float32)
  text = np.asarray(jax.jit(lambda v, t: model.apply(v, t, method=model.text_features))(
      variables, tokens))
  image = np.asarray(jax.jit(lambda v, x: model.apply(v, x, method=model.image_features))(
      variables, images))
  want_text = run_dagnn(net, one_hot(tokens), "fc5_2x", input_name="data2").reshape(3, -1)
  want_image = run_dagnn(net, images, "fc1_1x").reshape(2, -1)
  for ours, theirs in ((image, want_image), (text, want_text)):
    cosine = np.sum(ours * theirs, 1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs,
                                                                                       axis=1)
    assert cosine.min() >= 0.9999, cosine
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
  # W_share: the shared prediction layer, applied to the features as their fc_img does.
  logits = np.asarray(model.apply(variables, image, method=model.classify))
  np.testing.assert_allclose(logits, run_dagnn(net, images, "fc_img").reshape(2, -1),
                             rtol=1e-4, atol=1e-4)


def test_what_is_not_the_authors_model_is_named(tmp_path):
  rng = np.random.default_rng(1)
  save_v5(str(tmp_path / "resnet.mat"), dagnn_resnet(14, 4, rng))
  with pytest.raises(BackboneError, match=r"not a dual-path model: no input data2"):
    dual_path.dual_path_variables(matconvnet.read_dagnn(str(tmp_path / "resnet.mat")))
  net = authors_model(rng)
  for entry in net["layers"]:
    if entry["name"] == "fc_txt":
      entry["params"] = ["fcsharef_t", "fcshareb"]
  net["params"].append(dict(name="fcsharef_t", value=np.zeros((1, 1, EMBED, CLASSES),
                                                             np.float32),
                            learningRate=1.0, weightDecay=1.0))
  save_v73(str(tmp_path / "unshared.mat"), net)
  with pytest.raises(BackboneError, match=r"fc_img and fc_txt do not share one weight \(and bias\)"):
    dual_path.dual_path_variables(matconvnet.read_dagnn(str(tmp_path / "unshared.mat")))


@pytest.mark.slow  # an import, an export, a Stage II run
def test_imported_run_exports_searches_and_starts_stage2(data_dir, tmp_path):
  import json
  from instance_loss_jax import trainer
  from instance_loss_jax.workdir import checkpoint
  from instance_loss_jax.cli import import_matconvnet
  from instance_loss_jax.data import records as records_lib
  from instance_loss_jax.index import Index
  from test_training import small_config
  # Their dictionary: the synthetic captions' words (so that Stage II trains on that data),
  # plus a capitalised one; word k is one-hot column k.
  with open(f"{data_dir}/dataset.json") as f:
    sentences = [s["raw"] for im in json.load(f)["images"] for s in im["sentences"]]
  split = records_lib.tokenizer(small_config("stage1", data_dir, **{
      "data.tokenizer": "original"}).data)
  words = sorted({w for s in sentences for w in split(s)}) + ["Circle"]
  num_train = sum(1 for r in records_lib.read_split(small_config("stage1", data_dir), "train"))
  rng = np.random.default_rng(7)
  # As their MSCOCO model: no W_share bias (model.w_share_bias=False through Stage II's mesh).
  net = authors_model(rng, vocab=len(words), classes=num_train, share_bias=False)
  save_v73(str(tmp_path / "net-epoch-9.mat"), {"net": net})
  save_v5(str(tmp_path / "dictionary.mat"), {"subset": {"names": words,
                                                        "features": np.zeros((3, len(words)))}})
  workdir = str(tmp_path / "imported")
  config = small_config("stage2", data_dir)
  done = import_matconvnet.import_run(str(tmp_path / "net-epoch-9.mat"),
                                      str(tmp_path / "dictionary.mat"), workdir, config)
  assert done["words"] == len(words) and done["unused"] == []
  assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json", "vocab.json"]
  # Export: sentence embeddings (the original tokenizer: "circle" is not "Circle") against
  # their graph, L2-normalised, at the feature the run evaluates (eval.features).
  queries = ["two small red circles", "Circle and a blue square", "a unknownword circle"]
  index = Index.from_run(workdir, captions=_write_lines(tmp_path / "q.txt", queries),
                         dtype="float32")
  run_config = checkpoint.read_config(workdir)
  var = "fc5_2bn" if run_config.eval.features == "original" else "fc5_2x"
  index_of = {w: i + 1 for i, w in enumerate(words)}
  tokens = np.zeros((3, MAX_LEN), np.int64)
  for n, q in enumerate(queries):
    known = [index_of[w] for w in split(q) if w in index_of][:MAX_LEN]
    tokens[n, :len(known)] = known
  want = run_dagnn(net, one_hot(tokens, len(words)), var, input_name="data2").reshape(3, -1)
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  cosine = np.sum(index.embeddings * want, 1) / np.linalg.norm(index.embeddings, axis=1)
  assert cosine.min() >= 0.9999, cosine
  from instance_loss_jax.inference import load_run
  _, unknown = load_run(workdir).embed_sentences(["CIRCLE Circle circle"])
  assert unknown == [["CIRCLE"]]  # case kept, as their dictionary lookup
  # The evaluation binary's function reads it like one of our runs.
  from instance_loss_jax.evaluation import evaluator
  from_graph = import_matconvnet.config_overrides(done["facts"])
  figures = evaluator.evaluate(small_config("stage2", data_dir, **from_graph,
                                            **{"image_size": 64}), workdir, "test")
  assert figures["step"] == 0 and figures["num_captions"] == 5 * figures["num_images"] > 0
  assert {"rsum", "i2t_r1", "t2i_r10", "S"} <= set(figures["metrics"])
  # Stage II starts from the imported run, trains and evaluates.
  config2 = small_config("stage2", data_dir, init_from=workdir, **from_graph,
                         **{"optim.schedule": ((1, 1.0),), "image_size": 64})
  results = trainer.train_and_evaluate(config2, str(tmp_path / "stage2"))
  assert np.isfinite(results["metrics"]["rsum"])
  with pytest.raises(BackboneError, match="exists; choose a new run directory"):
    import_matconvnet.import_run(str(tmp_path / "net-epoch-9.mat"),
                                 str(tmp_path / "dictionary.mat"), workdir, config)


def _write_lines(path, lines):
  path.write_text("\n".join(lines) + "\n")
  return str(path)
