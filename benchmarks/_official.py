"""Locates and imports the SEPS authors' PyTorch code for side-by-side benchmarks.

The official code is NOT part of this repository (its licence and size are not ours); it lives in
the git-ignored directory `benchmarks/_official/` or wherever `--official_dir` points. Get it with:

  git clone https://github.com/Sweet4tars/seps benchmarks/_official   # or the fork
  git -C benchmarks/_official checkout 7f4dfa6                        # github.com/maxingan2412/seps
  # or, from a bare mirror:  git --git-dir=MIRROR archive 7f4dfa6 -- lib | tar -x -C DIR

Only `lib/` is imported (`lib.vse`, `lib.cross_net`, `lib.encoders`, `lib.loss`, `lib.xttn`,
`lib.utils`); none of them imports torchvision (only `lib/image_caption.py`, the data loader, does),
so no torchvision stub is needed. What IS shimmed, because the official encoders call the HF hub
(`ViTModel.from_pretrained("google/vit-base-patch16-224-in21k")`, `BertModel.from_pretrained(
"bert-base-uncased")`, `BertTokenizer.from_pretrained(...)`) and there is no network here:
`lib.encoders.ViTModel` / `BertModel` / `BertTokenizer` are replaced, for the duration of the model
construction only, by factories that build the SAME HF classes from a given config with random
weights (`ViTModel(ViTConfig(**cfg))`), and a tokenizer placeholder that is never called on these
code paths. Everything that runs in the timed paths is the official code.
"""

import argparse
import contextlib
import importlib
import os
import sys
from typing import Any, Mapping, Optional

OFFICIAL_COMMIT = "7f4dfa6"
OFFICIAL_REPOS = ("https://github.com/Sweet4tars/seps", "https://github.com/maxingan2412/seps")
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_official")

HOW_TO_GET = f"""\
The official SEPS PyTorch code was not found at {{path}}.
Get it (it is not vendored; benchmarks/_official/ is git-ignored):
  git clone {OFFICIAL_REPOS[0]} benchmarks/_official    (or the fork {OFFICIAL_REPOS[1]})
  git -C benchmarks/_official checkout {OFFICIAL_COMMIT}
then rerun, or pass --official_dir DIR pointing at a checkout (the directory holding lib/cross_net.py).
"""

_REQUIRED = ("lib/cross_net.py", "lib/vse.py", "lib/encoders.py", "lib/loss.py", "lib/xttn.py",
             "lib/utils.py")


class OfficialCodeMissing(FileNotFoundError):
  pass


def locate(official_dir: Optional[str] = None) -> str:
  """Absolute path of the official checkout; raises `OfficialCodeMissing` with instructions."""
  path = os.path.abspath(official_dir or DEFAULT_DIR)
  missing = [f for f in _REQUIRED if not os.path.isfile(os.path.join(path, f))]
  if missing:
    raise OfficialCodeMissing(HOW_TO_GET.format(path=path) + f"(missing: {', '.join(missing)})")
  return path


def commit_of(path: str) -> str:
  """The checked-out commit if known (`git rev-parse`, or a COMMIT file written on export)."""
  marker = os.path.join(path, "COMMIT")
  if os.path.isfile(marker):
    return open(marker).read().strip()
  head = os.path.join(path, ".git", "HEAD")
  if os.path.isfile(head):
    ref = open(head).read().strip()
    if ref.startswith("ref: "):
      ref_file = os.path.join(path, ".git", ref[5:])
      return open(ref_file).read().strip()[:7] if os.path.isfile(ref_file) else ref
    return ref[:7]
  return f"unknown (expected {OFFICIAL_COMMIT})"


def import_official(official_dir: Optional[str] = None):
  """Imports the official `lib` package from the checkout; returns (lib.vse, lib.cross_net, path).

  The official modules import each other as `lib.xxx`, so the checkout goes first on sys.path.
  """
  path = locate(official_dir)
  if path not in sys.path:
    sys.path.insert(0, path)
  if "lib" in sys.modules and not getattr(sys.modules["lib"], "__file__", "").startswith(path):
    raise ImportError(f"another module named 'lib' is already imported "
                      f"({sys.modules['lib'].__file__}); cannot import the official lib/.")
  vse = importlib.import_module("lib.vse")
  cross_net = importlib.import_module("lib.cross_net")
  return vse, cross_net, path


def make_opt(**overrides) -> argparse.Namespace:
  """The official argparse defaults (`arguments.get_argument_parser`) with overrides.

  Written out (not imported) because arguments.py parses sys.argv-free defaults only through its
  parser; these are its defaults at 7f4dfa6 for every field the model code reads.
  """
  opt = dict(embed_size=512, num_patches=196, sparse_ratio=0.5, aggr_ratio=0.4,
             attention_weight=0.8, ratio_weight=2.0, margin=0.2, max_violation=True, loss="vse",
             multi_gpu=0, vit_type="vit", img_res=224, learning_rate=2e-4, grad_clip=2.0,
             dataset="f30k")
  opt.update(overrides)
  return argparse.Namespace(**opt)


@contextlib.contextmanager
def offline_encoders(vision_cfg: Mapping[str, Any], text_cfg: Mapping[str, Any]):
  """Within the block, the official encoders' hub loads build random HF models from our configs.

  Args:
    vision_cfg: HF ViT config keys (hidden_size, num_hidden_layers, image_size, patch_size, ...).
    text_cfg: HF BERT config keys.
  """
  import transformers
  enc = importlib.import_module("lib.encoders")
  keys = lambda cfg: {k: v for k, v in cfg.items() if k != "model_type"}

  class _FromConfig:
    def __init__(self, cls, config_cls, cfg):
      self.cls, self.config_cls, self.cfg = cls, config_cls, cfg

    def from_pretrained(self, name, *args, **kwargs):
      del name, args, kwargs
      return self.cls(self.config_cls(**keys(self.cfg)))

  class _NoTokenizer:
    @staticmethod
    def from_pretrained(*args, **kwargs):
      return None  # the timed paths never tokenize

  saved = (enc.ViTModel, enc.BertModel, enc.BertTokenizer)
  enc.ViTModel = _FromConfig(transformers.ViTModel, transformers.ViTConfig, vision_cfg)
  enc.BertModel = _FromConfig(transformers.BertModel, transformers.BertConfig, text_cfg)
  enc.BertTokenizer = _NoTokenizer
  try:
    yield
  finally:
    enc.ViTModel, enc.BertModel, enc.BertTokenizer = saved


def build_vse_model(vse, vision_cfg, text_cfg, opt):
  """The official `VSEModel(opt)` with random encoders of the given configs.

  The official ViT encoder hard-codes `opt.num_patches = 196` for 'vit'; the cross net is rebuilt
  with the true patch grid of `vision_cfg` so that N_c = int(grid * alpha * rho) on both sides.
  """
  with offline_encoders(vision_cfg, text_cfg):
    model = vse.VSEModel(opt)
  grid = (vision_cfg["image_size"] // vision_cfg["patch_size"]) ** 2
  opt.num_patches = grid
  cross_net = importlib.import_module("lib.cross_net")
  model.cross_net = cross_net.CrossSparseAggrNet_v2(opt)
  return model
