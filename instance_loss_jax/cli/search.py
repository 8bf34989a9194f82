r"""Search an index made by `instance_loss_jax.cli.export` with a sentence or an image.

    python -m instance_loss_jax.cli.search --index=INDEX --query="a dog runs on the beach" [--k=10]
    python -m instance_loss_jax.cli.search --index=CAPTION_INDEX --image=photo.jpg
    ... [--json] [--html=results.html]

A sentence searches an image index (text->image), an image a caption index (image->text). The
query is embedded by the run that made the index (its workdir as recorded; --workdir if it has
moved). Prints the ranked results with their cosine similarity; --json prints one JSON object
per result (rank, score, item, row) for scripts; --html writes one self-contained page.
"""

import json
import sys

from absl import flags

from instance_loss_jax.cli import runner


def define_flags():
  runner.define_compile_cache_flag()
  flags.DEFINE_string("index", None, "The index directory (instance_loss_jax.cli.export).")
  flags.DEFINE_string("query", None, "A sentence (searches an image index).")
  flags.DEFINE_string("image", None, "An image file (searches a caption index).")
  flags.DEFINE_integer("k", 10, "How many results (1 or more).", lower_bound=1)
  flags.DEFINE_bool("json", False, "One JSON object per result instead of the table.")
  flags.DEFINE_string("html", None, "Also write the results as a self-contained HTML page.")
  flags.DEFINE_string("workdir", None, "The run's directory, if not where the index says.")
  flags.mark_flag_as_required("index")


def main(argv):
  del argv  # runner.run refuses positional arguments
  runner.configure_logging()
  runner.use_compile_cache()
  # Imported here: the Index imports JAX, Flax and Orbax (seconds), which --help and a flag
  # error do not need.
  # pylint: disable=g-import-not-at-top
  from instance_loss_jax.evaluation import pages
  from instance_loss_jax.index import Index, RetrievalError
  f = flags.FLAGS
  if (f.query is None) == (f.image is None):
    raise RetrievalError("give one query: --query=SENTENCE or --image=FILE")
  index = Index.load(f.index)
  if f.query is not None:
    hits, unknown = index.search_text(f.query, f.k, f.workdir)
    if unknown:
      print(f"not in the vocabulary (ignored): {', '.join(unknown)}", file=sys.stderr)
    section = dict(query=f.query, note=f"ignored words: {', '.join(unknown)}" if unknown else "")
  else:
    hits = index.search_image(f.image, f.k, f.workdir)
    section = dict(query_image=f.image)
  for hit in hits:
    if f.json:
      print(json.dumps(dict(rank=hit.rank, score=round(hit.score, 6), item=hit.item,
                            row=hit.row)))
    else:
      print(f"{hit.rank:4d}  {hit.score:7.4f}  {hit.item}")
  if f.html:
    section["hits"] = [dict(rank=h.rank, score=h.score, item=h.item,
                            is_image=index.kind == "images") for h in hits]
    pages.write_page(f.html, "instance_loss_jax search", [section],
                       subtitle=f"index {f.index}: {len(index.items)} {index.kind}, "
                       f"{index.run['workdir']} step {index.run['step']}")
    print(f"wrote {f.html}", file=sys.stderr)


def run():
  """Console-script entry point."""
  runner.run(main, define_flags)


if __name__ == "__main__":
  run()
