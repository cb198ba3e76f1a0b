"""Filesystem helpers shared by the CLIs: everything goes through `etils.epath`, so workdirs,
checkpoints, indexes and exports may live on `gs://` as well as on local disk."""

import contextlib
import os
import uuid

from etils import epath


def is_remote(path) -> bool:
  return "://" in str(path)


def absolute(path) -> epath.Path:
  """`path` as an epath.Path; a local path made absolute (a `gs://` URI already is)."""
  path = epath.Path(path)
  return path if is_remote(path) else path.absolute()


def resolve_path(path):
  """A path given by a user, as the absolute string every library call gets: a local path is
  `~`-expanded and made absolute against the current directory (orbax refuses relative paths, and
  a later `chdir` must not move it); a URL such as `gs://bucket/x` is returned untouched (never
  through pathlib: `os.fspath(pathlib.Path("gs://b/x"))` is "gs:/b/x"). None and "" (= unset)
  are returned as they are. Called once, at the command-line boundary."""
  if path is None or str(path) == "":
    return path
  path = str(path)
  if is_remote(path):
    return path
  return os.path.abspath(os.path.expanduser(path))  # local-path-ok: local branch


def read_utf8(path, error=ValueError) -> str:
  """The text of a UTF-8 file (local or `gs://`). Invalid bytes raise `error` naming the file,
  line and byte ('utf-8' codec can't decode byte 0xe9 in position 602 says neither)."""
  data = epath.Path(path).read_bytes()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    raise error(f"{path} line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column "
                f"{column}); save the file as UTF-8.") from None


def _location(path) -> str:
  """Comparable form of a path: symlinks resolved locally, trailing slashes dropped on URLs."""
  path = str(path)
  if is_remote(path):
    return path.rstrip("/")
  return os.path.realpath(os.path.expanduser(path))  # local-path-ok: local branch


def check_out_not_source(out, *sources) -> None:
  """Refuses an output folder that is, contains or lies inside one of `sources`.

  Call it before anything is written: replacing (`--overwrite`) such an output would delete the
  inputs it is made from (e.g. `export --checkpoint=W --out=W --overwrite` deleted the training
  workdir). Each source is a path or a `(label, path)` pair, e.g. `("--checkpoint", workdir)`;
  unset ones (None, "") are skipped.

  Raises:
    FileExistsError: naming the output, the source and how they overlap.
  """
  o = _location(out)
  for src in sources:
    label, src = src if isinstance(src, tuple) else ("source", src)
    if src is None or str(src) == "":
      continue
    s = _location(src)
    if o == s:
      how = "is"
    elif s.startswith(o.rstrip("/") + "/"):
      how = "contains"
    elif o.startswith(s.rstrip("/") + "/"):
      how = "lies inside"
    else:
      continue
    raise FileExistsError(
        f"Output {out} {how} the {label} {src}: choose an output folder outside every input "
        f"(nothing was written or deleted).")


@contextlib.contextmanager
def _removed_on_error(tmp: epath.Path):
  """Removes the temporary file or directory `tmp` if the block raises, then re-raises: the
  block's error is the one reported (the cleanup is best effort)."""
  try:
    yield
  except BaseException:
    try:
      tmp.rmtree(missing_ok=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    except OSError:
      pass
    raise


@contextlib.contextmanager
def atomic_dir(out, overwrite: bool = False):
  """Yields a fresh temporary directory (epath.Path) beside `out`; renames it to `out` on success.

  On any exception the temporary directory is removed and `out` is untouched. An existing
  non-empty `out` is an error unless `overwrite` (then it is replaced only after success).
  Goes through epath: `import_official` writes a workdir, which may be on `gs://`.
  """
  out = absolute(out)
  if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
    raise FileExistsError(f"Output {out} already exists; choose a new --out or pass --overwrite.")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  with _removed_on_error(tmp):
    yield tmp
    if out.exists():
      old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
      out.rename(old)
      tmp.rename(out)
      old.rmtree() if old.is_dir() else old.unlink()
    else:
      tmp.rename(out)


def atomic_write_text(path, text: str) -> epath.Path:
  """Writes `text` to `path` whole or not at all, replacing an existing file.

  The text goes to a uniquely named temporary file beside `path` that then replaces it
  (`os.replace` locally: atomic on POSIX; epath's `replace` on `gs://`, where an object write is
  atomic anyway). `rename` is not used: the pinned etils refuses to rename onto an existing file,
  which made every re-run of a finished run fail. A failed write removes its temporary file.
  """
  path = absolute(path)
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  with _removed_on_error(tmp):
    if is_remote(path):
      tmp.write_text(text)
      tmp.replace(path)
    else:
      with open(tmp, "w", encoding="utf-8") as f:  # local-path-ok: local branch (fsync)
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)  # local-path-ok: local branch (atomic on POSIX)
  return path
