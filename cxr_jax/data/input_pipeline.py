"""grain loaders: a data source -> this process's host batches (numpy dicts).

    source --(this process's slice, then 'examples' filter)--> indices
    --(shuffle per epoch from config.seed | balanced sampler)--> index stream
    --(ReadExample: read, letterbox, normalise; numpy)--> examples --(batch)--> host batches
    --(grain worker processes, config.data.num_workers)--> checkpointable iterator

The trainer turns host batches into global arrays with `cxr_jax.sharding.to_global`. jax is
imported lazily (process index defaults, the batch-size check in cxr_jax.sharding): grain
workers unpickle the transforms below and must not start jax.

A host batch (b = batch size // process count rows):
  image [b,S,S,1] float32 (normalised), mask [b,S,S,1] float32 in {0,1}, has_mask [b]
  float32, label [b] int32, source [b] int32, weight [b] float32 (0: padding),
  orig_size [b,2] int32 (H,W), scale [b] float32, pad [b,2] int32 (top,left), id [b] str.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from cxr_jax.data import preprocess
from cxr_jax.data import records

# config.data.examples: what a training batch holds (evaluation batches always hold every
# image of the split, with its mask and has_mask).
#   'masked': only images with a mask (has_mask 1): segmentation.
#   'all':    every image; has_mask (0 or 1) weighs the segmentation loss, so images without
#             a mask train only a classification head: segmentation with a loss mask, or
#             multi-task.
#   'labels': every image with its label, and no mask (has_mask 0, mask all zero, masks are
#             not even decoded): classification; a multi-task model trains its class head only.
EXAMPLES = ("masked", "all", "labels")
# Smallest image side we accept: the U-Net's deepest level must keep at least 1 pixel.
_MIN_IMAGE_SIZE = 16
# Threads reading and preparing examples inside the main process (and inside each worker).
_READ_THREADS = 4

Batch = dict[str, np.ndarray]


# ----- checks -----

def check_image_size(config: ml_collections.ConfigDict) -> int:
  """Returns config.data.image_size, or says which value to use."""
  size = config.data.image_size
  if isinstance(size, (tuple, list)):
    raise ValueError(
        f"config.data.image_size={size!r}: must be one int, the side of the square the model "
        f"sees (images are letterboxed, not stretched); set e.g. --config.data.image_size=128.")
  depth = int(config.model.get("depth", 1)) if "model" in config else 1
  multiple = max(2, 2 ** depth)
  if not isinstance(size, (int, np.integer)) or size < _MIN_IMAGE_SIZE or size % multiple:
    suggestion = max(_MIN_IMAGE_SIZE, multiple, round(size / multiple) * multiple
                     if isinstance(size, (int, float)) else 128)
    raise ValueError(
        f"config.data.image_size={size!r} must be an int >= {_MIN_IMAGE_SIZE} divisible by "
        f"{multiple} (2**config.model.depth, so every U-Net level halves evenly); set "
        f"--config.data.image_size={suggestion}.")
  return int(size)


def local_batch_size(batch_size: int, process_count: int, name: str = "batch_size") -> int:
  """Rows of the global batch this process loads (`sharding.check_batch_size` for the
  process count only: the loaders know no mesh; the trainer checks the device count)."""
  from cxr_jax import sharding  # pylint: disable=g-import-not-at-top  (jax: not in workers)
  return sharding.check_batch_size(batch_size, name=name, num_devices=1,
                                   process_count=process_count)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (lazy: workers must not load jax)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
  return process_index, process_count


# ----- per-example transform (runs in grain workers: numpy only) -----

class ReadExample(grain.transforms.Map):
  """Source index -> one prepared example; index -1 -> a padding example (weight 0).

  with_masks=False (config.data.examples='labels') reads no mask: every example gets
  has_mask 0 and an all-zero mask.
  """

  def __init__(self, source: Sequence[dict[str, Any]], image_size: int,
               with_masks: bool = True):
    self._source = source
    self._size = image_size
    self._with_masks = with_masks

  def map(self, index: int) -> dict[str, Any]:
    size = self._size
    if index < 0:
      return _padding_example(size)
    record = self._source[int(index)]
    image, box = preprocess.prepare_image(record["image"], size)
    has_mask = self._with_masks and bool(record.get("has_mask", False))
    if has_mask:
      mask = preprocess.prepare_mask(record["mask"], size)
    else:
      mask = np.zeros((size, size), np.float32)
    return {
        "image": image[..., None],
        "mask": mask[..., None],
        "has_mask": np.float32(has_mask),
        "label": np.int32(record.get("label", 0)),
        "source": np.int32(record.get("source", 0)),
        "weight": np.float32(1.0),
        "orig_size": np.array([box.height, box.width], np.int32),
        "scale": np.float32(box.scale),
        "pad": np.array([box.pad_top, box.pad_left], np.int32),
        "id": records.decode_id(record.get("id", b"")),
    }


def _padding_example(size: int) -> dict[str, Any]:
  return {
      "image": np.zeros((size, size, 1), np.float32),
      "mask": np.zeros((size, size, 1), np.float32),
      "has_mask": np.float32(0), "label": np.int32(0), "source": np.int32(0),
      "weight": np.float32(0),
      "orig_size": np.array([size, size], np.int32), "scale": np.float32(1),
      "pad": np.zeros(2, np.int32), "id": "",
  }


# ----- which examples, in which order -----

def skip_decoding(source: Sequence[dict[str, Any]], features: Sequence[str]
                  ) -> Sequence[dict[str, Any]]:
  """A view of `source` whose records leave `features` (e.g. 'image', 'mask') undecoded.

  A TFDS data source gets SkipDecoding decoders (`prepare.skip_decoding`); a source with a
  `skip_decoding(features)` method (a wrapper) is asked for its own view; anything else (an
  in-memory list) is returned as it is, decoding being free there.
  """
  if hasattr(source, "skip_decoding"):
    return source.skip_decoding(features)
  if type(source).__module__.startswith("tensorflow_datasets."):
    from cxr_jax.data import prepare  # pylint: disable=g-import-not-at-top  (tfds)
    view = prepare.skip_decoding(source, features)
    if view is not None:
      return view
  return source


_SCAN_CHUNK = 256


def _scan(source: Sequence[dict[str, Any]], indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(has_mask [n] bool, label [n] int) of source[indices], without decoding any image."""
  view = skip_decoding(source, ("image", "mask"))
  has_mask = np.zeros(len(indices), bool)
  labels = np.zeros(len(indices), np.int64)
  for start in range(0, len(indices), _SCAN_CHUNK):
    chunk = [int(i) for i in indices[start:start + _SCAN_CHUNK]]
    if hasattr(view, "__getitems__"):
      records = view.__getitems__(chunk)  # one batched read (array_record)
    else:
      records = [view[i] for i in chunk]
    for i, record in enumerate(records, start):
      has_mask[i] = bool(record.get("has_mask", False))
      labels[i] = int(record.get("label", 0))
  return has_mask, labels


