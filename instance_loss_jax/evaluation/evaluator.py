"""Evaluate a run's checkpoint: restore it with its vocabulary, embed a split, compute metrics.

Writes `<workdir>/eval/<split>-<step>.json` and a markdown table beside it.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import jax
import numpy as np

from instance_loss_jax import config as config_lib
from instance_loss_jax import paths
from instance_loss_jax.data import pipeline, records
from instance_loss_jax.data.vocab import Vocabulary
from instance_loss_jax.evaluation import metrics, pages, plots, tables
from instance_loss_jax.inference import EmbedFns, load_run, top_k


def best_and_worst_queries(img, txt, txt_to_img, captions: Sequence[str],
                           image_paths: Sequence[str], t2i_ranks, count: int = 4, k: int = 5):
  """Page sections for the `count` best and worst text->image queries of a split: each
  caption with its top-k images, the right one outlined."""
  ranks = np.asarray(t2i_ranks)
  order = np.lexsort((np.arange(len(ranks)), ranks))  # best first, ties by caption order
  chosen = list(order[:count]) + [q for q in order[::-1][:count] if q not in order[:count]]
  scores, rows = top_k(np.asarray(txt)[chosen], img, min(k, len(img)))
  sections = []
  for n, q in enumerate(chosen):
    kind = "best" if n < count else "worst"
    sections.append(dict(
        query=captions[q], note=f"{kind}: the right image ranks {int(ranks[q])}",
        hits=[dict(rank=r + 1, score=float(s), item=image_paths[i], is_image=True,
                   right=int(i) == int(txt_to_img[q]))
              for r, (s, i) in enumerate(zip(scores[n], rows[n]))]))
  return sections


def embed_split(config, embed_fns: EmbedFns, variables, split: pipeline.EncodedSplit,
                flip_average: bool = True, text_shift_sum: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
  """L2-normalised (image, caption) embeddings of a split, in file order: images read as
  `config` says (size, normalisation), `variables` as `embed_fns.place` gives them.

  flip_average: image = normalised sum of the image's and its mirror's summands
  (docs/design.md).
  text_shift_sum: caption = normalised sum of its summands over every position-shift offset
  (the original code); otherwise the caption as stored, left-aligned. What a summand is:
  `config.eval.features` (`inference.make_embed_fns`).
  """
  images = pipeline.eval_images(split, config, embed_fns.rows)
  img = embed_fns.embed_images(
      variables, (b["images"] for b in pipeline.numpy_batches(images, split.image_paths)),
      split.num_images, flip_average)
  if not text_shift_sum:
    return img, embed_fns.embed_tokens(variables, split.tokens)
  max_len = split.tokens.shape[1]
  txt = np.zeros((len(split.tokens), img.shape[1]), np.float32)
  for offset in range(max_len - int(split.lengths.min()) + 1):
    fits = split.lengths + offset <= max_len
    txt[fits] += embed_fns.embed_tokens(variables, np.roll(split.tokens[fits], offset, axis=1),
                                        summand=True)
  return img, txt / np.maximum(np.linalg.norm(txt, axis=1, keepdims=True), 1e-12)


def captions_per_image(config) -> int:
  """How many captions of each image are scored (0: all): `eval.captions_per_image`, except
  person retrieval, which scores every caption."""
  return 0 if config_lib.person_retrieval(config.data) else int(config.eval.captions_per_image)


def scored_records(config, split: str) -> tuple[list[records.Record], int]:
  """The records of `split` as the dataset's protocol scores them (`captions_per_image`), and
  how many captions the split has in all."""
  recs = records.read_split(config, split)
  return (records.first_captions(recs, captions_per_image(config)),
          sum(len(r.captions) for r in recs))


def compute_metrics(config, split: pipeline.EncodedSplit, img, txt) -> dict[str, float]:
  """The dataset's protocol: CUHK-PEDES person retrieval, otherwise image<->text (+ COCO 1K)."""
  block = config.eval.block_bytes
  if config_lib.person_retrieval(config.data):
    return metrics.person_retrieval_metrics(img, txt, split.labels,
                                            split.labels[split.caption_image], block)
  out = metrics.retrieval_metrics(img, txt, split.caption_image, block)
  folds = config.eval.coco_1k_folds
  if folds and len(img) >= folds:
    out.update({f"1k_{k}": v for k, v in metrics.coco_1k_metrics(
        img, txt, split.caption_image, folds, block).items()})
  return out


