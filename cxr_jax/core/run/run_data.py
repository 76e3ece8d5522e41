"""A run's data: its prepared dataset (or mixture of datasets) and its splits under the
run's protocol (config.data.split)."""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils

from cxr_jax.core.run import multihost
from cxr_jax.data import datasets
from cxr_jax.data import mixture
from cxr_jax.data import protocols
from cxr_jax.data import registry
from cxr_jax.data.records import DataError


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A run's prepared dataset."""

  builder: tfds.core.DatasetBuilder
  name: str  # the registry kind config.data.name resolved to
  manual_dir: str

  def info(self, requested: str) -> dict[str, Any]:
    """What config.json records about it."""
    info = self.builder.info
    return {
      "name": info.full_name,
      "version": str(info.version),
      "requested": requested,
      "resolved": self.name,
      "manual_dir": self.manual_dir,
      "splits": {k: v.num_examples for k, v in info.splits.items()},
    }


@dataclasses.dataclass(frozen=True)
class Mixture:
  """A run's prepared datasets of config.data.mixture, each with its sampling weight."""

  parts: tuple[Dataset, ...]
  weights: tuple[float, ...]
  name = "mixture"
  manual_dir = ""

  def info(self, requested: str) -> dict[str, Any]:
    parts = [
      {**part.info(part.name), "weight": w}
      for part, w in zip(self.parts, self.weights, strict=True)
    ]
    splits: dict[str, int] = {}
    for part in parts:
      for split, count in part["splits"].items():
        splits[split] = splits.get(split, 0) + count
    names = "+".join(part.name for part in self.parts)
    return {"name": f"mixture({names})", "requested": requested, "resolved": "mixture",
            "manual_dir": "", "splits": splits, "mixture": parts}  # fmt: skip


def open_dataset(data_config: ml_collections.ConfigDict) -> Dataset | Mixture:
  """Resolves config.data.name (or each dataset of config.data.mixture) and prepares it
  (process 0 first, then the others)."""
  entries = mixture.parse(data_config.get("mixture", ""))
  if not entries:
    name, manual_dir = datasets.resolve_name(data_config)
    return _open(data_config, name, manual_dir)
  parts = []
  for entry in entries:
    manual_dir = entry.manual_dir or (
      data_config.manual_dir if entry.name == data_config.name else ""
    )
    try:
      parts.append(_open(data_config, entry.name, manual_dir))
    except DataError as e:
      raise DataError(
        f"config.data.mixture's {entry.name!r} is not prepared in {data_config.data_dir} and "
        f"its files were not found ({e}). Prepare it first (python -m cxr_jax.data.prepare "
        f"--dataset={entry.name} --manual_dir=PATH --data_dir={data_config.data_dir}) or "
        f"give its files in the entry: {entry.name}@PATH."
      ) from e
  logging.info("Mixture: %s.", ", ".join(f"{e.name} (weight {e.weight:g})" for e in entries))
  return Mixture(tuple(parts), tuple(e.weight for e in entries))


def _open(data_config: ml_collections.ConfigDict, name: str, manual_dir: str) -> Dataset:
  """Prepares dataset `name` (process 0 first: every process building the same dataset into
  the same data_dir at once would collide), then opens it on every process."""
  _check_same_on_all_hosts(name)

  def load():
    return datasets.load_builder(
      name,
      data_dir=data_config.data_dir,
      manual_dir=manual_dir,
      synthetic_examples=int(data_config.synthetic_examples),
    )

  builder = multihost.on_process_0(
    load,
    f"Process 0 failed to prepare dataset {name!r} into {data_config.data_dir!r}; its log "
    "says why. Fix that (or build it once with `python -m cxr_jax.data.prepare`) and rerun.",
    barrier_name="dataset prepared",
  )
  return Dataset(builder if builder is not None else load(), name, manual_dir)


def _check_same_on_all_hosts(name: str) -> None:
  """'auto' resolves per host: all hosts must have found the same dataset."""
  if jax.process_count() == 1:
    return
  names = registry.names()
  chosen = names[int(multihost_utils.broadcast_one_to_all(np.int32(names.index(name))))]
  if chosen != name:
    raise ValueError(
      f"Process {jax.process_index()} resolved the dataset to {name!r}, process 0 "
      f"to {chosen!r}: set --config.data.name and --config.data.manual_dir explicitly, to "
      "a path every host sees."
    )


def load_split(
  config: ml_collections.ConfigDict, split: str, dataset: Dataset | Mixture | None = None
) -> Sequence[Mapping[str, Any]]:
  """The run's `split` under its protocol (config.data.split) as a random-access source,
  preparing the dataset if needed; for a mixture, every dataset's `split` joined
  (`mixture.MixtureSource`), a dataset without images in it left out."""
  dataset = dataset or open_dataset(config.data)
  if isinstance(dataset, Dataset):
    source = _split_of(config, split, dataset.builder)
    if source is None:
      raise ValueError(
        f"No image of {dataset.builder.info.full_name} falls in {split!r} under "
        f"config.data.split={config.data.split!r}; check config.data.fold / num_folds / "
        "train_sources."
      )
    return source
  parts, kept = [], []
  for part, weight in zip(dataset.parts, dataset.weights, strict=True):
    source = _split_of(config, split, part.builder)
    if source is None:
      logging.info("Mixture: %s has no %s images under this protocol.", part.name, split)
    else:
      parts.append(source)
      kept.append((part.name, weight))
  if not parts:
    raise ValueError(
      f"No dataset of config.data.mixture has {split!r} images under config.data.split="
      f"{config.data.split!r}."
    )
  names, weights = zip(*kept, strict=True)
  union = [
    name
    for part in dataset.parts
    for name in (part.builder.info.metadata or {}).get("findings", ())
  ]
  joined = mixture.MixtureSource(
    parts,
    names,
    weights,
    [datasets.finding_names(p) for p in parts],
    union=list(dict.fromkeys(union)),
  )
  logging.info("Mixture %s: %s.", split, joined.describe())
  return joined


def _split_of(
  config: ml_collections.ConfigDict, split: str, builder: tfds.core.DatasetBuilder
) -> Sequence[Mapping[str, Any]] | None:
  """One dataset's `split` under the run's protocol; None when no image falls in it."""
  if config.data.split == "hash":
    if split not in builder.info.splits and config.data.get("mixture"):
      return None
    return datasets.split_source(builder, split)  # a missing split: says what to change
  parts = {name: datasets.split_source(builder, name) for name in builder.info.splits}
  meta = protocols.read_meta(
    {name: datasets.skip_decoding(part, ("image", "mask")) for name, part in parts.items()}
  )
  assigned = protocols.assign_splits(meta, config.data, registry.source_names())
  members = [(m["split"], m["position"]) for m, s in zip(meta, assigned) if s == split]
  if not members:
    return None
  return protocols.SubsetSource(parts, members)
