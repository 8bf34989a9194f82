"""Retrieval metrics from embeddings, computed in blocks so memory stays bounded.

Ranks are 1-based and ties count against the query: an item is ranked behind every other item
whose similarity is greater *or equal*. (So a model that maps everything to one point ranks last,
not first.) Recalls are percentages; medr is floor(median rank), as in the VSE code.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

DEFAULT_BLOCK_BYTES = 256 << 20


def _blocks(n: int, rows: int, block_bytes: int) -> Iterator[slice]:
  step = max(1, block_bytes // (4 * max(rows, 1)))
  for start in range(0, n, step):
    yield slice(start, min(n, start + step))


def _summary(ranks: np.ndarray, prefix: str) -> dict[str, float]:
  out = {f"{prefix}_r{k}": float(100.0 * np.mean(ranks <= k)) for k in (1, 5, 10)}
  out[f"{prefix}_medr"] = float(np.floor(np.median(ranks)))
  out[f"{prefix}_meanr"] = float(np.mean(ranks))
  return out


def retrieval_ranks(img_emb, txt_emb, txt_to_img,
                    block_bytes: int = DEFAULT_BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray]:
  """(i2t ranks [N_img], t2i ranks [N_txt]); similarity is the dot product (cosine for the
  L2-normalised embeddings the model gives).

  image->text: the rank of the image's best-ranked caption among all captions;
  text->image: the rank of the caption's image among all images.
  """
  img = np.asarray(img_emb, np.float32)
  txt = np.asarray(txt_emb, np.float32)
  owner = np.asarray(txt_to_img)
  blocks = list(_blocks(len(txt), len(img), block_bytes))
  # Pass 1: text->image ranks, and each image's best own-caption similarity. Positives are read
  # from the same matrix products as everything they are compared with, so that an exact tie
  # is a tie (a separately computed dot product can differ in the last bit).
  best_own = np.full(len(img), -np.inf, np.float32)
  t2i = np.zeros(len(txt), np.int64)
  for cols in blocks:
    sims = img @ txt[cols].T  # [N_img, block]
    positive = sims[owner[cols], np.arange(sims.shape[1])]
    t2i[cols] = np.sum(sims >= positive[None, :], axis=0)  # counts its own image once
    np.maximum.at(best_own, owner[cols], positive)
  # Pass 2: image->text ranks against the best own caption.
  i2t = np.ones(len(img), np.int64)
  for cols in blocks:
    sims = img @ txt[cols].T
    other = owner[cols][None, :] != np.arange(len(img))[:, None]
    i2t += np.sum((sims >= best_own[:, None]) & other, axis=1)
  return i2t, t2i


def retrieval_metrics(img_emb, txt_emb, txt_to_img,
                      block_bytes: int = DEFAULT_BLOCK_BYTES) -> dict[str, float]:
  """i2t_r1/r5/r10/medr/meanr, t2i_r1/r5/r10/medr/meanr and rsum (sum of the six recalls).

  img_emb [N_img, D], txt_emb [N_txt, D]: L2-normalised. txt_to_img [N_txt]: each caption's image
  index. Any number of captions per image.
  """
  i2t, t2i = retrieval_ranks(img_emb, txt_emb, txt_to_img, block_bytes)
  out = {**_summary(i2t, "i2t"), **_summary(t2i, "t2i")}
  out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
  return out


def coco_1k_metrics(img_emb, txt_emb, txt_to_img, folds: int = 5,
                    block_bytes: int = DEFAULT_BLOCK_BYTES) -> dict[str, float]:
  """The MSCOCO 1K protocol: the images split into `folds` consecutive folds (5 x 1,000 on the
  5K test set), each searched with its own captions only; metrics averaged over folds."""
  img = np.asarray(img_emb)
  owner = np.asarray(txt_to_img)
  size = len(img) // folds
  per_fold = []
  for f in range(folds):
    lo, hi = f * size, (f + 1) * size
    keep = (owner >= lo) & (owner < hi)
    per_fold.append(retrieval_metrics(img[lo:hi], np.asarray(txt_emb)[keep], owner[keep] - lo,
                                      block_bytes))
  return {k: float(np.mean([m[k] for m in per_fold])) for k in per_fold[0]}


def person_retrieval_metrics(img_emb, txt_emb, img_ids, txt_ids,
                             block_bytes: int = DEFAULT_BLOCK_BYTES) -> dict[str, float]:
  """CUHK-PEDES text->image: a hit is any gallery image of the query's identity.

  Returns t2i_r1/r5/r10, t2i_medr, t2i_meanr and mAP (percent; ties rank irrelevant images first).
  """
  img = np.asarray(img_emb, np.float32)
  txt = np.asarray(txt_emb, np.float32)
  img_ids, txt_ids = np.asarray(img_ids), np.asarray(txt_ids)
  ranks, aps = [], []
  for rows in _blocks(len(txt), len(img), block_bytes):
    sims = txt[rows] @ img.T  # [block, N_img]
    relevant = txt_ids[rows][:, None] == img_ids[None, :]
    # Sort by similarity, descending; among equal similarities irrelevant images come first.
    order = np.lexsort((relevant, -sims), axis=1)
    hits = np.take_along_axis(relevant, order, axis=1)
    for row in hits:
      positions = np.flatnonzero(row) + 1  # 1-based ranks of the relevant images
      if not len(positions):
        ranks.append(len(img) + 1)
        aps.append(0.0)
        continue
      ranks.append(positions[0])
      aps.append(float(np.mean(np.arange(1, len(positions) + 1) / positions)))
  out = _summary(np.asarray(ranks), "t2i")
  out["mAP"] = float(100.0 * np.mean(aps))
  return out


def similarity_histograms(img_emb, txt_emb, txt_to_img, bins: int = 100,
                          block_bytes: int = DEFAULT_BLOCK_BYTES):
  """Histograms over [-1, 1] of positive-pair similarities (each caption with its image) and of
  negative-pair similarities (each caption with every other image). Returns (edges, pos, neg)
  as counts."""
  img = np.asarray(img_emb, np.float32)
  txt = np.asarray(txt_emb, np.float32)
  owner = np.asarray(txt_to_img)
  edges = np.linspace(-1.0, 1.0, bins + 1)
  pos, neg = np.zeros(bins, np.int64), np.zeros(bins, np.int64)
  for cols in _blocks(len(txt), len(img), block_bytes):
    sims = np.clip(img @ txt[cols].T, -1.0, 1.0)
    mine = owner[cols][None, :] == np.arange(len(img))[:, None]
    pos += np.histogram(sims[mine], edges)[0]
    neg += np.histogram(sims[~mine], edges)[0]
  return edges, pos, neg


def separability(pos_counts, neg_counts) -> float:
  """The paper's indicator S (eq. 10): the overlap area of the normalised histograms P and Q of
  positive and negative pair similarities, sum_b min(P_b, Q_b). 0 = separable, 1 = identical."""
  p = np.asarray(pos_counts, np.float64) / max(np.sum(pos_counts), 1)
  q = np.asarray(neg_counts, np.float64) / max(np.sum(neg_counts), 1)
  return float(np.sum(np.minimum(p, q)))
