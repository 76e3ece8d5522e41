"""grain loaders: a data source -> this process's host batches (numpy dicts).

    source --(this process's slice, then the config.data.examples filter)--> indices
    --(shuffle per epoch from config.seed | balanced sampler)--> index stream
    --(transforms.ReadExample: read, letterbox, normalise)--> examples --(batch)--> host batches
    --(grain worker processes, config.data.num_workers)--> checkpointable iterator

A host batch stacks `transforms.ReadExample`'s examples: b = batch size // process count rows.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags

from cxr_jax.data import datasets
from cxr_jax.data import findings as findings_lib
from cxr_jax.data import mixture
from cxr_jax.data import transforms
from cxr_jax.data.batch_size import check_batch_size

# config.data.examples (its values and meanings: the config schema) picks the training
# examples; evaluation batches always hold every image of the split, with its mask where it
# has one.
_MIN_IMAGE_SIZE = 16
# Threads reading and preparing examples inside the main process (and inside each worker).
_READ_THREADS = 4

Batch = dict[str, np.ndarray]


# ----- checks -----


def check_image_size(config: ml_collections.ConfigDict) -> int:
  """Returns config.data.image_size, or says which value to use.

  Whether the model can take that size (e.g. a multiple of 2**depth) is the model's check.
  """
  size = config.data.image_size
  if isinstance(size, (tuple, list)):
    raise ValueError(
      f"config.data.image_size={size!r}: must be one int, the side of the square the model "
      f"sees (images are letterboxed, not stretched); set e.g. --config.data.image_size=128."
    )
  if not isinstance(size, (int, np.integer)) or size < _MIN_IMAGE_SIZE:
    raise ValueError(
      f"config.data.image_size={size!r} must be an int >= {_MIN_IMAGE_SIZE}; "
      "set e.g. --config.data.image_size=128."
    )
  return int(size)


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")


# ----- which examples, in which order -----

_SCAN_CHUNK = 256


def _scan(source: Sequence[dict[str, Any]], indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(has_mask [n] bool, label [n] int) of source[indices], without decoding any image."""
  view = datasets.skip_decoding(source, ("image", "mask"))
  has_mask = np.zeros(len(indices), bool)
  labels = np.zeros(len(indices), np.int64)
  for start in range(0, len(indices), _SCAN_CHUNK):
    chunk = [int(i) for i in indices[start : start + _SCAN_CHUNK]]
    if hasattr(view, "__getitems__"):
      records = view.__getitems__(chunk)  # one batched read (array_record)
    else:
      records = [view[i] for i in chunk]
    for i, record in enumerate(records, start):
      has_mask[i] = bool(record.get("has_mask", False))
      labels[i] = int(record.get("label", 0))
  return has_mask, labels


# Processes get whole shards when the split has at least this many shards per process (their
# example counts then differ by at most a shard in this many); a strided slice otherwise.
SHARDS_PER_PROCESS = 4


def _process_slice(
  source: Sequence[dict[str, Any]], process_index: int, process_count: int
) -> np.ndarray:
  """This process's source indices, disjoint from the other processes': a contiguous run of
  whole shard files of a prepared split (a host then reads, and from a bucket fetches, only
  those), or a strided slice."""
  lengths = datasets.shard_lengths(source)
  if process_count > 1 and lengths and len(lengths) >= SHARDS_PER_PROCESS * process_count:
    starts = np.concatenate([[0], np.cumsum(lengths)])
    first = len(lengths) * process_index // process_count
    last = len(lengths) * (process_index + 1) // process_count
    return np.arange(starts[first], starts[last], dtype=np.int64)
  return np.arange(len(source), dtype=np.int64)[process_index::process_count]


def _train_indices(
  config: ml_collections.ConfigDict,
  source: Sequence[dict[str, Any]],
  process_index: int,
  process_count: int,
) -> grain.MapDataset:
  """An endless MapDataset of this process's source indices, reshuffled every epoch."""
  examples = config.data.examples  # a valid value: the config schema checked it at start-up
  indices = _process_slice(source, process_index, process_count)
  balance = bool(config.data.balance_classes)
  if examples == "with_masks" or balance:
    has_mask, labels = _scan(source, indices)
    if examples == "with_masks":
      indices, labels = indices[has_mask], labels[has_mask]
  if len(indices) == 0:
    raise ValueError(
      f"no training examples for process {process_index}/{process_count} with "
      f"config.data.examples={examples!r} (source has {len(source)} records); "
      f"use 'all' or 'all_without_masks' when the data has no masks."
    )
  if not balance:
    return grain.MapDataset.source(indices).shuffle(seed=config.seed).repeat()
  classes = sorted(set(labels.tolist()))
  if len(classes) < 2:
    raise ValueError(
      f"config.data.balance_classes=True but process {process_index} sees only label(s) "
      f"{classes}; set --config.data.balance_classes=False."
    )
  sampler = transforms.BalancedIndex([indices[labels == c] for c in classes], seed=config.seed)
  return grain.MapDataset.range(sampler.epoch_length).repeat().map_with_index(sampler)


class _Offset:
  """A part's index -> the mixture's (picklable, for grain's workers)."""

  def __init__(self, offset: int):
    self.offset = offset

  def __call__(self, index: int) -> int:
    return int(index) + self.offset


def _mixed_train_indices(
  config: ml_collections.ConfigDict,
  source: Sequence[dict[str, Any]],
  process_index: int,
  process_count: int,
) -> grain.MapDataset:
  """`_train_indices`, or for a `mixture.MixtureSource` each dataset's (its own slice, filter,
  shuffle or balance) drawn in proportion to the mixture's weights (grain's `mix`)."""
  if not isinstance(source, mixture.MixtureSource):
    return _train_indices(config, source, process_index, process_count)
  streams = []
  for name, part, offset in zip(source.names, source.parts, source.offsets, strict=False):
    try:
      indices = _train_indices(config, part, process_index, process_count)
    except ValueError as e:
      raise ValueError(f"config.data.mixture's {name!r}: {e}") from e
    streams.append(indices.map(_Offset(offset)))
  return grain.MapDataset.mix(streams, list(source.weights))


