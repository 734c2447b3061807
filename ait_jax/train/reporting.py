"""What a run reports: metrics.jsonl, TensorBoard scalars, eval/ JSONs, a progress bar.

Only process 0 writes. `metrics.jsonl` has one JSON object per logged step (at least
`step` and `loss`); after a resume, lines past the restored step are dropped so the
file reads as one uninterrupted run.
"""

import json
import math
import os
import sys
import time

import jax

from ait_jax.train.tensorboard import SummaryWriter

METRICS_FILE = "metrics.jsonl"
EVAL_DIR = "eval"
TENSORBOARD_DIR = "tensorboard"


def _plain(values: dict) -> dict:
  return {k: (float(v) if not isinstance(v, (int, str)) else v) for k, v in values.items()}


def truncate_metrics(workdir: str, last_step: int) -> None:
  """Keep the lines of metrics.jsonl with step <= last_step (process 0)."""
  path = os.path.join(workdir, METRICS_FILE)
  if jax.process_index() or not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = [line for line in lines if json.loads(line)["step"] <= last_step]
  with open(path, "w") as f:
    f.writelines(kept)


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Reporter:
  """Writes train and eval metrics; shows progress on process 0."""

  def __init__(self, workdir: str, total_steps: int, *, progress_bar: bool = True):
    self.workdir = workdir
    self.total_steps = total_steps
    self.primary = jax.process_index() == 0
    self.progress_bar = progress_bar and self.primary
    self._tty = sys.stderr.isatty()
    self._writer = None
    self._jsonl = None
    self._last = None  # (time, step) of the previous log
    if self.primary:
      os.makedirs(os.path.join(workdir, EVAL_DIR), exist_ok=True)
      self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a")
      self._writer = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))

  def start(self, step: int) -> None:
    self._last = (time.perf_counter(), step)

  def train(self, step: int, metrics: dict) -> None:
    now = time.perf_counter()
    rate = float("nan")
    if self._last is not None and step > self._last[1]:
      rate = (step - self._last[1]) / max(now - self._last[0], 1e-9)
    self._last = (now, step)
    if not self.primary:
      return
    values = _plain(metrics)
    if math.isfinite(rate):
      values["steps_per_second"] = rate
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._jsonl.flush()
    self._writer.scalars(step, {f"train/{k}": v for k, v in values.items()})
    if self.progress_bar:
      self._show(step, values.get("loss", float("nan")), rate)

  def _show(self, step: int, loss: float, rate: float) -> None:
    frac = step / max(self.total_steps, 1)
    bar = "#" * int(frac * 30)
    eta = (self.total_steps - step) / rate if rate and math.isfinite(rate) else math.inf
    line = (f"[{bar:<30}] step {step}/{self.total_steps} loss {loss:.4f} "
            f"{rate:.2f} steps/s ETA {_duration(eta)}")
    if self._tty:
      sys.stderr.write("\r" + line + ("\n" if step >= self.total_steps else ""))
    else:
      sys.stderr.write(line + "\n")
    sys.stderr.flush()

  def eval(self, step: int, metrics: dict) -> str | None:
    """Writes eval/step_XXXXXXXX.json; returns its path (process 0)."""
    if not self.primary:
      return None
    path = os.path.join(self.workdir, EVAL_DIR, f"step_{step:08d}.json")
    with open(path, "w") as f:
      json.dump({"step": step, **_plain(metrics)}, f, indent=1)
    self._writer.scalars(step, {f"eval/{k}": v for k, v in _plain(metrics).items()
                                if not isinstance(v, str)})
    if self.progress_bar:
      shown = ", ".join(f"{k} {v:.4g}" for k, v in _plain(metrics).items()
                        if isinstance(v, float))
      sys.stderr.write(("\n" if self._tty else "") + f"eval at step {step}: {shown}\n")
    return path

  def close(self) -> None:
    if self.primary:
      self._jsonl.close()
      self._writer.close()