class Evaluator:
  """One split's evaluation, shared by the eval binary (variables from a checkpoint) and the
  trainer (variables from memory, every `eval.every_steps`): embeddings, the dataset's
  retrieval metrics, the indicator S, and with `out_dir` the JSON, markdown, PNG figures and
  the HTML page of best and worst queries. The split is read and encoded once; the embedding
  functions are the caller's (`inference.make_embed_fns`, or a loaded run's), built once: the
  trainer calls this every eval.every_steps, and new functions would compile again."""

  def __init__(self, config, vocab: Vocabulary, split: str, embed_fns: EmbedFns):
    self.config, self.split, self.embed_fns = config, split, embed_fns
    self.records, self.captions_in_split = scored_records(config, split)
    self.data = pipeline.encode_split(self.records, vocab, config.model.text.max_len,
                                      for_training=False)

  def __call__(self, variables, step: int, out_dir: str | None = None,
               workdir: str = "") -> dict[str, Any]:
    config, data, split = self.config, self.data, self.split
    img, txt = embed_split(config, self.embed_fns, self.embed_fns.place(variables), data,
                           flip_average=config.eval.flip_average,
                           text_shift_sum=config.eval.text_shift_sum)
    edges, pos, neg = metrics.similarity_histograms(img, txt, data.caption_image,
                                                    config.eval.s_bins, config.eval.block_bytes)
    results = dict(workdir=paths.absolute(workdir) if workdir else "", step=int(step),
                   split=split, num_images=int(data.num_images),
                   num_captions=int(len(data.tokens)),
                   captions_per_image=captions_per_image(config),
                   captions_not_scored=int(self.captions_in_split - len(data.tokens)),
                   captions_without_known_words=int(data.num_empty_captions),
                   metrics=compute_metrics(config, data, img, txt))
    results["metrics"]["S"] = metrics.separability(pos, neg)
    if out_dir is None or jax.process_index() != 0:
      return results
    paths.path(out_dir).mkdir(parents=True, exist_ok=True)
    base = paths.join(out_dir, f"{split}-{step}")
    results["plots"] = [
        plots.similarity_histograms(base + "-similarity.png", edges, pos, neg,
                                    results["metrics"]["S"], f"{split} step {step}"),
        plots.correlation_matrix(base + "-correlation.png", img)]
    if config.eval.gallery_queries:
      _, t2i = metrics.retrieval_ranks(img, txt, data.caption_image, config.eval.block_bytes)
      captions = [" ".join(c) for r in self.records for c in r.captions]
      results["gallery"] = pages.write_page(
          base + "-gallery.html", f"{split} step {step}: best and worst text->image queries",
          best_and_worst_queries(img, txt, data.caption_image, captions, data.image_paths, t2i,
                                 config.eval.gallery_queries),
          subtitle=f"{results['workdir']}; the right image is outlined in green")
    paths.write_text(base + ".json", json.dumps(results, indent=1, sort_keys=True))
    paths.write_text(base + ".md", tables.markdown_table(results))
    results["written"] = base + ".json"
    return results


def evaluate(config, workdir: str, split: str = "test", step: int | None = None,
             write: bool = True, devices=None, mgr=None, prefer: str = "best"
             ) -> dict[str, Any]:
  """Evaluates `workdir`'s checkpoint (`checkpoint.resolve_step(step, prefer)`: default, as
  every reader of a run, the best by validation rsum when the run validated, else the newest),
  read with `config` (`inference.load_run`), on `split` with `devices` (default: this
  process's), whatever mesh wrote it; returns the results dict. `mgr`: the workdir's checkpoint
  manager if the caller has one (the trainer), else a reader is opened."""
  run = load_run(workdir, step, prefer=prefer, config=config, mgr=mgr, devices=devices)
  evaluator = Evaluator(run.config, run.vocab, split, run.embed_fns)
  return evaluator(run.variables, run.step, paths.join(workdir, "eval") if write else None,
                   workdir)
