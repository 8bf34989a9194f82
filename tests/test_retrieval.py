"""Export and search: blocked top-k against brute force, an index of a trained run that finds
the right scene, clear errors for unusable queries, the HTML page."""

import html.parser
import io
import json
import os
import shutil
import subprocess
import sys
import base64

import jax
import numpy as np
import pytest

from instance_loss_jax import Index, inference, sharding, trainer
from instance_loss_jax.workdir import checkpoint
from instance_loss_jax.data import records, synthetic
from instance_loss_jax.errors import RetrievalError
from helpers import xla_flags
from test_training import ROOT, load_config


@pytest.mark.parametrize("dtype,n,k,block", [("float32", 1000, 10, 128), ("float16", 300, 7, 300),
                                             ("float32", 5, 8, 2)])
def test_top_k_equals_numpy_brute_force(dtype, n, k, block):
  rng = np.random.default_rng(0)
  gallery_emb = rng.normal(size=(n, 16)).astype(dtype)
  queries = rng.normal(size=(7, 16)).astype(np.float32)
  scores, rows = inference.top_k(queries, gallery_emb, k, block_rows=block)
  full = queries @ gallery_emb.astype(np.float32).T
  want = np.argsort(-full, axis=1, kind="stable")[:, :k]
  found = min(k, n)
  np.testing.assert_array_equal(rows[:, :found], want)
  np.testing.assert_allclose(scores[:, :found], np.take_along_axis(full, want, 1), rtol=1e-5)
  assert (rows[:, found:] == -1).all() and np.isneginf(scores[:, found:]).all()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):  # the tests that use it are marked slow
  """configs/demo.py's Stage II, unchanged, on 160 synthetic scenes (128 for training), on one
  device (the demo model's step is 2.5x slower split over 8 CPU devices sharing 2 cores): enough
  to tell scenes apart."""
  data = str(tmp_path_factory.mktemp("scenes"))
  synthetic.generate(data, num_images=160, seed=1, image_size=64, w2v_dim=32, w2v_epochs=5)
  workdir = str(tmp_path_factory.mktemp("run"))
  config = load_config("demo", "stage2", {
      "data.json": os.path.join(data, "dataset.json"),
      "data.image_root": os.path.join(data, "images"),
      "data.word2vec": os.path.join(data, "word2vec.bin"),
      "eval.at_end": False, "checkpoint_every": 1000})
  trainer.train_and_evaluate(config, workdir, sharding.make_mesh(jax.local_devices()[:1]))
  return workdir, config


@pytest.mark.xdist_group("trained_run")
@pytest.mark.slow
def test_export_then_search_finds_the_right_scene(trained_run, tmp_path):
  workdir, config = trained_run
  index = Index.from_run(workdir, split="train", dtype="float32")
  assert index.kind == "images" and len(index.items) == 128
  path = index.save(str(tmp_path / "index"))
  loaded = Index.load(path)
  np.testing.assert_array_equal(loaded.embeddings, index.embeddings)
  assert loaded.items == index.items and loaded.run == index.run
  # Each training scene's first caption, typed as a sentence, searches the 128 scenes.
  found_at = []
  for rec in records.read_split(config, "train"):
    hits, unknown = loaded.search_text(" ".join(rec.captions[0]), k=128)
    assert not unknown and [h.rank for h in hits] == list(range(1, 129))
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    found_at.append([h.item for h in hits].index(rec.image_path) + 1)
  found_at = np.asarray(found_at)
  # Chance: R@5 = 5/128 = 3.9%, median rank 64.5. (This run: ~48% and 6.)
  assert np.mean(found_at <= 5) >= 0.25 and np.median(found_at) <= 16, found_at


