"""The per-example work of the loaders: plain callables grain pickles into its workers.

numpy only, and no grain import either (grain imports jax): a worker that unpickles these
loads nothing heavier than numpy and PIL.

A prepared example (a row of a host batch):
  image [S,S,1] float32 (normalised), lung_mask [S,S,1] float32 in {0,1} (not `mask`: clu.metrics
  reserves that argument name), has_mask float32,
  label int32, source int32, weight float32 (0: padding), orig_size [2] int32 (H,W),
  scale float32, pad [2] int32 (top,left), id str.
"""

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cxr_jax.data import preprocess
from cxr_jax.data import records


class ReadExample:
  """Source index -> one prepared example; index -1 -> a padding example (weight 0).

  with_masks=False reads no mask: every example gets has_mask 0 and an all-zero mask.
  """

  def __init__(self, source: Sequence[dict[str, Any]], image_size: int, with_masks: bool = True):
    self._source = source
    self._size = image_size
    self._with_masks = with_masks

  def __call__(self, index: int) -> dict[str, Any]:
    size = self._size
    if index < 0:
      return padding_example(size)
    record = self._source[int(index)]
    image, box = preprocess.prepare_image(record["image"], size)
    has_mask = self._with_masks and bool(record.get("has_mask", False))
    if has_mask:
      mask = preprocess.prepare_mask(record["mask"], size)
    else:
      mask = np.zeros((size, size), np.float32)
    return {
      "image": image[..., None],
      "lung_mask": mask[..., None],
      "has_mask": np.float32(has_mask),
      "label": np.int32(record.get("label", 0)),
      "source": np.int32(record.get("source", 0)),
      "weight": np.float32(1.0),
      "orig_size": np.array([box.height, box.width], np.int32),
      "scale": np.float32(box.scale),
      "pad": np.array([box.pad_top, box.pad_left], np.int32),
      "id": records.decode_id(record.get("id", b"")),
    }


def padding_example(size: int) -> dict[str, Any]:
  return {
    "image": np.zeros((size, size, 1), np.float32),
    "lung_mask": np.zeros((size, size, 1), np.float32),
    "has_mask": np.float32(0),
    "label": np.int32(0),
    "source": np.int32(0),
    "weight": np.float32(0),
    "orig_size": np.array([size, size], np.int32),
    "scale": np.float32(1),
    "pad": np.zeros(2, np.int32),
    "id": "",
  }


class BalancedIndex:
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
      parts.append(tiled[: self._per_class])
    order = rng.permutation(np.concatenate(parts))
    self._cached = (epoch, order)
    return order

  def __call__(self, index: int, element: Any) -> int:
    del element
    epoch, position = divmod(index, self.epoch_length)
    return int(self._epoch_order(epoch)[position])
