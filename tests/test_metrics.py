"""Retrieval metrics against brute-force python loops over ranks."""

import numpy as np
import pytest

from instance_loss_jax.evaluation import metrics


def unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_ranks(img, txt, owner):
  """Ranks by counting, one query at a time; ties count against the query."""
  sims = [[float(np.dot(i, t)) for t in txt] for i in img]
  i2t = []
  for i in range(len(img)):
    best = max(sims[i][j] for j in range(len(txt)) if owner[j] == i)
    i2t.append(1 + sum(1 for j in range(len(txt)) if owner[j] != i and sims[i][j] >= best))
  t2i = []
  for j in range(len(txt)):
    mine = sims[owner[j]][j]
    t2i.append(1 + sum(1 for i in range(len(img)) if i != owner[j] and sims[i][j] >= mine))
  return i2t, t2i


def brute_summary(ranks, prefix):
  n = len(ranks)
  out = {f"{prefix}_r{k}": 100.0 * sum(r <= k for r in ranks) / n for k in (1, 5, 10)}
  ordered = sorted(ranks)
  median = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
  out[f"{prefix}_medr"] = float(int(median))
  out[f"{prefix}_meanr"] = sum(ranks) / n
  return out


def random_case(seed, n_img, max_caps, dim=6, quantise=False):
  rng = np.random.default_rng(seed)
  counts = rng.integers(1, max_caps + 1, n_img)
  owner = np.repeat(np.arange(n_img), counts)
  rng.shuffle(owner)  # captions in any order
  img = rng.normal(size=(n_img, dim))
  txt = img[owner] + rng.normal(size=(len(owner), dim)) * 1.5
  if quantise:
    # Small integers: dot products are exact in float32 and many of them tie exactly.
    return np.round(img).astype(np.float32), np.round(txt).astype(np.float32), owner
  return unit(img).astype(np.float32), unit(txt).astype(np.float32), owner


@pytest.mark.parametrize("seed,n_img,max_caps,quantise", [
    (0, 30, 5, False), (1, 25, 7, False), (2, 40, 1, False), (3, 30, 7, True), (4, 12, 3, True)])
def test_retrieval_metrics_match_brute_force(seed, n_img, max_caps, quantise):
  img, txt, owner = random_case(seed, n_img, max_caps, quantise=quantise)
  i2t, t2i = brute_ranks(img.astype(np.float64), txt.astype(np.float64), owner)
  want = {**brute_summary(i2t, "i2t"), **brute_summary(t2i, "t2i")}
  want["rsum"] = sum(v for k, v in want.items() if "_r" in k and "meanr" not in k
                     and "medr" not in k)
  # A tiny block forces many blocks: the blocked computation must not change anything.
  for block_bytes in (metrics.DEFAULT_BLOCK_BYTES, 64):
    got = metrics.retrieval_metrics(img, txt, owner, block_bytes=block_bytes)
    assert got.keys() == want.keys()
    for k in want:
      assert got[k] == pytest.approx(want[k], abs=1e-9), k


def test_constant_embeddings_rank_last():
  img = np.ones((4, 3), np.float32) / np.sqrt(3)
  txt = np.ones((8, 3), np.float32) / np.sqrt(3)
  got = metrics.retrieval_metrics(img, txt, np.repeat(np.arange(4), 2))
  assert got["i2t_r1"] == 0 and got["t2i_r1"] == 0 and got["t2i_medr"] == 4


def test_coco_1k_averages_folds():
  img, txt, owner = random_case(5, 50, 5)
  order = np.argsort(owner, kind="stable")
  txt, owner = txt[order], owner[order]
  got = metrics.coco_1k_metrics(img, txt, owner, folds=5)
  folds = []
  for f in range(5):
    keep = (owner >= 10 * f) & (owner < 10 * f + 10)
    i2t, t2i = brute_ranks(img[10 * f:10 * f + 10], txt[keep], owner[keep] - 10 * f)
    folds.append({**brute_summary(i2t, "i2t"), **brute_summary(t2i, "t2i")})
  for k in folds[0]:
    assert got[k] == pytest.approx(np.mean([f[k] for f in folds]), abs=1e-9), k


def brute_person(img, txt, img_ids, txt_ids):
  ranks, aps = [], []
  for q in range(len(txt)):
    sims = [float(np.dot(txt[q], g)) for g in img]
    # Sort: similarity descending; on ties, images of other people first (pessimistic).
    order = sorted(range(len(img)), key=lambda g: (-sims[g], img_ids[g] == txt_ids[q]))
    hits = [i + 1 for i, g in enumerate(order) if img_ids[g] == txt_ids[q]]
    ranks.append(hits[0])
    aps.append(sum((k + 1) / pos for k, pos in enumerate(hits)) / len(hits))
  out = brute_summary(ranks, "t2i")
  out["mAP"] = 100.0 * sum(aps) / len(aps)
  return out


@pytest.mark.parametrize("seed,quantise", [(0, False), (1, True)])
def test_person_retrieval_matches_brute_force(seed, quantise):
  rng = np.random.default_rng(seed)
  img_ids = rng.integers(0, 8, 30)  # several images per person
  txt_ids = rng.choice(np.unique(img_ids), 45)
  centres = rng.normal(size=(8, 5))
  img = centres[img_ids] + rng.normal(size=(30, 5))
  txt = centres[txt_ids] + rng.normal(size=(45, 5))
  if quantise:  # exact float32 dot products with many ties
    img, txt = np.round(img).astype(np.float32), np.round(txt).astype(np.float32)
  else:
    img, txt = unit(img).astype(np.float32), unit(txt).astype(np.float32)
  want = brute_person(img.astype(np.float64), txt.astype(np.float64), img_ids, txt_ids)
  for block_bytes in (metrics.DEFAULT_BLOCK_BYTES, 128):
    got = metrics.person_retrieval_metrics(img, txt, img_ids, txt_ids, block_bytes=block_bytes)
    for k in want:
      assert got[k] == pytest.approx(want[k], abs=1e-6), k


def test_separability_indicator():
  rng = np.random.default_rng(0)
  img, txt, owner = random_case(0, 40, 5)
  edges, pos, neg = metrics.similarity_histograms(img, txt, owner, bins=50, block_bytes=256)
  assert pos.sum() == len(txt) and neg.sum() == len(txt) * (len(img) - 1)
  sims = img @ txt.T
  mine = owner[None, :] == np.arange(len(img))[:, None]
  np.testing.assert_array_equal(pos, np.histogram(sims[mine], edges)[0])
  # Overlap by brute force: mass of the minimum over every bin.
  p, q = pos / pos.sum(), neg / neg.sum()
  want = sum(min(a, b) for a, b in zip(p, q))
  assert metrics.separability(pos, neg) == pytest.approx(want)
  assert metrics.separability([0, 5, 5], [0, 1, 1]) == pytest.approx(1.0)
  assert metrics.separability([5, 0], [0, 5]) == 0.0
  del rng