@pytest.mark.xdist_group("trained_run")
@pytest.mark.slow
def test_captions_index_and_image_query(trained_run, tmp_path):
  workdir, config = trained_run
  lines = tmp_path / "sentences.txt"
  recs = records.read_split(config, "train")[:6]
  lines.write_text("\n".join(" ".join(r.captions[0]) for r in recs) + "\n\n")
  index = Index.from_run(workdir, captions=str(lines))
  assert index.kind == "captions" and len(index.items) == 6
  assert index.embeddings.dtype == np.float16
  hits = index.search_image(recs[0].image_path, k=3)
  assert len(hits) == 3 and hits[0].score >= hits[-1].score
  with pytest.raises(RetrievalError, match="an image query searches a caption index"):
    Index.from_run(workdir, split="test").search_image(recs[0].image_path)
  with pytest.raises(RetrievalError, match="a text query searches an image index"):
    index.search_text("a red circle")


@pytest.mark.xdist_group("trained_run")
@pytest.mark.slow
def test_unusable_queries_are_named(trained_run, tmp_path):
  workdir, _ = trained_run
  index = Index.from_run(workdir, split="test")
  hits, unknown = index.search_text("a red zebraphone and a circle", k=2)
  assert unknown == ["zebraphone"] and len(hits) == 2
  with pytest.raises(RetrievalError, match=r"none of its words \(qwerty, zxcv\)"):
    index.search_text("qwerty zxcv")
  with pytest.raises(RetrievalError, match="it has no word"):
    index.search_text("  ...  ")
  with pytest.raises(RetrievalError, match="not an index"):
    Index.load(str(tmp_path / "nothing"))
  with pytest.raises(RetrievalError, match="no JPEG or PNG file"):
    Index.from_run(workdir, images=str(tmp_path))
  # The run is read as inference.load_run reads it: a config the checkpoint was not trained
  # with is refused, naming the field, before anything is embedded.
  dim = checkpoint.read_config(workdir).model.embed_dim
  with pytest.raises(checkpoint.CheckpointError,
                     match=rf"run {workdir}: .* does not match this run: model\.embed_dim: "
                     rf"checkpoint {dim} vs run {dim + 1}"):
    Index.from_run(workdir, split="test", overrides={"model.embed_dim": dim + 1})


