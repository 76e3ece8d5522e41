"""Metric writers with clu's `MetricWriter` interface, without TensorFlow (which
`clu.metric_writers` imports): DIR/metrics.jsonl, TensorBoard events (tensorboardX), logs.

metrics.jsonl: one line per (step, split), `"validation/dice"` is split "validation", name
"dice"; non-finite values are `null`. On resume, a line cut short by a kill is dropped, and
with `resume_step` so are lines (and TensorBoard events) of later steps, which the resumed
run writes again.
"""

import abc
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tensorboardX
from absl import logging
from tensorboardX import summary as tb_summary

from cxr_jax.core.run.layout import RunDir
from cxr_jax.data import paths


class MetricWriter(abc.ABC):
  """What the trainer writes to; the interface of `clu.metric_writers.MetricWriter`."""

  @abc.abstractmethod
  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """`scalars`: {"split/name": number} (numbers, numpy or jax scalars)."""

  @abc.abstractmethod
  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """`images`: {tag: [N, H, W, C]} with C in {1, 3, 4}, uint8 or float in [0, 1]."""

  @abc.abstractmethod
  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """`hparams`: flat {name: bool/int/float/str}; nested mappings are flattened with '.'."""

  def flush(self) -> None:
    pass

  def close(self) -> None:
    self.flush()

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def split_name(name: str, default_split: str) -> tuple[str, str]:
  """ "validation/dice" -> ("validation", "dice"); "loss" -> (default_split, "loss")."""
  split, sep, rest = name.partition("/")
  return (split, rest) if sep and split and rest else (default_split, name)


