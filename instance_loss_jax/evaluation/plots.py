"""The paper's two diagnostic figures as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402

from instance_loss_jax import paths  # noqa: E402


def _save(fig, path: str) -> None:
  """A figure as PNG at a local or object-store path."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  paths.write_bytes(path, buffer.getvalue())


def similarity_histograms(path: str, edges, pos, neg, s_value: float, title: str = "") -> str:
  """Figure 7: P (positive pairs) and Q (negative pairs) similarity distributions, with S."""
  centres = (edges[:-1] + edges[1:]) / 2
  width = edges[1] - edges[0]
  fig, ax = plt.subplots(figsize=(5, 3.2))
  ax.bar(centres, pos / max(pos.sum(), 1), width, alpha=0.6, label="P: positive pairs")
  ax.bar(centres, neg / max(neg.sum(), 1), width, alpha=0.6, label="Q: negative pairs")
  ax.set_xlabel("cosine similarity")
  ax.set_ylabel("fraction of pairs")
  ax.set_title(f"{title}  S = {s_value:.4f}".strip())
  ax.legend(fontsize=8)
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)
  return path


def correlation_matrix(path: str, features, title: str = "") -> str:
  """Figure 5: Pearson correlation between the features of (up to) 100 images."""
  corr = np.corrcoef(np.asarray(features, np.float64)[:100])
  fig, ax = plt.subplots(figsize=(4, 3.6))
  im = ax.imshow(corr, vmin=-1, vmax=1, cmap="coolwarm")
  fig.colorbar(im, ax=ax, fraction=0.046)
  ax.set_title(title or f"Pearson correlation, {len(corr)} images")
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)
  return path
