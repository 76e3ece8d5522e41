"""Reading a dataset's examples for the builder, in this process, in N worker processes, or on
Apache Beam workers (numpy, PIL; no TFDS, so a worker process starts quickly).

A reader's `read` decodes and resizes one image (the build's cost); `ReaderSpec` says how to
open the reader again in another process (`DatasetKind.open_reader` with its arguments: a
reader holding an open zip file cannot be pickled, its opener can), so every registered
kind gets the parallel build without code of its own.
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from absl import logging

from cxr_jax.data import images
from cxr_jax.data.records import DataError
from cxr_jax.data.records import Example
from cxr_jax.data.records import Skip

# Images handed to the workers ahead of the one being written, per worker: enough to keep
# them busy, few enough that memory does not grow with the dataset.
AHEAD_PER_WORKER = 4


@dataclasses.dataclass(frozen=True)
class ReaderSpec:
  """How to open a kind's reader (in any process) and what its examples may hold.

  open_reader: `DatasetKind.open_reader` (a class or module-level function: pickled by
  reference). source_names: the builder's `source` ClassLabel names. sources: the kind's own.
  """

  kind: str
  open_reader: Callable[[str, int], Any]
  manual_dir: str
  num_examples: int
  source_names: tuple[str, ...]
  sources: tuple[str, ...]

  def open(self):
    return self.open_reader(self.manual_dir, self.num_examples)


@dataclasses.dataclass
class Read:
  """One image's outcome: its features (None: unusable) and the files skipped on the way."""

  image_id: str
  features: dict | None
  skips: list[Skip]


def read_example(spec: ReaderSpec, reader, image_id: str, handle) -> Read:
  """Reads and encodes one example (`features`); raises DataError for a source the kind does
  not declare."""
  skips: list[Skip] = []
  example = reader.read(handle, skips.append)
  if example is None:
    return Read(image_id, None, skips)
  if example.source not in spec.sources:
    raise DataError(
      f"{image_id}: source {example.source!r} is not one of dataset kind "
      f"{spec.kind!r}'s sources {list(spec.sources)}."
    )
  return Read(image_id, features(example, spec.source_names.index(example.source)), skips)


def features(example: Example, source: int) -> dict:
  """An Example as the builder's features (PNG-encoded image and mask)."""
  has_mask = example.mask is not None
  return {
    "image": example.image_png or images.encode_png(example.image),
    "mask": images.encode_png(example.mask if has_mask else np.zeros_like(example.image)),
    "has_mask": has_mask,
    "label": example.label,
    "source": source,
    "id": example.id,
    "sex": example.sex,
    "age": example.age,
    "finding": example.finding,
    "spacing_mm": np.asarray(example.spacing_mm, np.float32),
    "spacing_estimated": example.spacing_estimated,
  }


# ----- one reader per process -----

_READERS: dict[ReaderSpec, Any] = {}


def _reader(spec: ReaderSpec):
  """This process's reader of `spec`, opened once (a worker serves many images)."""
  if spec not in _READERS:
    _READERS[spec] = spec.open()
  return _READERS[spec]


def _read_in_worker(spec: ReaderSpec, image_id: str, handle) -> Read:
  return read_example(spec, _reader(spec), image_id, handle)


class Workers:
  """N processes reading examples, results in the order asked (a context manager).

  workers <= 1 reads in this process (with the reader given to `read`, the listing's own).
  """

  def __init__(self, workers: int):
    self.workers = int(workers)
    self._pool = None

  def __enter__(self) -> Workers:
    if self.workers > 1:
      # spawn: no copy of the parent's threads and locks (absl logging, a training run's
      # JAX runtime when a run prepares its dataset).
      self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
    return self

  def __exit__(self, *exc) -> None:
    if self._pool is not None:
      self._pool.terminate() if exc[0] else self._pool.close()
      self._pool.join()
      self._pool = None

  def read(self, spec: ReaderSpec, reader, items: Iterable[tuple[str, Any]]) -> Iterator[Read]:
    """Reads (id, handle) items in order; at most AHEAD_PER_WORKER x workers in flight."""
    if self._pool is None:
      for image_id, handle in items:
        yield read_example(spec, reader, image_id, handle)
      return
    pending = collections.deque()
    ahead = AHEAD_PER_WORKER * self.workers
    for image_id, handle in items:
      pending.append(self._pool.apply_async(_read_in_worker, (spec, image_id, handle)))
      if len(pending) >= ahead:
        yield pending.popleft().get()
    while pending:
      yield pending.popleft().get()


@dataclasses.dataclass(frozen=True)
class BeamShard:
  """One shard's examples as a Beam worker generates them (TFDS pickles it to the worker):
  read one by one with this process's reader; unusable files are logged there and left out.
  `strict` raises on the first one instead."""

  spec: ReaderSpec
  items: tuple[tuple[str, Any], ...]
  strict: bool = False

  def __call__(self) -> Iterator[tuple[str, dict]]:
    return released(self._examples())

  def _examples(self) -> Iterator[tuple[str, dict]]:
    reader = _reader(self.spec)
    for image_id, handle in self.items:
      read = read_example(self.spec, reader, image_id, handle)
      for skip in read.skips:  # no builder here to collect them: logged, or raised
        if self.strict:
          raise DataError(f"{reader.where(skip.file)}: {skip} (strict mode)")
        logging.warning("Skipping %s: %s", reader.where(skip.file), skip)
      if read.features is not None:
        yield image_id, read.features


def released(examples: Iterator[tuple[str, dict]]) -> Iterator[tuple[str, dict]]:
  """`examples`, each one's features emptied once the next is asked for.

  TFDS's shard writer tees the examples it writes to count them afterwards, so the tee holds
  every example of a shard: with the features emptied (written by then) it holds only keys.
  """
  previous = None
  for key, example in examples:
    if previous is not None:
      previous.clear()
    yield key, example
    previous = example
