"""Several prepared datasets as one (`config.data.mixture`): parsing, and the joined source.

    config.data.mixture = 'kaggle:1,jsrt@/data/jsrt:0.5,covid_qu_ex'
                           NAME[@MANUAL_DIR][:WEIGHT], comma-separated

Each NAME is a registered kind (data/registry.py) prepared in config.data.data_dir (built
there first, from its MANUAL_DIR, when it is not yet). Training draws from the datasets in
proportion to their weights (grain's `MapDataset.mix`; weight 1 where none is given), each
dataset's own examples reshuffled every epoch; validation and test hold every image of
every dataset once, and evaluate reports each metric per source and pooled. A split a
dataset does not have (e.g. no test images) is left out of that split, and logged.

numpy only: `MixtureSource` is a plain random-access source grain pickles into its workers.
"""

import bisect
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cxr_jax.data import findings as findings_lib
from cxr_jax.data import registry
from cxr_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Entry:
  """One dataset of a mixture: its kind, where its files are ('' : prepared already, or
  $CXR_MANUAL_DIR) and its sampling weight."""

  name: str
  manual_dir: str = ""
  weight: float = 1.0


def parse(text: str) -> tuple[Entry, ...]:
  """config.data.mixture as entries; () for '' (no mixture). Raises ConfigError naming the
  entry that is wrong and what is expected."""
  entries = []
  for raw in str(text or "").split(","):
    item = raw.strip()
    if not item:
      continue
    weight = 1.0
    head, sep, tail = item.rpartition(":")
    if sep and not tail.startswith("//"):  # 'name:2', not 'name@gs://bucket/dir'
      try:
        weight = float(tail)
      except ValueError:
        raise ConfigError(
          f"config.data.mixture entry {item!r}: the weight after ':' must be a number "
          "(NAME[@MANUAL_DIR][:WEIGHT], e.g. 'kaggle:1,jsrt:0.5')."
        ) from None
      item = head
    name, _, manual_dir = item.partition("@")
    name = name.strip()
    if name not in registry.names():
      raise ConfigError(
        f"config.data.mixture entry {raw.strip()!r}: unknown dataset {name!r}; known: "
        f"{', '.join(registry.names())}."
      )
    if not (np.isfinite(weight) and weight > 0):
      raise ConfigError(
        f"config.data.mixture entry {raw.strip()!r}: the weight must be > 0, got {weight}."
      )
    entries.append(Entry(name, manual_dir.strip(), weight))
  names = [e.name for e in entries]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ConfigError(
      f"config.data.mixture={text!r} names {', '.join(repeated)} more than once: one entry "
      "per dataset (its weight sets how often it is drawn)."
    )
  return tuple(entries)


class MixtureSource:
  """The records of several random-access sources, one after another, as one source.

  `parts[k]`'s record j is record `offsets[k] + j`. Findings are re-coded over the union of
  the mixture's finding names: a finding a dataset does not label is MISSING in its
  records, so a findings head learns it only where it is labelled.
  """

  def __init__(
    self,
    parts: Sequence[Sequence[Mapping[str, Any]]],
    names: Sequence[str],
    weights: Sequence[float],
    finding_names: Sequence[Sequence[str]],
    union: Sequence[str] = (),
  ):
    """finding_names: each part's own; union: the findings of the whole mixture (those of
    datasets left out of this split too), in order; the parts' union when empty."""
    if not parts or not (len(parts) == len(names) == len(weights) == len(finding_names)):
      raise ValueError("a mixture needs one name, weight and finding list per part")
    self.parts, self.names = list(parts), tuple(names)
    self.weights = tuple(float(w) for w in weights)
    self.part_findings = tuple(tuple(f) for f in finding_names)
    union = list(union)
    for names_k in self.part_findings:
      union += [n for n in names_k if n not in union]
    self.finding_names = tuple(union)
    # Per part: where each union finding is in its own codes (-1: not labelled there).
    self._finding_index = [
      np.array([own.index(n) if n in own else -1 for n in union], np.int64)
      for own in self.part_findings
    ]
    self.offsets = [0, *np.cumsum([len(p) for p in self.parts]).tolist()]

  def __len__(self) -> int:
    return self.offsets[-1]

  def locate(self, index: int) -> tuple[int, int]:
    """(part, index within it) of record `index`."""
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} of a mixture of {len(self)}")
    part = bisect.bisect_right(self.offsets, index) - 1
    return part, index - self.offsets[part]

  def __getitem__(self, index: int) -> Mapping[str, Any]:
    part, position = self.locate(index)
    return self._recode(part, self.parts[part][position])

  def _recode(self, part: int, record: Mapping[str, Any]) -> Mapping[str, Any]:
    if not self.finding_names or "findings" not in record:
      return record
    own = np.asarray(record["findings"], np.int8)
    where = self._finding_index[part]
    codes = np.full(len(where), findings_lib.MISSING, np.int8)
    codes[where >= 0] = own[where[where >= 0]]
    return {**record, "findings": codes}

  def skip_decoding(self, features: Sequence[str]) -> "MixtureSource":
    """The same records with `features` left encoded (see datasets.skip_decoding)."""
    from cxr_jax.data import datasets  # noqa: PLC0415  (datasets imports TFDS)

    views = [datasets.skip_decoding(p, features) for p in self.parts]
    return MixtureSource(views, self.names, self.weights, self.part_findings, self.finding_names)

  def describe(self) -> str:
    return ", ".join(
      f"{n} ({len(p)} images, weight {w:g})"
      for n, p, w in zip(self.names, self.parts, self.weights, strict=True)
    )
