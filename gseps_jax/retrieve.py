r"""Search with a trained checkpoint: `python -m gseps_jax.retrieve index | query | explain`.

  # Encode a folder of images (or a split of the checkpoint's dataset) once:
  python -m gseps_jax.retrieve index --checkpoint=runs/grm --images=photos/ --out=idx
  python -m gseps_jax.retrieve index --checkpoint=runs/grm --images=dataset:test --out=idx_test
  # Text -> images (top-k table, or --json), image -> captions:
  python -m gseps_jax.retrieve query --index=idx --text="a red circle left of a blue square" --k=5
  python -m gseps_jax.retrieve query --index=idx_test --image=photo.png --json
  python -m gseps_jax.retrieve query --index=idx --image=photo.png --captions=captions.txt
  # What the model selects (figure; or an HTML report for a file of "image<TAB>text" lines):
  python -m gseps_jax.retrieve explain --checkpoint=runs/grm --image=x.png --text="..." --out=x.png
  python -m gseps_jax.retrieve explain --checkpoint=runs/grm --queries=q.tsv --html=report.html

The library (sources, encoder, index, queries) is the `gseps_jax.search` package; this module is
its command line.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Sequence

from gseps_jax import checkpoint as ckpt_lib
from gseps_jax import cli
from gseps_jax import fileio
from gseps_jax import state as state_lib
from gseps_jax.search import encoder
from gseps_jax.search import index as index_lib
from gseps_jax.search import query
from gseps_jax.search import sources


def _restore(checkpoint: str, data_dir: str | None = None):
  config, _, _ = ckpt_lib.load_config_from_checkpoint(checkpoint)
  if data_dir:
    config.data.data_dir = data_dir
  return state_lib.restore_params(checkpoint, config=config)


def _read_lines(path) -> list[str]:
  lines = [ln.rstrip("\n") for ln in fileio.read_utf8(path).splitlines()]
  lines = [ln for ln in lines if ln.strip()]
  if not lines:
    raise ValueError(f"{path} has no non-empty lines.")
  return lines


def cmd_index(args) -> int:
  config, model, params, step = _restore(args.checkpoint, args.data_dir)
  if args.overwrite:  # replacing --out must never delete what the index is built from
    fileio.check_out_not_source(
        args.out, ("--checkpoint workdir", ckpt_lib.resolve(args.checkpoint)[0]),
        ("--images folder",
         None if args.images.startswith(sources.DATASET_PREFIX) else args.images),
        ("--dense file", args.dense), ("data_dir", config.data.get("data_dir")))
  retriever = encoder.Retriever(config, model, params, batch_size=args.batch_size)
  source = sources.open_images(args.images, config, args.dense)
  out = index_lib.build_index(retriever, source, args.out, checkpoint=args.checkpoint,
                              step=step, overwrite=args.overwrite)
  meta = json.loads((out / "index.json").read_text())
  print(f"Indexed {meta['num_images']} images from {source.description} with {config.model.name} "
        f"(step {step}) -> {out} [dense_mode={meta['dense_mode']}]")
  if meta["dense_mode"] == "sparse_only":
    print("Note: " + meta["dense_note"])
  return 0


def cmd_query(args) -> int:
  if bool(args.text) == bool(args.image):
    raise ValueError("query needs exactly one of --text or --image.")
  index = index_lib.load_index(args.index)
  checkpoint = args.checkpoint or index.meta.get("checkpoint")
  if not checkpoint:
    raise ValueError(f"Index {args.index} records no checkpoint; pass --checkpoint.")
  # Model and preprocessing are checked from the checkpoint's JSON meta before any weights load.
  config, _, _ = ckpt_lib.load_config_from_checkpoint(checkpoint)
  index_lib.check_index(index, config, checkpoint=checkpoint)
  config, model, params, step = _restore(checkpoint)
  index_lib.check_index(index, config, params, checkpoint=checkpoint)
  retriever = encoder.Retriever(config, model, params)
  if args.text:
    hits = query.search_texts(retriever, index, [args.text], k=args.k)[0]
    result = {"query": {"text": args.text}, "direction": "text_to_image",
              "dense_mode": index.meta["dense_mode"], "hits": hits}
    label = "image"
  else:
    if args.captions:
      captions, caption_feats = _read_lines(args.captions), None
    elif index.caption_texts:
      captions, caption_feats = index.caption_texts, index.captions
    else:
      raise ValueError(f"--image needs captions to rank: pass --captions=FILE (one per line); "
                       f"index {args.index} was built from a folder and has none.")
    image = Path(args.image).read_bytes()  # local-path-ok: a query image the user passes
    hits, mode = query.search_image(retriever, image, captions, k=args.k,
                                    caption_feats=caption_feats,
                                    dense_caption=args.dense_caption, name=args.image)
    result = {"query": {"image": args.image}, "direction": "image_to_text", "dense_mode": mode,
              "hits": hits}
    label = "caption"
  result.update(model=config.model.name, checkpoint=str(checkpoint), checkpoint_step=step,
                index=str(index.path))
  if args.json:
    print(json.dumps(result, indent=1))
  else:
    q = args.text if args.text else args.image
    print(f"{config.model.name} step {step}, top {len(hits)} for {q!r} "
          f"(dense_mode={result['dense_mode']}):")
    print(query.format_hits(hits, label))
  return 0


def cmd_explain(args) -> int:
  from gseps_jax import explain as explain_lib  # pylint: disable=g-import-not-at-top
  config, model, params, step = _restore(args.checkpoint)
  explainer = explain_lib.Explainer(config, model, params)
  if args.queries:
    if not args.html:
      raise ValueError("--queries writes an HTML report: pass --html=REPORT.html.")
    queries = []
    for ln in _read_lines(args.queries):
      if "\t" not in ln:
        raise ValueError(f"{args.queries}: expected 'image_path<TAB>text', got {ln[:80]!r}.")
      img, text = ln.split("\t", 1)
      queries.append((img, text))
    out = explain_lib.html_report(explainer, queries, args.html,
                                  title=f"{config.model.name} step {step}")
    print(f"Wrote {out} ({len(queries)} queries).")
    return 0
  if not (args.image and args.text and args.out):
    raise ValueError("explain needs --image, --text and --out (or --queries and --html).")
  fileio.check_out_not_source(args.out, ("--image", args.image))
  out, _ = explainer(args.image, args.text, out=args.out, dense_caption=args.dense_caption)
  print(f"Wrote {out}.")
  if args.html:
    explain_lib.html_report(explainer, [(args.image, args.text)], args.html,
                            title=f"{config.model.name} step {step}")
    print(f"Wrote {args.html}.")
  return 0


def define_flags(fv) -> None:
  """The flags of every subcommand, defined in `fv` (absl's FLAGS on the command line; a fresh
  set for each in-process `main`). Which subcommand takes which: `COMMANDS`."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  s = functools.partial(flags.DEFINE_string, default=None, flag_values=fv)
  s("checkpoint", help="Training workdir or WORKDIR/checkpoints/STEP (query: default the one "
    "recorded in the index).")
  s("images", help="index: a folder of image files, or dataset:SPLIT.")
  s("out", help="index: the index directory to write; explain: the PNG to write.")
  s("dense", help="index: JSONL of per-image dense captions (folders).")
  flags.DEFINE_integer("batch_size", None, "index: default config eval.batch_size.",
                       lower_bound=1, flag_values=fv)
  s("data_dir", help="index: override config.data.data_dir.")
  flags.DEFINE_bool("overwrite", False, "index: replace an existing index.", flag_values=fv)
  s("index", help="query: the index directory.")
  s("text", help="query: the text to find images for; explain: the text.")
  s("image", help="query: the image to rank captions for; explain: the image.")
  s("captions", help="query: captions to rank for --image, one per line.")
  s("dense_caption", help="SEPS: the (query) image's dense caption.")
  flags.DEFINE_integer("k", 5, "query: how many hits.", lower_bound=1, flag_values=fv)
  flags.DEFINE_bool("json", False, "query: machine-readable output.", flag_values=fv)
  s("queries", help="explain: file of 'image_path<TAB>text' lines (with --html).")
  s("html", help="explain: self-contained HTML report to write.")


