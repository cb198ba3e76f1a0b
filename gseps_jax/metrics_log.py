"""What a training run reports while it runs: `metrics.jsonl` + TensorBoard (`MetricsWriter`) and
the console progress bar (`Progress`); both on process 0 only."""

import json
import logging

import jax
import numpy as np
from etils import epath

from gseps_jax import fileio

log = logging.getLogger(__name__)


class MetricsWriter:
  """metrics.jsonl + TensorBoard event files (tensorboardX, no TensorFlow); process 0 only."""

  def __init__(self, workdir, resume_step: int | None = None):
    """`resume_step`: the step training restarts from; rows after it (written by a run that was
    killed before its next checkpoint) are dropped so that no step appears twice (None: all
    rows are kept)."""
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.rows = self._read_rows(resume_step)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))

  def _read_rows(self, resume_step: int | None) -> list[dict]:
    """Existing rows up to `resume_step` (a torn last line is dropped); rewrites the file
    atomically when anything was dropped."""
    if not self.path.exists():
      return []
    lines = self.path.read_text().splitlines()
    rows = []
    for line in lines:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if isinstance(row, dict) and isinstance(row.get("step"), int) and (
          resume_step is None or row["step"] <= resume_step):
        rows.append(row)
    if len(rows) != len(lines):
      log.info("metrics.jsonl: dropped %d rows after step %s (from a run stopped before its next "
               "checkpoint).", len(lines) - len(rows), resume_step)
      self._rewrite(rows)
    return rows

  def _rewrite(self, rows):
    fileio.atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

  def write(self, step: int, metrics: dict, prefix: str = ""):
    """Appends one row; a row with the same step and prefix (a re-run's final evaluation)
    replaces the earlier one."""
    if not self.enabled:
      return
    row = {"step": int(step)}
    for k, v in metrics.items():
      if np.ndim(v) == 0 and isinstance(v, (int, float, np.number, np.ndarray, jax.Array)):
        row[prefix + k] = float(v)
        self.tb.add_scalar(prefix + k, float(v), int(step))
    def same_kind(r):
      ks = set(r) - {"step"}
      return r["step"] == row["step"] and (
          ks == set(row) - {"step"} or (prefix and ks and all(k.startswith(prefix) for k in ks)))

    same = [r for r in self.rows if same_kind(r)]
    if same:
      self.rows = [r for r in self.rows if not any(r is x for x in same)] + [row]
      self._rewrite(self.rows)
    else:
      self.rows.append(row)
      with self.path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    self.tb.flush()

  def close(self):
    if self.enabled:
      self.tb.close()


class Progress:
  """tqdm bar on process 0 showing step, loss, lr, steps/s and ETA."""

  def __init__(self, start, total, enabled):
    self.bar = None
    if enabled:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
    self.pos = start

  def update(self, step, metrics):
    if self.bar is None:
      return
    self.bar.update(step - self.pos)
    self.pos = step
    self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                         it_s=f"{metrics['steps_per_s']:.2f}")

  def note(self, text):
    if self.bar is not None:
      self.bar.write(text)

  def close(self):
    if self.bar is not None:
      self.bar.close()
