r"""The built-in synthetic dataset: unique scenes of coloured shapes with 5 captions each.

`generate(out, num_images, seed)` (the binary: `python -m instance_loss_jax.cli.synthetic
--out=DIR --num_images=N --seed=S`) writes DIR/images/*.png, DIR/dataset.json (Karpathy format: train/val/test splits) and
DIR/word2vec.bin (a gensim word2vec trained on the training captions, in the word2vec binary
format, so runs on this data take the same path as the GoogleNews vectors).

Each scene has 1-3 groups of objects in distinct quadrants; a group is a count (1-3) of same
size, colour and shape. Scenes are unique, and many differ from another in one detail only
("two red circles" vs "one red circle" vs "two blue circles"), which is the fine-grained telling
apart that instance loss is for.
"""

from __future__ import annotations

import json
import logging
import os
import random
from typing import Sequence

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 210, 40), "purple": (140, 60, 170), "orange": (245, 140, 30),
           "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUNDS = {"gray": (128, 128, 128), "brown": (120, 85, 55), "teal": (40, 120, 120)}
NUMBERS = ("one", "two", "three")
TEMPLATES = (
    "{groups}",
    "there {be} {groups}",
    "a picture of {groups_rev}",
    "{placed} on a {bg} background",
    "an image showing {placed}",
    "{bg} background with {groups_rev}",
    "we can see {groups} in this image",
    "{n} {objects} : {groups}",
)


def _group_phrase(group, number_first=True):
  count, size, colour, shape, _ = group
  noun = shape + ("s" if count > 1 else "")
  count_word = NUMBERS[count - 1] if number_first or count > 1 else "a"
  return f"{count_word} {size} {colour} {noun}"


def _join(phrases: Sequence[str]) -> str:
  return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def captions_for(scene, rng: random.Random) -> list[str]:
  """Five different sentences, each naming every group's count, size, colour and shape."""
  groups, bg = scene
  total = sum(g[0] for g in groups)
  fill = dict(
      groups=_join([_group_phrase(g) for g in groups]),
      groups_rev=_join([_group_phrase(g, number_first=False) for g in reversed(groups)]),
      placed=_join([f"{_group_phrase(g)} in the {g[4]}" for g in groups]),
      bg=bg, n=NUMBERS[total - 1] if total <= 3 else str(total),
      be="is" if total == 1 else "are", objects="object" if total == 1 else "objects")
  return [t.format(**fill) for t in rng.sample(TEMPLATES, 5)]


def random_scene(rng: random.Random):
  num_groups = rng.randint(1, 3)
  quadrants = rng.sample(QUADRANTS, num_groups)
  kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], num_groups)
  groups = tuple(sorted((rng.randint(1, 3), rng.choice(SIZES), colour, shape, quadrant)
                        for (colour, shape), quadrant in zip(kinds, quadrants)))
  return groups, rng.choice(sorted(BACKGROUNDS))


def draw_scene(scene, size: int, rng: random.Random) -> Image.Image:
  groups, bg = scene
  image = Image.new("RGB", (size, size), BACKGROUNDS[bg])
  draw = ImageDraw.Draw(image)
  half = size // 2
  for count, obj_size, colour, shape, quadrant in groups:
    x0 = half if quadrant.endswith("right") else 0
    y0 = half if quadrant.startswith("bottom") else 0
    radius = size * (0.085 if obj_size == "large" else 0.045)
    spacing = half / count
    cy = y0 + half / 2 + rng.uniform(-0.15, 0.15) * half
    for k in range(count):
      cx = x0 + spacing * (k + 0.5) + rng.uniform(-0.05, 0.05) * half
      box = (cx - radius, cy - radius, cx + radius, cy + radius)
      fill = COLOURS[colour]
      if shape == "circle":
        draw.ellipse(box, fill=fill)
      elif shape == "square":
        draw.rectangle(box, fill=fill)
      elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)],
                     fill=fill)
      else:
        draw.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)],
                     fill=fill)
  return image


def generate(out: str, num_images: int, seed: int = 0, image_size: int = 96,
             val_fraction: float = 0.1, test_fraction: float = 0.1, w2v_dim: int = 300,
             w2v_epochs: int = 20) -> dict:
  """Writes the dataset; returns a summary (counts per split, vocabulary size)."""
  rng = random.Random(seed)
  os.makedirs(os.path.join(out, "images"), exist_ok=True)
  scenes, seen = [], set()
  while len(scenes) < num_images:
    scene = random_scene(rng)
    if scene not in seen:
      seen.add(scene)
      scenes.append(scene)
  num_val, num_test = int(num_images * val_fraction), int(num_images * test_fraction)
  splits = (["val"] * num_val + ["test"] * num_test
            + ["train"] * (num_images - num_val - num_test))
  images, train_sentences, sent_id = [], [], 0
  for i, (scene, split) in enumerate(zip(scenes, splits)):
    filename = f"{i:06d}.png"
    draw_scene(scene, image_size, rng).save(os.path.join(out, "images", filename))
    sentences = []
    for raw in captions_for(scene, rng):
      tokens = raw.replace(",", " ").split()
      sentences.append(dict(tokens=tokens, raw=raw, imgid=i, sentid=sent_id))
      sent_id += 1
      if split == "train":
        train_sentences.append(tokens)
    images.append(dict(filename=filename, imgid=i, split=split, sentences=sentences,
                       sentids=[s["sentid"] for s in sentences]))
  with open(os.path.join(out, "dataset.json"), "w", encoding="utf-8") as f:
    json.dump(dict(dataset="synthetic", images=images), f)

  # Imported here: gensim (and SciPy) take seconds to import, for the vectors only.
  from gensim.models import Word2Vec  # pylint: disable=g-import-not-at-top
  logging.getLogger("gensim").setLevel(logging.WARNING)
  w2v = Word2Vec(sentences=train_sentences, vector_size=w2v_dim, min_count=1, window=5,
                 sg=1, seed=seed, workers=1, epochs=w2v_epochs)
  w2v.wv.save_word2vec_format(os.path.join(out, "word2vec.bin"), binary=True)
  return dict(train=splits.count("train"), val=num_val, test=num_test,
              words=len(w2v.wv.key_to_index))
