"""Markdown tables of evaluation results: one run's metrics, and several runs side by side."""

from __future__ import annotations

from typing import Any


def markdown_table(results: dict[str, Any]) -> str:
  m = results["metrics"]
  rows = ["| metric | value |", "|---|---|"]
  rows += [f"| {k} | {v:.2f} |" for k, v in m.items()]
  head = (f"Evaluation of {results['workdir']} step {results['step']} on split "
          f"'{results['split']}': {results['num_images']} images, "
          f"{results['num_captions']} captions{_scored(results)}.\n\n")
  return head + "\n".join(rows) + "\n"


def _scored(results: dict[str, Any]) -> str:
  """Which captions were scored, where the protocol left some out."""
  if not results.get("captions_not_scored"):
    return ""
  return (f" (each image's first {results['captions_per_image']}; "
          f"{results['captions_not_scored']} more not scored)")


def comparison_table(named: dict[str, dict[str, Any]]) -> str:
  """A markdown table of several runs' results (rows) over the retrieval metrics (columns)."""
  keys = ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr",
          "rsum", "S")
  first = next(iter(named.values()))
  keys = [k for k in keys if k in first["metrics"]]
  lines = ["| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
  for name, results in named.items():
    lines.append(f"| {name} | " + " | ".join(
        f"{results['metrics'][k]:.{4 if k == 'S' else 1}f}" for k in keys) + " |")
  n_img, n_txt = first["num_images"], first["num_captions"]
  lines.append(f"\n{first['split']} split: {n_img} images, {n_txt} captions{_scored(first)}. "
               f"Chance: R@1 "
               f"{100 / n_img:.1f} (text->image), R@10 {min(100, 1000 / n_img):.1f}.")
  return "\n".join(lines)