def targets(config: ml_collections.ConfigDict, source: Sequence[dict]) -> transforms.Targets:
  """The labels beyond lungs and normal/abnormal that config.model's heads learn (none for a
  config of data keys only: a data pipeline's own, a benchmark's)."""
  model, loss = config.get("model") or {}, config.get("loss") or {}
  return transforms.Targets(
    structures=bool(model.get("structures", False)),
    findings=findings_lib.parse_names(model.get("findings", "")),
    dataset_findings=datasets.finding_names(source),
    uncertain=loss.get("uncertain", "ignore"),
  )


def _read_options(config: ml_collections.ConfigDict) -> grain.ReadOptions:
  # grain wants a buffer at least as deep as its read threads.
  return grain.ReadOptions(
    num_threads=_READ_THREADS, prefetch_buffer_size=max(_READ_THREADS, int(config.data.prefetch))
  )


def _ensure_flags_parsed() -> None:
  """grain's worker start-up reads absl flags; outside an absl app (a script, a notebook)
  nothing has parsed them and the first batch fails. Parse the defaults in that case."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# ----- public loaders -----


def worker_count(requested: int) -> int:
  """Grain worker processes to start: `requested`, capped at the CPUs this process may use
  (each worker holds a copy of the pipeline: 64 on 2 cores took 9 GB and never made a step)."""
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  cpus = max(1, cpus or 1)
  if requested > cpus:
    logging.warning(
      "config.data.num_workers=%d is more than the %d CPU(s) this process may use: starting "
      "%d (config.json records it).",
      requested,
      cpus,
      cpus,
    )
    return cpus
  return requested


def create_train_iterator(
  config: ml_collections.ConfigDict,
  source: Sequence[dict[str, Any]],
  *,
  process_index: int,
  process_count: int,
) -> grain.DatasetIterator:
  """Endless, checkpointable iterator of this process's training host batches.

  Args:
    config: uses seed, batch_size, data.{image_size, examples, balance_classes,
      num_workers, prefetch} (and model.depth to check image_size). data.examples is
      'with_masks' | 'all' | 'all_without_masks' (the config schema's meanings).
    source: random-access records (`len`, `[i]`) as the TFDS builder writes them.
    process_index, process_count: this process's place (jax.process_index() and
      jax.process_count()). Each process reads only its (strided) slice of `source`.

  Returns:
    A grain DatasetIterator of host batches (see the module docstring). Every epoch of this
    process's examples is reshuffled from config.seed (or balanced per class with
    config.data.balance_classes). `get_state()` / `set_state()` restore the position, so a
    resumed run sees the same batches as an uninterrupted one (keep num_workers the same).
  """
  _check_process(process_index, process_count)
  size = check_image_size(config)
  batch = check_batch_size(config.batch_size, num_devices=1, process_count=process_count)
  num_workers = int(config.data.num_workers)
  with_masks = config.data.examples != "all_without_masks"
  read_source = source if with_masks else datasets.skip_decoding(source, ("mask",))
  dataset = (
    _mixed_train_indices(config, source, process_index, process_count)
    .map(transforms.ReadExample(read_source, size, with_masks, targets(config, source)))
    .batch(batch, drop_remainder=True)
    .to_iter_dataset(_read_options(config))
  )
  if num_workers:
    _ensure_flags_parsed()
    dataset = dataset.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=max(1, int(config.data.prefetch))
      )
    )
  return iter(dataset)


@dataclasses.dataclass(frozen=True)
class EvalBatches:
  """Re-iterable evaluation batches: every example once, the last batch padded (weight 0).

  Every process gets the same number of batches (`len(self)`), so multi-host evaluation
  steps stay in lockstep.
  """

  dataset: grain.MapDataset
  read_options: grain.ReadOptions
  num_examples: int  # real (weight 1) examples in this process's batches

  def __len__(self) -> int:
    return len(self.dataset)

  def __iter__(self) -> Iterator[Batch]:
    return iter(self.dataset.to_iter_dataset(self.read_options))


def create_eval_batches(
  config: ml_collections.ConfigDict,
  source: Sequence[dict[str, Any]],
  *,
  process_index: int,
  process_count: int,
) -> EvalBatches:
  """This process's share of `source` in order (no shuffle), every example exactly once.

  Batches have config.eval_batch_size // process_count rows; rows past the end of the data
  are padding with weight 0 (and id ''). Each process reads only its strided slice.
  """
  _check_process(process_index, process_count)
  size = check_image_size(config)
  batch = check_batch_size(
    config.eval_batch_size, num_devices=1, process_count=process_count, name="eval_batch_size"
  )
  indices = _process_slice(source, process_index, process_count)
  per_process = max(len(_process_slice(source, p, process_count)) for p in range(process_count))
  num_batches = max(1, math.ceil(per_process / batch))
  padded = np.full(num_batches * batch, -1, np.int64)
  padded[: len(indices)] = indices
  dataset = (
    grain.MapDataset.source(padded)
    .map(transforms.ReadExample(source, size, targets=targets(config, source)))
    .batch(batch, drop_remainder=True)
  )
  logging.info(
    "eval: %d examples in %d batches of %d for process %d/%d",
    len(indices),
    num_batches,
    batch,
    process_index,
    process_count,
  )
  return EvalBatches(dataset, _read_options(config), num_examples=len(indices))
