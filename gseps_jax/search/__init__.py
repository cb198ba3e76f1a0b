"""Search with a trained checkpoint: the library behind `python -m gseps_jax.retrieve`.

  sources.py  images to index: a folder of files or a split of the checkpoint's dataset
  encoder.py  `Retriever`: jitted encoders and scorer of one restored model
  index.py    the index directory: build, load, check against a checkpoint
  query.py    text -> images, image -> captions

Index directory (`index` writes it into a temporary sibling directory and renames it, so a killed
run never leaves a half-written index):
  index.json            format, model name, full config, fingerprint, checkpoint path and step, a
                        summary of the weights, image names/paths, dense mode, feature file names.
  image.<leaf>.npy      `encode_images` output, leading axis = image (GRM: every level's token set
                        and mask: ori, ori_mask, key_mask, unc, unc_mask; SEPS: tokens).
  dense.<leaf>.npy      SEPS with a dense branch: each image's dense caption encoded ([Ni, Ld, D]).
  caption.<leaf>.npy    dataset indexes: the split's captions encoded (5 per image, in order), so
                        image queries rank them without re-encoding.

Dense captions (SEPS with a dense branch). Scores are honest-mode (evaluator.py): the dense caption
describes the CANDIDATE image. A dataset index uses the split's dense captions; a folder needs
`--dense=FILE.jsonl` (lines `{"image": "<file name>", "dense_caption": "..."}`), otherwise the
index is marked `dense_mode: "sparse_only"` and every score uses the sparse (query caption) branch
alone: rankings are then not those of the two-branch model, and the metadata says so.

Mismatches are errors, never silent: an index queried with a checkpoint of another model
(fingerprint), other preprocessing (image size / normalisation) or other weights (per-leaf norms)
raises `IndexMismatchError` naming what differs.
"""
