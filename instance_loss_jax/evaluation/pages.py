"""Self-contained HTML pages of retrieval results: thumbnails (inlined), captions, scores.

One page, no outside file: every thumbnail is a base64 JPEG in the page, so it can be mailed,
copied off a TPU VM or opened from an object store as it is.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Sequence

from PIL import Image

from instance_loss_jax import paths
from instance_loss_jax.data import tfds_source

THUMBNAIL = 160

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.05em; margin: 1.6em 0 0.4em; }
.meta { color: #666; font-size: 0.85em; }
.query img { max-height: 120px; border: 1px solid #ccc; }
.hits { display: flex; flex-wrap: wrap; gap: 10px; }
.hit { width: 170px; font-size: 0.8em; }
.hit img { width: 160px; height: 160px; object-fit: contain; background: #f4f4f4;
           border: 3px solid transparent; }
.hit.right img { border-color: #2a9d3a; } .hit.right .caption { color: #2a9d3a; }
.caption-hit { padding: 4px 8px; margin: 2px 0; background: #f6f6f6; font-size: 0.9em; }
.caption-hit.right { background: #e3f4e5; }
.score { font-family: monospace; color: #555; }
"""


def thumbnail_uri(path: str, size: int = THUMBNAIL, readers=None) -> str:
  """A data: URI of the image file shrunk to fit size x size (JPEG), or "" if unreadable.
  `readers`: the page's `tfds_source.Readers` (a prepared split's reader opened once)."""
  try:
    image = Image.open(io.BytesIO((readers or tfds_source.Readers()).read_image(path)))
    image = image.convert("RGB")
  except (OSError, ValueError):
    return ""
  image.thumbnail((size, size))
  out = io.BytesIO()
  image.save(out, format="JPEG", quality=85)
  return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def _hit_html(hit: dict[str, Any], images: bool, readers) -> str:
  right = " right" if hit.get("right") else ""
  score = f'<span class="score">#{hit["rank"]} &middot; {hit["score"]:.3f}</span>'
  if not images:
    return f'<div class="caption-hit{right}">{score} {html.escape(hit["item"])}</div>'
  uri = thumbnail_uri(hit["item"], readers=readers)
  name = html.escape(hit["item"].rsplit("/", 1)[-1])
  picture = f'<img src="{uri}" alt="{name}">' if uri else f"<div>(unreadable: {name})</div>"
  return (f'<div class="hit{right}">{picture}<div>{score}</div>'
          f'<div class="caption" title="{html.escape(hit["item"])}">{name}</div></div>')


def write_page(path: str, title: str, sections: Sequence[dict[str, Any]],
               subtitle: str = "") -> str:
  """Writes the page. Each section: `query` (text) or `query_image` (a path), optional `note`,
  and `hits`: dicts with rank, score, item (image path or caption), is_image, optional right
  (the correct answer, outlined in green)."""
  readers = tfds_source.Readers()
  parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
           f"</title><style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
  if subtitle:
    parts.append(f'<p class="meta">{html.escape(subtitle)}</p>')
  for section in sections:
    if "query_image" in section:
      uri = thumbnail_uri(section["query_image"], 240, readers)
      head = (f'<div class="query"><img src="{uri}" alt="query"> '
              f'{html.escape(section["query_image"])}</div>')
    else:
      head = f'&ldquo;{html.escape(section["query"])}&rdquo;'
    parts.append(f"<h2>{head}</h2>")
    if section.get("note"):
      parts.append(f'<p class="meta">{html.escape(section["note"])}</p>')
    images = bool(section["hits"]) and section["hits"][0].get("is_image", True)
    body = "".join(_hit_html(h, images, readers) for h in section["hits"])
    parts.append(f'<div class="hits">{body}</div>' if images else body)
  parts.append("</body></html>")
  return paths.write_text(path, "\n".join(parts))
