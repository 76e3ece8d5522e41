"""Evaluation protocols as config: which images train, validate and test (numpy only).

    config.data.split = 'hash'        the dataset's own splits (a stable hash of each id)
                      = 'kfold'       config.data.num_folds folds, stratified by source and
                                      label (stable when images are appended); fold f
                                      tests, fold f+1 validates, the rest train; with
                                      config.data.outer_fold=o (nested), fold o tests in
                                      every run, fold f validates, the others train
                      = 'cross_site'  train and validate on config.data.train_sources, test on
                                      every other source (e.g. Montgomery -> Shenzhen)

A protocol is a view over the prepared splits (`SubsetSource`): nothing is rebuilt.
"""

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from cxr_jax.data import datasets
from cxr_jax.data import records

PROTOCOLS = ("hash", "kfold", "cross_site")
SPLITS = ("train", "validation", "test")


def kfold_assignment(
  ids: Sequence[str],
  strata: Sequence[Any],
  num_folds: int,
  patients: Sequence[str] | None = None,
) -> list[int]:
  """The fold of each id: within each stratum (e.g. (source, label)), ids in sorted order are
  dealt to the folds in turn, from a first fold fixed by the stratum's name.

  So each stratum is split within one; the assignment depends on the ids alone (not on the
  order files are read in); and images added with ids after the existing ones (how the
  archive grows: MCUCXR_0001 ... CHNCXR_0662) leave every existing image in its fold.

  With `patients` (one per id, '' where unknown), a patient's images are dealt as one unit
  (named and stratified by its first id), so no patient is in two folds.
  """
  if patients is not None and any(patients):
    units: dict[str, list[int]] = {}
    for i, patient in enumerate(patients):
      units.setdefault(f"patient:{patient}" if patient else f"image:{ids[i]}", []).append(i)
    firsts = [min(members, key=lambda i: ids[i]) for members in units.values()]
    unit_folds = kfold_assignment([ids[i] for i in firsts], [strata[i] for i in firsts], num_folds)
    folds = [0] * len(ids)
    for members, fold in zip(units.values(), unit_folds, strict=True):
      for i in members:
        folds[i] = fold
    return folds
  folds = [0] * len(ids)
  for stratum in set(strata):
    start = int(hashlib.md5(repr(stratum).encode("utf-8")).hexdigest()[:8], 16)
    members = sorted((i for i, s in enumerate(strata) if s == stratum), key=lambda i: ids[i])
    for rank, i in enumerate(members):
      folds[i] = (start + rank) % num_folds
  return folds


def assign_splits(
  meta: Sequence[Mapping[str, Any]], data_config, source_names: Sequence[str]
) -> list[str]:
  """The split ('train' | 'validation' | 'test' | '' for unused) of each record of `meta`
  ({'id', 'source' (index), 'label', 'split' (its hash split)}) under config.data.split."""
  protocol = data_config["split"]
  if protocol == "hash":
    return [m["split"] for m in meta]
  if protocol == "kfold":
    num_folds, fold = int(data_config.num_folds), int(data_config.fold)
    if not 0 <= fold < num_folds:
      raise ValueError(
        f"config.data.fold={fold} must be in [0, {num_folds}) (config.data.num_folds={num_folds})."
      )
    folds = kfold_assignment(
      [m["id"] for m in meta],
      [(m["source"], m["label"]) for m in meta],
      num_folds,
      patients=[m.get("patient", "") for m in meta],
    )
    test, validation = fold, (fold + 1) % num_folds
    outer = int(data_config.get("outer_fold", -1))
    if outer != -1:
      if not 0 <= outer < num_folds or outer == fold:
        raise ValueError(
          f"config.data.outer_fold={outer} must be -1 (off) or a fold in [0, {num_folds}) "
          f"other than config.data.fold={fold} (the fold that validates)."
        )
      test, validation = outer, fold
    return ["test" if f == test else "validation" if f == validation else "train" for f in folds]
  if protocol == "cross_site":
    train_sources = [s.strip() for s in str(data_config.train_sources).split(",") if s.strip()]
    unknown = sorted(set(train_sources) - set(source_names))
    if not train_sources or unknown:
      raise ValueError(
        f"config.data.train_sources={data_config.train_sources!r}: name one or "
        f"more of {list(source_names)} (comma-separated)."
      )
    splits = []
    for m in meta:
      if source_names[m["source"]] not in train_sources:
        splits.append("test")
      else:  # the train sources keep their hash validation split; their hash test trains
        splits.append("validation" if m["split"] == "validation" else "train")
    return splits
  raise ValueError(f"config.data.split={protocol!r}; valid: {', '.join(PROTOCOLS)}.")


class SubsetSource:
  """Records `(part, index)` of several random-access sources, as one source; picklable."""

  def __init__(
    self, parts: Mapping[str, Sequence[Mapping[str, Any]]], members: Sequence[tuple[str, int]]
  ):
    self._parts, self._members = dict(parts), list(members)

  def __len__(self) -> int:
    return len(self._members)

  def __getitem__(self, index: int) -> Mapping[str, Any]:
    part, position = self._members[index]
    return self._parts[part][position]

  @property
  def dataset_info(self) -> Any:
    """The dataset's info (every part is a split of one dataset), for its metadata."""
    return getattr(next(iter(self._parts.values()), None), "dataset_info", None)

  def skip_decoding(self, features: Sequence[str]) -> "SubsetSource":
    """The same records with `features` left encoded (see datasets.skip_decoding)."""
    views = {name: datasets.skip_decoding(part, features) for name, part in self._parts.items()}
    return SubsetSource(views, self._members)


def read_meta(parts: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
  """{'id', 'source', 'label', 'split', 'position', 'patient'} of every record of the (undecoded) parts,
  in a fixed order: by split name, then position."""
  meta = []
  for split in sorted(parts):
    part = parts[split]
    for position in range(len(part)):
      record = part[position]
      meta.append(
        {
          "id": records.decode_id(record["id"]),
          "source": int(record["source"]),
          "label": int(record["label"]),
          "split": split,
          "position": position,
          "patient": records.decode_id(record.get("patient", b"")),
        }
      )
  return meta
