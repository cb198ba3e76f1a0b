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

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from gseps_jax import checkpoint as ckpt_lib
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


def make_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m gseps_jax.retrieve",
                              description=__doc__.split("\n", 1)[0])
  sub = p.add_subparsers(dest="command", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("-v", "--verbosity", type=int, default=-1,
                      help="-1 warnings (default), 0 INFO logs of orbax/JAX too, 1 debug.")
  ix = sub.add_parser("index", help="Encode images once into an index directory.",
                      parents=[common])
  ix.add_argument("--checkpoint", required=True,
                  help="Training workdir or WORKDIR/checkpoints/STEP.")
  ix.add_argument("--images", required=True, help="A folder of image files, or dataset:SPLIT.")
  ix.add_argument("--out", required=True, help="Index directory to write.")
  ix.add_argument("--dense", default=None, help="JSONL of per-image dense captions (folders).")
  ix.add_argument("--batch_size", type=int, default=None, help="Default: config eval.batch_size.")
  ix.add_argument("--data_dir", default=None, help="Override config.data.data_dir.")
  ix.add_argument("--overwrite", action="store_true", help="Replace an existing index.")
  ix.set_defaults(fn=cmd_index)
  q = sub.add_parser("query", help="Text -> images or image -> captions.", parents=[common])
  q.add_argument("--index", required=True)
  q.add_argument("--checkpoint", default=None, help="Default: the one recorded in the index.")
  q.add_argument("--text", default=None)
  q.add_argument("--image", default=None)
  q.add_argument("--captions", default=None, help="Captions to rank for --image, one per line.")
  q.add_argument("--dense_caption", default=None, help="SEPS: the query image's dense caption.")
  q.add_argument("--k", type=int, default=5)
  q.add_argument("--json", action="store_true", help="Machine-readable output.")
  q.set_defaults(fn=cmd_query)
  e = sub.add_parser("explain", help="Figure of what the model selects for (image, text).",
                     parents=[common])
  e.add_argument("--checkpoint", required=True)
  e.add_argument("--image", default=None)
  e.add_argument("--text", default=None)
  e.add_argument("--dense_caption", default=None, help="SEPS: the image's dense caption.")
  e.add_argument("--out", default=None, help="PNG to write.")
  e.add_argument("--queries", default=None, help="File of 'image_path<TAB>text' lines.")
  e.add_argument("--html", default=None, help="Self-contained HTML report to write.")
  e.set_defaults(fn=cmd_explain)
  return p


# Arguments that name files or folders (resolved once, before any command runs).
PATH_ARGS = ("checkpoint", "out", "dense", "data_dir", "index", "image", "captions", "html",
             "queries")


def _dispatch(args) -> int:
  if getattr(args, "k", 1) < 1:
    raise ValueError(f"--k must be >= 1, got {args.k}.")
  for name in PATH_ARGS:
    if getattr(args, name, None):
      setattr(args, name, fileio.resolve_path(getattr(args, name)))
  images = getattr(args, "images", None)
  if images and not images.startswith(sources.DATASET_PREFIX):
    args.images = fileio.resolve_path(images)
  return args.fn(args)


def main(argv: Sequence[str] | None = None) -> int:
  """Parses `argv` and runs the command; errors propagate (the console entry is `_cli`)."""
  return _dispatch(make_parser().parse_args(argv))


def _cli() -> None:
  from gseps_jax import cli  # pylint: disable=g-import-not-at-top
  args = make_parser().parse_args()
  cli.setup_logging(args.verbosity)
  if args.command == "index":
    cli.quiet_data_progress()
  # Every error raised for a user's input is a ValueError (IndexMismatchError too).
  sys.exit(cli.run(_dispatch, args,
                   user_errors_extra=(index_lib.IndexMismatchError, ValueError)))


if __name__ == "__main__":
  _cli()