def _process_slice(num_examples: int, process_index: int, process_count: int) -> np.ndarray:
  """This process's source indices: a strided slice, disjoint from the other processes'."""
  return np.arange(num_examples, dtype=np.int64)[process_index::process_count]


class BalancedIndex(grain.transforms.MapWithIndex):
  """Position in an endless stream -> source index, equal counts of each class per epoch.

  An epoch holds `max(class size)` examples of every class: the larger classes appear once,
  smaller ones are repeated (each repeat a fresh permutation), and the epoch is shuffled.
  The order is a pure function of (seed, epoch), so the stream is deterministic and
  restartable anywhere (grain's iterator state is a position).
  """

  def __init__(self, by_class: Sequence[np.ndarray], seed: int):
    self._by_class = [np.asarray(c, np.int64) for c in by_class]
    self._per_class = max(len(c) for c in self._by_class)
    self._seed = seed
    self.epoch_length = self._per_class * len(self._by_class)
    self._cached: tuple[int, np.ndarray] | None = None  # (epoch, order): one O(n) draw per epoch

  def _epoch_order(self, epoch: int) -> np.ndarray:
    if self._cached is not None and self._cached[0] == epoch:
      return self._cached[1]
    rng = np.random.default_rng([self._seed, epoch])
    parts = []
    for indices in self._by_class:
      repeats = math.ceil(self._per_class / len(indices))
      tiled = np.concatenate([rng.permutation(indices) for _ in range(repeats)])
      parts.append(tiled[:self._per_class])
    order = rng.permutation(np.concatenate(parts))
    self._cached = (epoch, order)
    return order

  def map_with_index(self, index: int, element: Any) -> int:
    del element
    epoch, position = divmod(index, self.epoch_length)
    return int(self._epoch_order(epoch)[position])