COMMANDS = {
    "index": cli.Subcommand("Encode images once into an index directory.", cmd_index,
                            ("checkpoint", "images", "out"),
                            ("dense", "batch_size", "data_dir", "overwrite")),
    "query": cli.Subcommand("Text -> images or image -> captions.", cmd_query, ("index",),
                            ("checkpoint", "text", "image", "captions", "dense_caption", "k",
                             "json")),
    "explain": cli.Subcommand("Figure of what the model selects for (image, text).",
                              cmd_explain, ("checkpoint",),
                              ("image", "text", "dense_caption", "out", "queries", "html")),
}
__doc__ += "\n" + cli.subcommand_help(COMMANDS)  # what --help prints

# Arguments that name files or folders (resolved once, before any command runs).
PATH_ARGS = ("checkpoint", "out", "dense", "data_dir", "index", "image", "captions", "html",
             "queries")
PROG = "python -m gseps_jax.retrieve"


def run(argv: Sequence[str], fv, *, console: bool = False) -> int:
  """Runs the subcommand `argv[1]` with the parsed flags `fv`; errors propagate."""
  name, args = cli.subcommand_args(argv, COMMANDS, fv, PROG)
  for arg in PATH_ARGS:
    if getattr(args, arg, None):
      setattr(args, arg, fileio.resolve_path(getattr(args, arg)))
  images = getattr(args, "images", None)
  if images and not images.startswith(sources.DATASET_PREFIX):
    args.images = fileio.resolve_path(images)
  if console and name == "index":
    cli.quiet_data_progress()
  return COMMANDS[name].fn(args)


def main(argv: Sequence[str]) -> int:
  """The command line in-process: `main(["query", "--index=idx", "--text=a red circle"])`
  (flags parsed into a fresh set, `cli.parse_in_process`); errors propagate."""
  fv, rest = cli.parse_in_process(define_flags, argv, prog=PROG)
  return run(rest, fv)


if __name__ == "__main__":
  from absl import flags as _flags  # pylint: disable=g-import-not-at-top
  define_flags(_flags.FLAGS)
  # Every error raised for a user's input is a ValueError (IndexMismatchError too).
  cli.run_absl(lambda argv: run(argv, _flags.FLAGS, console=True),
               user_errors_extra=(index_lib.IndexMismatchError, ValueError))
