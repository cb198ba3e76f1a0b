"""The scenes, images and captions of `synthetic_regions` (the embedded demo dataset).

Each image is a scene of 1-4 objects on a dark background, one per cell of a 3x3 grid. An object
has a shape (circle, square, triangle, diamond), a colour (8), a size (small, large) and a position
(the grid cell, e.g. "top left"); objects may repeat a shape and colour, which makes counts ("two
red circles") an attribute too. Every image has 5 captions of varying detail and word order and a
dense caption listing every object with all its attributes. All words are single wordpieces of the
bert-base-uncased vocabulary.

Hard negatives by construction: images come in pairs (2k, 2k+1); image 2k+1 is image 2k with
exactly ONE attribute changed (one object's colour, shape, size or position, or the count of one
kind of object). Examples record `hard_negative` (the partner's index) and `difference`. Since the
pair shares everything else, only a model that matches words to regions can tell them apart.

Everything is a pure function of (seed, split, pair index): `generate_example(seed, split, index,
image_size)` regenerates any example, and each example stores its `scene` as JSON. NumPy only;
the tfds builder that writes the examples is `data/synthetic.py`.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (235, 235, 235),
    "pink": (245, 140, 200),
}
SIZES = {"small": 0.08, "large": 0.14}  # radius as a fraction of the image side
BACKGROUND = (20, 20, 20)
GRID = 3
POSITIONS = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "middle", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
_POS_PREP = {"left": "on the", "right": "on the", "middle": "in the"}  # others: "at the"
NUMBERS = ("no", "one", "two", "three", "four")
ORDINALS = ("first", "second", "third", "fourth")
MAX_OBJECTS = 4
DUPLICATE_PROB = 0.3  # chance an object repeats the shape and colour of an earlier one
JITTER = 0.02  # centre jitter inside the cell, fraction of the image side
SUPERSAMPLE = 4  # draw at 4x and box-downsample: anti-aliased edges, exact colours at centres
ATTRIBUTES = ("colour", "shape", "size", "position", "count")
SPLIT_CODES = {"train": 0, "dev": 1, "test": 2}


# ---------------------------------------------------------------------------------------------
# Scenes: plain dicts (JSON-serialisable) {"objects": [{"shape", "colour", "size", "cell": [r, c],
# "jitter": [dx, dy]}, ...]}.


def _new_object(rng: np.random.Generator, cell: tuple[int, int], like: dict | None = None) -> dict:
  shape = like["shape"] if like else SHAPES[rng.integers(len(SHAPES))]
  colour = like["colour"] if like else list(COLOURS)[rng.integers(len(COLOURS))]
  return {"shape": shape, "colour": colour, "size": list(SIZES)[rng.integers(len(SIZES))],
          "cell": [int(cell[0]), int(cell[1])],
          "jitter": [float(x) for x in rng.uniform(-JITTER, JITTER, size=2)]}


def _free_cells(scene: dict) -> list[tuple[int, int]]:
  used = {tuple(o["cell"]) for o in scene["objects"]}
  return [c for c in POSITIONS if c not in used]


def sample_scene(rng: np.random.Generator) -> dict:
  """A random scene of 1-4 objects in distinct grid cells."""
  n = int(rng.integers(1, MAX_OBJECTS + 1))
  cells = [list(POSITIONS)[i] for i in rng.choice(len(POSITIONS), size=n, replace=False)]
  objects: list[dict] = []
  for cell in cells:
    like = None
    if objects and rng.random() < DUPLICATE_PROB:
      like = objects[rng.integers(len(objects))]
    objects.append(_new_object(rng, cell, like))
  return {"objects": objects}


def _kind_counts(scene: dict) -> dict[tuple[str, str], int]:
  counts: dict[tuple[str, str], int] = {}
  for o in scene["objects"]:
    counts[(o["colour"], o["shape"])] = counts.get((o["colour"], o["shape"]), 0) + 1
  return counts


def hard_negative(scene: dict, rng: np.random.Generator) -> tuple[dict, str]:
  """`scene` with exactly one attribute changed -> (new scene, attribute name)."""
  objs = scene["objects"]
  attribute = ATTRIBUTES[rng.integers(len(ATTRIBUTES))]
  new = json.loads(json.dumps(scene))  # deep copy
  i = int(rng.integers(len(objs)))
  o = new["objects"][i]
  if attribute == "colour":
    o["colour"] = [c for c in COLOURS if c != o["colour"]][rng.integers(len(COLOURS) - 1)]
  elif attribute == "shape":
    o["shape"] = [s for s in SHAPES if s != o["shape"]][rng.integers(len(SHAPES) - 1)]
  elif attribute == "size":
    o["size"] = "large" if o["size"] == "small" else "small"
  elif attribute == "position":
    free = _free_cells(new)
    o["cell"] = list(free[rng.integers(len(free))])
  else:  # count: one more object of an existing kind, or (when full) one fewer
    if len(objs) < MAX_OBJECTS:
      free = _free_cells(new)
      new["objects"].append(_new_object(rng, free[rng.integers(len(free))], like=o))
    else:
      del new["objects"][i]
  return new, attribute


def describe_objects(scene: dict) -> list[dict]:
  """Objects in reading order (row-major by cell), as drawn."""
  return sorted(scene["objects"], key=lambda o: tuple(o["cell"]))


# ---------------------------------------------------------------------------------------------
# Rendering.


def object_centre(obj: dict, image_size: int) -> tuple[float, float]:
  """(x, y) pixel centre of an object in an `image_size` image (the pixel is inside its shape)."""
  r, c = obj["cell"]
  x = ((c + 0.5) / GRID + obj["jitter"][0]) * image_size
  y = ((r + 0.5) / GRID + obj["jitter"][1]) * image_size
  return x, y


def render_scene(scene: dict, image_size: int) -> np.ndarray:
  """Scene -> `[S, S, 3] uint8` RGB image."""
  from PIL import Image, ImageDraw

  big = image_size * SUPERSAMPLE
  img = Image.new("RGB", (big, big), BACKGROUND)
  draw = ImageDraw.Draw(img)
  for o in scene["objects"]:
    cx, cy = object_centre(o, big)
    rad = SIZES[o["size"]] * big
    fill = COLOURS[o["colour"]]
    if o["shape"] == "circle":
      draw.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=fill)
    elif o["shape"] == "square":
      h = 0.85 * rad  # similar area to the circle
      draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif o["shape"] == "triangle":
      draw.polygon([(cx, cy - rad), (cx + rad, cy + 0.8 * rad), (cx - rad, cy + 0.8 * rad)],
                   fill=fill)
    elif o["shape"] == "diamond":
      draw.polygon([(cx, cy - rad), (cx + rad, cy), (cx, cy + rad), (cx - rad, cy)], fill=fill)
    else:
      raise ValueError(f"unknown shape {o['shape']!r}")
  return np.asarray(img.resize((image_size, image_size), Image.BOX))


def encode_jpeg(image: np.ndarray) -> bytes:
  from PIL import Image

  out = io.BytesIO()
  # 4:4:4 chroma: at 32 px, subsampled chroma would smear the colours the captions name.
  Image.fromarray(image).save(out, format="JPEG", quality=95, subsampling=0)
  return out.getvalue()


# ---------------------------------------------------------------------------------------------
# Language.


def _join(parts: list[str]) -> str:
  if len(parts) == 1:
    return parts[0]
  return ", ".join(parts[:-1]) + " and " + parts[-1]


def position_phrase(cell) -> str:
  name = POSITIONS[tuple(cell)]
  return f"{_POS_PREP.get(name, 'at the')} {name}"


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _group_phrase(count: int, words: tuple[str, ...]) -> str:
  *adjs, shape = words
  if count == 1:
    return " ".join([_article(words[0])] + list(adjs) + [shape])
  return " ".join([NUMBERS[count]] + list(adjs) + [shape + "s"])


def _grouped(objs: list[dict], keys: tuple[str, ...], rng: np.random.Generator) -> list[str]:
  counts: dict[tuple[str, ...], int] = {}
  for o in objs:
    k = tuple(o[key] for key in keys)
    counts[k] = counts.get(k, 0) + 1
  groups = list(counts.items())
  order = rng.permutation(len(groups))
  return [_group_phrase(groups[j][1], groups[j][0]) for j in order]


def _obj(o: dict, *fields: str) -> str:
  words = [o[f] for f in fields] + [o["shape"]]
  return f"{_article(words[0])} {' '.join(words)}"


# What each caption template (in `captions_for` order) says about a scene: the multiset of these
# object fields (every template names every object; the object order is random). A caption of
# template t describes exactly the scenes with the same `template_signature(scene, t)`.
TEMPLATE_FIELDS = (
    ("size", "colour", "shape", "cell"),  # full detail
    ("colour", "shape"),  # colour + shape + count
    ("size", "colour", "shape", "cell"),  # position first
    ("colour", "shape", "cell"),  # total count, then colour + shape + position
    ("size", "colour", "shape"),  # size + colour + shape + count
    ("shape", "cell"),  # shape + position only
)


def template_signature(scene: dict, template: int) -> tuple:
  """What a caption of `template` says about `scene` (hashable; equal = the caption fits)."""
  fields = TEMPLATE_FIELDS[template]
  return tuple(sorted(tuple(tuple(o[f]) if f == "cell" else o[f] for f in fields)
                      for o in scene["objects"]))


def captions_for(scene: dict, rng: np.random.Generator, *,
                 with_templates: bool = False) -> list[str] | tuple[list[str], list[int]]:
  """5 distinct captions of varying detail and word order, each true of the scene
  (`with_templates`: also the template index of each, see TEMPLATE_FIELDS)."""
  objs = list(scene["objects"])
  n = len(objs)

  def shuffled():
    return [objs[j] for j in rng.permutation(n)]

  templates = [
      # full detail
      lambda: _join([f"{_obj(o, 'size', 'colour')} {position_phrase(o['cell'])}"
                     for o in shuffled()]),
      # colour + shape + count
      lambda: _join(_grouped(objs, ("colour", "shape"), rng)),
      # position first ("there is" dropped: it made this the longest template, 45 word
      # pieces with 4 objects; now every template fits in 37, see `max_caption_pieces`)
      lambda: ", ".join(f"{position_phrase(o['cell'])} {_obj(o, 'size', 'colour')}"
                        for o in shuffled()),
      # total count, then colour + shape + position
      lambda: (f"{NUMBERS[n]} shape{'s' if n > 1 else ''}: "
               + _join([f"{_obj(o, 'colour')} {position_phrase(o['cell'])}"
                        for o in shuffled()])),
      # size + colour + shape + count
      lambda: "a picture of " + _join(_grouped(objs, ("size", "colour", "shape"), rng)),
      # shape + position only
      lambda: _join([f"{_obj(o)} {position_phrase(o['cell'])}" for o in shuffled()])
      + " on a dark background",
  ]
  chosen = rng.choice(len(templates), size=5, replace=False)
  caps = [templates[t]() for t in chosen]
  if len(set(caps)) != 5:  # Not reachable with the templates above (distinct prefixes/suffixes).
    raise AssertionError(f"duplicate captions generated: {caps}")
  if len(templates) != len(TEMPLATE_FIELDS):
    raise AssertionError("TEMPLATE_FIELDS must describe every caption template.")
  return (caps, [int(t) for t in chosen]) if with_templates else caps


def dense_caption(scene: dict) -> str:
  """Every object with all its attributes, in reading order, plus the counts."""
  objs = describe_objects(scene)
  n = len(objs)
  parts = [f"there {'is' if n == 1 else 'are'} {NUMBERS[n]} object{'s' if n > 1 else ''} "
           "on a dark background."]
  for k, o in enumerate(objs):
    parts.append(f"the {ORDINALS[k]} object is {_obj(o, 'size', 'colour')} "
                 f"{position_phrase(o['cell'])}.")
  counts = _kind_counts(scene)
  kinds = sorted(counts)  # deterministic order
  parts.append("in total: " + _join([_group_phrase(counts[k], k) for k in kinds]) + ".")
  return " ".join(parts)


def num_word_pieces(text: str) -> int:
  """Word pieces of a generated text with [CLS] and [SEP]: every word of the generator is one
  bert-base-uncased word piece (tests/test_data_synthetic.py checks), and BERT's basic tokeniser
  makes each punctuation mark its own piece."""
  return len(_PIECE.findall(text)) + 2


_PIECE = re.compile(r"\w+|[^\w\s]")


# ---------------------------------------------------------------------------------------------
# Examples.


def pair_scenes(seed: int, split: str, pair: int) -> list[tuple[dict, str, list[str]]]:
  """[(scene, difference, captions)] of images 2*pair and 2*pair+1 (no rendering: cheap)."""
  code = SPLIT_CODES[split]
  rng = np.random.default_rng([seed, code, pair])
  base = sample_scene(rng)
  neg, attribute = hard_negative(base, rng)
  return [(scene, diff, captions_for(scene, np.random.default_rng([seed, code, pair, j + 1])))
          for j, (scene, diff) in enumerate(((base, ""), (neg, attribute)))]


def split_ground_truth(seed: int, split: str, num_images: int) -> list[list[set[int]]]:
  """For each image i of a split and each of its 5 captions, the set of images of the split the
  caption describes (always containing i; twins that differ only in an attribute the caption
  does not mention are in it too): the ceiling of retrieval on the generated data."""
  scenes, templates = [], []
  for pair in range((num_images + 1) // 2):
    code = SPLIT_CODES[split]
    for j, (scene, _, _) in enumerate(pair_scenes(seed, split, pair)):
      if 2 * pair + j < num_images:
        scenes.append(scene)
        rng = np.random.default_rng([seed, code, pair, j + 1])
        templates.append(captions_for(scene, rng, with_templates=True)[1])
  by_sig: dict[tuple, set[int]] = {}
  for i, scene in enumerate(scenes):
    for t in range(len(TEMPLATE_FIELDS)):
      by_sig.setdefault((t, template_signature(scene, t)), set()).add(i)
  return [[by_sig[(t, template_signature(scene, t))] for t in ts]
          for scene, ts in zip(scenes, templates)]


def generate_pair(seed: int, split: str, pair: int, image_size: int) -> list[dict]:
  """Examples 2*pair and 2*pair+1 of a split (the second differs from the first in one
  attribute)."""
  out = []
  for j, (scene, diff, captions) in enumerate(pair_scenes(seed, split, pair)):
    index = 2 * pair + j
    out.append({
        "image": encode_jpeg(render_scene(scene, image_size)),
        "index": index,
        "image_id": f"{split}_{index}",
        "file_name": "",
        "captions": captions,
        "dense_caption": dense_caption(scene),
        "has_dense": True,
        "scene": json.dumps(scene, sort_keys=True),
        "hard_negative": 2 * pair + 1 - j,
        "difference": diff,
    })
  return out


def generate_example(seed: int, split: str, index: int, image_size: int,
                     num_images: int | None = None) -> dict:
  """Regenerates example `index` of a split (what the builder wrote)."""
  ex = generate_pair(seed, split, index // 2, image_size)[index % 2]
  if num_images is not None and index == num_images - 1 and index % 2 == 0:
    ex["hard_negative"] = -1  # odd-sized split: the last image has no partner
  return ex