def _train_indices(config: ml_collections.ConfigDict, source: Sequence[dict[str, Any]],
                   process_index: int, process_count: int) -> grain.MapDataset:
  """An endless MapDataset of this process's source indices, reshuffled every epoch."""
  examples = config.data.examples
  if examples not in EXAMPLES:
    raise ValueError(f"config.data.examples={examples!r}; valid: {EXAMPLES}.")
  indices = _process_slice(len(source), process_index, process_count)
  balance = bool(config.data.balance_classes)
  if examples == "masked" or balance:
    has_mask, labels = _scan(source, indices)
    if examples == "masked":
      indices, labels = indices[has_mask], labels[has_mask]
  if len(indices) == 0:
    raise ValueError(
        f"no training examples for process {process_index}/{process_count} with "
        f"config.data.examples={examples!r} (source has {len(source)} records); "
        f"use 'all' or 'labels' when the data has no masks.")
  if not balance:
    return grain.MapDataset.source(indices).shuffle(seed=config.seed).repeat()
  classes = sorted(set(labels.tolist()))
  if len(classes) < 2:
    raise ValueError(
        f"config.data.balance_classes=True but process {process_index} sees only label(s) "
        f"{classes}; set --config.data.balance_classes=False.")
  sampler = BalancedIndex([indices[labels == c] for c in classes], seed=config.seed)
  return grain.MapDataset.range(sampler.epoch_length).repeat().map_with_index(sampler)


def _read_options(config: ml_collections.ConfigDict) -> grain.ReadOptions:
  # grain wants a buffer at least as deep as its read threads.
  return grain.ReadOptions(num_threads=_READ_THREADS,
                           prefetch_buffer_size=max(_READ_THREADS, int(config.data.prefetch)))


def _ensure_flags_parsed() -> None:
  """grain's worker start-up reads absl flags; outside an absl app (a script, a notebook)
  nothing has parsed them and the first batch fails. Parse the defaults in that case."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# ----- public loaders -----

def create_train_iterator(config: ml_collections.ConfigDict, source: Sequence[dict[str, Any]],
                          *, process_index: int | None = None,
                          process_count: int | None = None) -> grain.DatasetIterator:
  """Endless, checkpointable iterator of this process's training host batches.

  Args:
    config: uses seed, batch_size, data.{image_size, examples, balance_classes,
      num_workers, prefetch} (and model.depth to check image_size). data.examples is
      'masked' | 'all' | 'labels', see EXAMPLES above.
    source: random-access records (`len`, `[i]`) as the TFDS builder writes them.
    process_index, process_count: this process's place; default jax.process_index() and
      jax.process_count(). Each process reads only its (strided) slice of `source`.

  Returns:
    A grain DatasetIterator of host batches (see the module docstring). Every epoch of this
    process's examples is reshuffled from config.seed (or balanced per class with
    config.data.balance_classes). `get_state()` / `set_state()` restore the position, so a
    resumed run sees the same batches as an uninterrupted one (keep num_workers the same).
  """
  process_index, process_count = _process(process_index, process_count)
  size = check_image_size(config)
  batch = local_batch_size(config.batch_size, process_count)
  num_workers = int(config.data.num_workers)
  if num_workers < 0:
    raise ValueError(f"config.data.num_workers={num_workers} must be >= 0 (0: main process).")
  with_masks = config.data.examples != "labels"
  read_source = source if with_masks else skip_decoding(source, ("mask",))
  dataset = (_train_indices(config, source, process_index, process_count)
             .map(ReadExample(read_source, size, with_masks))
             .batch(batch, drop_remainder=True)
             .to_iter_dataset(_read_options(config)))
  if num_workers:
    _ensure_flags_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=max(1, int(config.data.prefetch))))
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


def create_eval_batches(config: ml_collections.ConfigDict, source: Sequence[dict[str, Any]],
                        *, process_index: int | None = None,
                        process_count: int | None = None) -> EvalBatches:
  """This process's share of `source` in order (no shuffle), every example exactly once.

  Batches have config.eval_batch_size // process_count rows; rows past the end of the data
  are padding with weight 0 (and id ''). Each process reads only its strided slice.
  """
  process_index, process_count = _process(process_index, process_count)
  size = check_image_size(config)
  batch = local_batch_size(config.eval_batch_size, process_count, name="eval_batch_size")
  indices = _process_slice(len(source), process_index, process_count)
  per_process = math.ceil(len(source) / process_count)
  num_batches = max(1, math.ceil(per_process / batch))
  padded = np.full(num_batches * batch, -1, np.int64)
  padded[:len(indices)] = indices
  dataset = (grain.MapDataset.source(padded)
             .map(ReadExample(source, size))
             .batch(batch, drop_remainder=True))
  logging.info("eval: %d examples in %d batches of %d for process %d/%d", len(indices),
               num_batches, batch, process_index, process_count)
  return EvalBatches(dataset, _read_options(config), num_examples=len(indices))
