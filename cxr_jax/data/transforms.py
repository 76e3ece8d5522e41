"""The per-example work of the loaders: plain callables grain pickles into its workers.

numpy only, and no grain import either (grain imports jax): a worker that unpickles these
loads nothing heavier than numpy and PIL.

A prepared example (a row of a host batch):
  image [S,S,1] float32 (normalised), lung_mask [S,S,1] float32 in {0,1} (not `mask`: clu.metrics
  reserves that argument name), has_mask float32,
  label int32, source int32, weight float32 (0: padding), orig_size [2] int32 (H,W),
  scale float32, pad [2] int32 (top,left), id str; with `Targets.structures`: structures
  [S,S,K] float32 (heart, clavicles), has_structures [K] float32; with `Targets.findings`:
  findings [N] float32 targets, findings_weight [N] float32 (0: not labelled).
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cxr_jax.data import findings as findings_lib
from cxr_jax.data import images
from cxr_jax.data import preprocess
from cxr_jax.data import records


@dataclasses.dataclass(frozen=True)
class Targets:
  """Which labels beyond the lung mask and normal/abnormal an example carries.

  structures: whether to read the heart and clavicle masks (records.EXTRA_STRUCTURES).
  findings: the names of the findings to read, in the model's order.
  dataset_findings: the dataset's own finding names (its metadata['findings']).
  uncertain: the policy for uncertain labels (`findings.UNCERTAIN_POLICIES`).
  """

  structures: bool = False
  findings: tuple[str, ...] = ()
  dataset_findings: tuple[str, ...] = ()
  uncertain: str = "ignore"

  def __post_init__(self):
    unknown = [n for n in self.findings if n not in self.dataset_findings]
    if unknown:
      raise ValueError(
        f"config.model.findings names {unknown}, which the dataset does not label; its "
        f"findings: {', '.join(self.dataset_findings) or 'none'}."
      )
    findings_lib.targets(np.zeros(0, np.int8), self.uncertain)  # checks the policy

  def read(self, record: dict[str, Any], box_of, size: int) -> dict[str, np.ndarray]:
    """The extra arrays of one record (`box_of(mask)`: its letterboxed [S, S] mask)."""
    out = {}
    if self.structures:
      names = records.EXTRA_STRUCTURES
      outlined = np.asarray(record["has_structures"], bool)[1:]
      planes = images.decode_structures(record["structures"], names)
      out["structures"] = np.stack(
        [
          box_of(planes[..., k]) if outlined[k] else np.zeros((size, size), np.float32)
          for k in range(len(names))
        ],
        axis=-1,
      )
      out["has_structures"] = outlined.astype(np.float32)
    if self.findings:
      codes = np.asarray(record["findings"], np.int8)
      picked = codes[[self.dataset_findings.index(n) for n in self.findings]]
      out["findings"], out["findings_weight"] = findings_lib.targets(picked, self.uncertain)
    return out

  def padding(self, size: int) -> dict[str, np.ndarray]:
    out = {}
    if self.structures:
      k = len(records.EXTRA_STRUCTURES)
      out["structures"] = np.zeros((size, size, k), np.float32)
      out["has_structures"] = np.zeros(k, np.float32)
    if self.findings:
      out["findings"] = np.zeros(len(self.findings), np.float32)
      out["findings_weight"] = np.zeros(len(self.findings), np.float32)
    return out


class ReadExample:
  """Source index -> one prepared example; index -1 -> a padding example (weight 0).

  with_masks=False reads no mask: every example gets has_mask 0 and an all-zero mask.
  """

  def __init__(
    self,
    source: Sequence[dict[str, Any]],
    image_size: int,
    with_masks: bool = True,
    targets: Targets = Targets(),
  ):
    self._source = source
    self._size = image_size
    self._with_masks = with_masks
    self._targets = targets

  def __call__(self, index: int) -> dict[str, Any]:
    size = self._size
    if index < 0:
      return {**padding_example(size), **self._targets.padding(size)}
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
      **self._targets.read(record, lambda m: preprocess.prepare_mask(m, size), size),
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
