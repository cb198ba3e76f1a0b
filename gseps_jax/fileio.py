"""Filesystem helpers shared by the CLIs: everything goes through `etils.epath`, so workdirs,
checkpoints, indexes and exports may live on `gs://` as well as on local disk."""

import contextlib
import uuid

from etils import epath


def is_remote(path) -> bool:
  return "://" in str(path)


def absolute(path) -> epath.Path:
  """`path` as an epath.Path; a local path made absolute (a `gs://` URI already is)."""
  path = epath.Path(path)
  return path if is_remote(path) else path.absolute()


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
  try:
    yield tmp
    if out.exists():
      old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
      out.rename(old)
      tmp.rename(out)
      old.rmtree() if old.is_dir() else old.unlink()
    else:
      tmp.rename(out)
  except BaseException:
    try:
      tmp.rmtree(missing_ok=True)
    except OSError:  # cleanup is best effort; the original error is the one to report
      pass
    raise