def _to_float(value: Any) -> float:
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f"a scalar must have one element, got shape {array.shape}.")
  return float(array.reshape(()))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _to_uint8_images(tag: str, images: Any) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
    raise ValueError(
      f"images[{tag!r}] has shape {images.shape}; expected [N, H, W, C] with C in {{1, 3, 4}}."
    )
  if images.dtype == np.uint8:
    return images
  if images.dtype.kind not in "fb":
    raise ValueError(
      f"images[{tag!r}] has dtype {images.dtype}; expected uint8 or float in [0, 1]."
    )
  return np.round(np.clip(images.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)


class JsonlWriter(MetricWriter):
  """Appends scalars to a JSONL file, one object per (step, split), flushed per line.

  It keeps every line it holds: a file deleted or replaced mid-run is written again whole,
  so nothing is lost.
  """

  def __init__(self, path: str, *, default_split: str = "train", resume_step: int | None = None):
    self.path = path
    self.default_split = default_split
    self.lines = _clean_tail(path, resume_step)
    self._file = open(path, "a", encoding="utf-8")

  def _reopen_if_gone(self) -> None:
    try:
      gone = not os.path.samestat(os.stat(self.path), os.fstat(self._file.fileno()))
    except FileNotFoundError:
      gone = True
    if gone:
      logging.warning(
        "%s was deleted or replaced during the run; writing it again with all %d lines.",
        self.path,
        len(self.lines),
      )
      self._file.close()
      self._file = open(self.path, "w", encoding="utf-8")
      self._file.write("".join(line + "\n" for line in self.lines))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    rows: dict[str, dict[str, Any]] = {}
    for name, value in scalars.items():
      split, key = split_name(name, self.default_split)
      value = _to_float(value)
      rows.setdefault(split, {})[key] = value if math.isfinite(value) else None
    self._reopen_if_gone()
    for split, values in rows.items():
      record = {"step": int(step), "split": split, **dict(sorted(values.items()))}
      line = json.dumps(record, allow_nan=False)
      self.lines.append(line)
      self._file.write(line + "\n")
    self._file.flush()

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    del step, images  # images go to TensorBoard only

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    del hparams  # DIR/config.json holds the config

  def flush(self) -> None:
    if not self._file.closed:
      self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()


def _clean_tail(path: str, resume_step: int | None) -> list[str]:
  """Drops a partial last line (a kill mid-write) and lines with step > resume_step; returns
  the lines kept."""
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    text = f.read()
  lines = text.split("\n")
  partial = lines.pop()  # '' when the file ends with a newline
  keep = []
  for line in lines:
    if resume_step is not None and line.strip():
      try:
        if int(json.loads(line)["step"]) > resume_step:
          continue
      except (ValueError, KeyError, TypeError):
        pass  # not ours to judge: keep it
    keep.append(line)
  if partial or len(keep) != len(lines):
    if partial:
      logging.warning(
        "%s: dropping a partial last line (a run killed mid-write): %r", path, partial[:200]
      )
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
  return keep


class TensorBoardWriter(MetricWriter):
  """TensorBoard event files in `logdir`, written by tensorboardX (no TensorFlow)."""

  def __init__(self, logdir: str, *, resume_step: int | None = None):
    # purge_step: TensorBoard hides the events of steps >= it from an earlier, killed run.
    purge_step = None if resume_step is None else resume_step + 1
    self.logdir = logdir
    self._writer = tensorboardX.SummaryWriter(logdir=logdir, purge_step=purge_step, flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for tag, value in scalars.items():
      self._writer.add_scalar(tag, _to_float(value), global_step=int(step))

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    for tag, batch in images.items():
      self._writer.add_images(
        tag, _to_uint8_images(tag, batch), global_step=int(step), dataformats="NHWC"
      )

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    flat = {}
    for key, value in _flatten(hparams).items():
      if isinstance(value, (bool, int, float, str)):
        flat[key] = value
      elif isinstance(value, (np.generic, np.ndarray)) and np.ndim(value) == 0:
        flat[key] = value.item()
      else:
        flat[key] = str(value)
    file_writer = self._writer._get_file_writer()  # pylint: disable=protected-access
    # In this run's own event file (SummaryWriter.add_hparams would open a new sub-run).
    for proto in tb_summary.hparams(flat, {}):
      file_writer.add_summary(proto)

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class BucketWriter(MetricWriter):
  """metrics.jsonl and TensorBoard events for a run directory in a bucket (gs://).

  Objects cannot be appended to: both are written on local disk (a spool folder) and copied
  up at `flush()`, which the trainer calls before every checkpoint, and at most every
  `upload_every_s` on writes. metrics.jsonl goes up whole (a few hundred KB at most); the
  event file is closed, uploaded and a new one started, so no event is uploaded twice
  (TensorBoard reads every event file of a folder). A kill loses at most what came after
  the last checkpoint, which the resumed run drops and writes again anyway.
  """

  def __init__(self, workdir: str, *, resume_step: int | None = None, upload_every_s=60.0):
    self.workdir = workdir
    self.upload_every_s = upload_every_s
    self._spool = tempfile.mkdtemp(prefix="cxr_jax_writer_")
    local = os.path.join(self._spool, RunDir.METRICS)
    remote = RunDir(workdir).metrics
    if remote.exists():
      with open(local, "wb") as f:
        f.write(remote.read_bytes())
    self._jsonl = JsonlWriter(local, resume_step=resume_step)
    self._resume_step = resume_step
    self._events: TensorBoardWriter | None = None
    self._last_upload = time.monotonic()

  def _tensorboard(self) -> "TensorBoardWriter":
    if self._events is None:
      logdir = tempfile.mkdtemp(dir=self._spool)
      # Only the first event file of this run hides the killed run's later steps.
      self._events = TensorBoardWriter(logdir, resume_step=self._resume_step)
      self._resume_step = None
    return self._events

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._jsonl.write_scalars(step, scalars)
    self._tensorboard().write_scalars(step, scalars)
    if time.monotonic() - self._last_upload > self.upload_every_s:
      self.flush()

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    self._tensorboard().write_images(step, images)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._tensorboard().write_hparams(hparams)

  def flush(self) -> None:
    self._jsonl.flush()
    paths.write_text(
      str(RunDir(self.workdir).metrics), "".join(f"{x}\n" for x in self._jsonl.lines)
    )
    if self._events is not None:
      self._events.close()
      paths.upload_tree(self._events.logdir, self.workdir)
      shutil.rmtree(self._events.logdir)
      self._events = None
    self._last_upload = time.monotonic()

  def close(self) -> None:
    self.flush()
    self._jsonl.close()
    shutil.rmtree(self._spool, ignore_errors=True)


class LoggingWriter(MetricWriter):
  """absl logging of scalars (and of what images/hparams were written)."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    logging.info(
      "[%d] %s",
      step,
      ", ".join(f"{name}={_to_float(value):.6g}" for name, value in scalars.items()),
    )

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    logging.info(
      "[%d] images: %s",
      step,
      ", ".join(f"{tag} {np.shape(value)}" for tag, value in images.items()),
    )

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.info(
      "hparams: %s",
      ", ".join(f"{key}={value!r}" for key, value in sorted(_flatten(hparams).items())),
    )


class MultiWriter(MetricWriter):
  """Writes to every writer in turn."""

  def __init__(self, writers: list[MetricWriter]):
    self.writers = list(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for writer in self.writers:
      writer.write_scalars(step, scalars)

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    for writer in self.writers:
      writer.write_images(step, images)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    for writer in self.writers:
      writer.write_hparams(hparams)

  def flush(self) -> None:
    for writer in self.writers:
      writer.flush()

  def close(self) -> None:
    for writer in self.writers:
      writer.close()


def create_writer(
  workdir: str,
  *,
  just_logging: bool | None = None,
  default_split: str = "train",
  resume_step: int | None = None,
  log: bool = True,
  also: Sequence[MetricWriter] = (),
) -> MultiWriter:
  """The run's writer: DIR/metrics.jsonl + TensorBoard events in DIR + logging.

  Args:
    workdir: the run's directory (created if missing).
    just_logging: only log (no files). None: True on processes other than 0, so one process
      writes the files of a multi-process run.
    default_split: split of scalar names without a "split/" prefix.
    resume_step: the step a resumed run restarted from; records of later steps, written by
      the run that was killed, are dropped. None: keep everything.
    log: also log every write (off where the caller logs its own summary line).
    also: more writers of the files' process (e.g. an experiment tracker).
  """
  if just_logging is None:
    just_logging = jax.process_index() > 0
  logger = [LoggingWriter()] if log else []
  if just_logging:
    return MultiWriter(logger)
  if paths.is_url(workdir):
    return MultiWriter([BucketWriter(workdir, resume_step=resume_step), *also, *logger])
  os.makedirs(workdir, exist_ok=True)
  return MultiWriter(
    [
      JsonlWriter(
        str(RunDir(workdir).metrics), default_split=default_split, resume_step=resume_step
      ),
      TensorBoardWriter(workdir, resume_step=resume_step),
      *also,
      *logger,
    ]
  )