class _Page(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.images = []

  def handle_starttag(self, tag, attrs):
    if tag == "img":
      self.images.append(dict(attrs)["src"])


def check_page(path):
  """Every picture of the page is inlined and decodes; returns how many there are."""
  from PIL import Image
  page = _Page()
  with open(path, encoding="utf-8") as f:
    page.feed(f.read())
  for src in page.images:
    assert src.startswith("data:image/jpeg;base64,"), src[:40]
    Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
  return len(page.images)


@pytest.mark.xdist_group("trained_run")
@pytest.mark.slow
def test_binaries_and_the_html_page(trained_run, tmp_path):
  workdir, _ = trained_run
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
  index_dir, page = str(tmp_path / "index"), str(tmp_path / "page.html")
  # Exported with a relative --workdir, searched from another folder: the index holds the
  # run's absolute path.
  subprocess.run([sys.executable, "-m", "instance_loss_jax.cli.export",
                  f"--workdir={os.path.basename(workdir)}", "--split=test", f"--out={index_dir}"],
                 cwd=os.path.dirname(workdir), env=env, check=True, capture_output=True)
  search = [sys.executable, "-m", "instance_loss_jax.cli.search", f"--index={index_dir}"]
  out = subprocess.run(search + ["--query=a blue square", "--k=3", "--json", f"--html={page}"],
                       cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
  rows = [json.loads(line) for line in out.splitlines()]
  assert [r["rank"] for r in rows] == [1, 2, 3] and all("item" in r for r in rows)
  assert check_page(page) == 3
  bad = subprocess.run(search + ["--query=qwerty"], cwd=ROOT, env=env, capture_output=True,
                       text=True)
  assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: query")
  chromium = shutil.which("chromium") or shutil.which("chromium-browser")
  if chromium:  # the page loads in a real browser: its DOM comes back with every picture
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          f"file://{page}"], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<img") == 3


@pytest.mark.xdist_group("trained_run")
@pytest.mark.slow
def test_a_gallery_of_a_prepared_tfds_split_is_the_folders_own(trained_run, tmp_path):
  # The run's data prepared as a TFDS dataset: the test split's gallery has the same embeddings
  # as from the image folder, its items name records, and search reads them back for the page.
  from instance_loss_jax.data import prepare, tfds_source  # pylint: disable=g-import-not-at-top
  from instance_loss_jax.evaluation import pages  # pylint: disable=g-import-not-at-top
  workdir, config = trained_run
  data_dir = str(tmp_path / "tfds")
  prepare.prepare("synthetic", os.path.dirname(config.data.json), data_dir)
  folder = Index.from_run(workdir, split="test", dtype="float32")
  index = Index.from_run(workdir, split="test", dtype="float32", overrides={
      "data.format": "tfds", "data.tfds_data_dir": data_dir, "data.tfds_name": "synthetic_scenes"})
  np.testing.assert_array_equal(index.embeddings, folder.embeddings)
  assert all(tfds_source.is_image_ref(item) for item in index.items)
  assert [item.rsplit("/", 1)[-1] for item in index.items] == [
      os.path.basename(item) for item in folder.items]
  loaded = Index.load(index.save(str(tmp_path / "index")))
  hits, _ = loaded.search_text("a blue square", k=3)
  page = str(tmp_path / "page.html")
  pages.write_page(page, "search", [dict(query="a blue square", hits=[
      dict(rank=h.rank, score=h.score, item=h.item, is_image=True) for h in hits])])
  assert check_page(page) == 3
  # An image query by its record's name: the image itself is the top hit of a caption index.
  captions = Index.from_run(workdir, split="test", split_kind="captions", dtype="float32")
  top, = captions.search_image(index.items[0], k=1, workdir=workdir)
  want, = captions.search_image(folder.items[0], k=1, workdir=workdir)
  assert (top.item, top.score) == (want.item, want.score)


@pytest.mark.xdist_group("trained_run")
@pytest.mark.slow
def test_relative_image_paths_give_a_page_with_every_thumbnail(trained_run, tmp_path,
                                                                monkeypatch):
  from instance_loss_jax.evaluation import pages
  workdir, config = trained_run
  photos = tmp_path / "made_here" / "photos"
  photos.mkdir(parents=True)
  for rec in records.read_split(config, "test")[:3]:
    shutil.copy(rec.image_path, photos)
  monkeypatch.chdir(tmp_path / "made_here")
  index = Index.from_run(workdir, images="photos")  # as `export --images=photos` here
  assert all(os.path.isabs(item) and os.path.isfile(item) for item in index.items)
  index.save("photos.index")
  # `search` run from another directory: the page still finds and inlines every picture.
  (tmp_path / "elsewhere").mkdir()
  monkeypatch.chdir(tmp_path / "elsewhere")
  hits, _ = Index.load(str(tmp_path / "made_here" / "photos.index")).search_text(
      "a blue square", k=3)
  pages.write_page("page.html", "search", [dict(query="a blue square", hits=[
      dict(rank=h.rank, score=h.score, item=h.item, is_image=True) for h in hits])])
  assert check_page("page.html") == 3


@pytest.mark.xdist_group("trained_run")
@pytest.mark.slow
def test_evaluation_writes_a_gallery_page(trained_run):
  from instance_loss_jax.evaluation import evaluator
  workdir, config = trained_run
  results = evaluator.evaluate(config, workdir, "train")
  # 4 best and 4 worst queries of the 640 training captions, 5 images each.
  assert check_page(results["gallery"]) == 8 * 5
  with open(results["gallery"], encoding="utf-8") as f:
    text = f.read()
  assert text.count("best: the right image ranks") == 4
  assert text.count("worst: the right image ranks") == 4
