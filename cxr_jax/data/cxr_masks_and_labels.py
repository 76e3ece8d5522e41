"""TFDS builder `cxr_masks_and_labels`: chest X-rays with lung masks and normal/abnormal labels.

One builder config per dataset kind of `registry` (`kaggle`, `synthetic`); a generated kind
of another size gets its own config (`synthetic_<n>`) so sizes do not collide in data_dir.
Works without TensorFlow: build with `download_and_prepare`, read with `as_data_source`.

A split's ids are written in TFDS's hash order (as a generator-based build shuffles them),
`shard_examples` to a shard; each shard's images are decoded in `workers` processes
(`build_workers`), or each shard on an Apache Beam worker when the DownloadConfig has a
`beam_runner`. Memory stays flat in the dataset's size: nothing is held per image but its id.

Every file a build cannot use is logged by name and counted; the list is kept in
`builder.info.metadata['skipped']` ("file: reason" strings). `strict=True` raises instead.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tensorflow_datasets.core import hashing

from cxr_jax.data import build_workers
from cxr_jax.data import registry
from cxr_jax.data.records import DataError
from cxr_jax.data.records import Skip
from cxr_jax.data.splits import SPLIT_PERCENT
from cxr_jax.data.splits import min_examples_for_all_splits
from cxr_jax.data.splits import split_of

# Examples per shard file: many shards let each host of a job read (and fetch) only its own.
SHARD_EXAMPLES = 256


@dataclasses.dataclass(kw_only=True)
class CxrConfig(tfds.core.BuilderConfig):
  """kind: a `registry` name; num_examples: the size of a generated kind."""

  kind: str = "kaggle"
  num_examples: int = 0

  def __reduce__(self):
    # Pickle by reference (grain workers unpickle data sources): tfds rejects a *copy* of a
    # config named like a registered one ("Cannot name a custom BuilderConfig the same as an
    # available BuilderConfig").
    return (config_for, (self.kind, self.num_examples))


def config_for(kind: str, num_examples: int = 0) -> CxrConfig:
  """The one config object of a kind (and, for a generated kind, a size; 0: its default)."""
  entry = registry.get(kind)
  if entry.generated:
    num_examples = int(num_examples or entry.default_size)
    if num_examples < 1:
      raise ValueError(f"synthetic_examples must be >= 1, got {num_examples}.")
  else:
    num_examples = 0
  return _config(kind, num_examples)


@functools.cache  # tfds accepts a config named like a registered one only if it is that object
def _config(kind: str, num_examples: int) -> CxrConfig:
  entry = registry.get(kind)
  sized = entry.generated and num_examples != entry.default_size
  return CxrConfig(
    name=f"{kind}_{num_examples}" if sized else kind,
    kind=kind,
    num_examples=num_examples,
    description=entry.description,
  )


def min_examples(kind: str) -> int:
  """The smallest size of a generated kind whose ids fall in every split."""
  return min_examples_for_all_splits(registry.get(kind).id_of)


class CxrMasksAndLabels(tfds.core.ShardBasedBuilder):
  """Chest X-rays at native resolution, binary lung masks, normal/abnormal labels."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.0.0": "Kaggle archive and synthetic phantoms.",
    "1.1.0": "Per-image pixel spacing (spacing_mm, spacing_estimated).",
  }
  BUILDER_CONFIGS = [config_for(name) for name in registry.names()]
  DEFAULT_CONFIG_NAME = "synthetic"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download the Kaggle dataset 'Chest Xray Masks and Labels' and pass its .zip, or the "
    "folder it unpacks to, as manual_dir."
  )

  def __init__(
    self,
    *,
    strict: bool = False,
    workers: int = 1,
    shard_examples: int = SHARD_EXAMPLES,
    **kwargs,
  ):
    """strict: raise on the first unusable file instead of skipping and counting it.
    workers: processes decoding images (1: this one). shard_examples: examples per shard
    file (a host of a multi-host job fetches only its shards)."""
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)
    self.strict = strict
    self.workers = int(workers)
    self.shard_examples = int(shard_examples)
    self._beam = False
    self.skipped: list[Skip] = []
    self._manual_dir = None
    self.recorded_manual_dir = ""  # metadata's manual_dir when the files read are a copy
    self._unusable: dict[str, list[Skip]] = {}  # id -> why, from an earlier build attempt
    self._failed: dict[str, list[Skip]] = {}  # id -> why, in this attempt

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
          "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
          "has_mask": np.bool_,
          "label": tfds.features.ClassLabel(names=["normal", "abnormal"]),
          "source": tfds.features.ClassLabel(
            names=list(registry.source_names(upto=self.builder_config.kind))
          ),
          "id": tfds.features.Text(),
          "sex": tfds.features.Text(),
          "age": np.int32,
          "finding": tfds.features.Text(),
          "spacing_mm": tfds.features.Tensor(shape=(2,), dtype=np.float32),
          "spacing_estimated": np.bool_,
        }
      ),
      metadata=tfds.core.MetadataDict(),
      homepage="https://www.kaggle.com/datasets/nikhilpandey360/chest-xray-masks-and-labels",
      citation="Jaeger et al. 2014, IEEE TMI 33(2):233-45; Candemir et al. 2014, "
      "IEEE TMI 33(2):577-90.",
    )

  def _shard_iterators_per_split(self, dl_manager):
    """Each split's shards: its ids in TFDS's hash order (the order a generator-based build
    wrote them in), SHARD_EXAMPLES to a shard, each shard's examples read when written."""
    self.skipped = []
    kind = registry.get(self.builder_config.kind)
    # The DownloadConfig's manual_dir as given: tfds' own `dl_manager.manual_dir` insists on
    # a non-empty folder, and the kaggle reader also takes the .zip itself.
    manual_dir = "" if kind.generated else (self._manual_dir or dl_manager.manual_dir)
    reader = kind.open_reader(manual_dir, self.builder_config.num_examples)
    for skip in reader.skipped:
      self._skip(skip, reader)
    items = []
    for image_id, handle in reader.items():
      if image_id in self._unusable:  # found unusable by an earlier attempt (see below)
        self.skipped.extend(self._unusable[image_id])
      else:
        items.append((image_id, handle))
    if not items:
      raise DataError(
        f"No usable images in {reader.describe()}: {len(self.skipped)} files "
        f"skipped ({self._reasons()})."
      )
    spec = build_workers.ReaderSpec(
      kind=kind.name,
      open_reader=kind.open_reader,
      manual_dir=os.fspath(manual_dir) if manual_dir else "",
      num_examples=self.builder_config.num_examples,
      source_names=registry.source_names(),
      sources=tuple(kind.sources),
    )
    self._spec, self._reader = spec, reader
    shards = {}
    for split, group in _group(items, key=lambda item: split_of(item[0])).items():
      hasher = hashing.Hasher(split)  # TFDS's Writer salts each split's keys with its name
      group.sort(key=lambda item: hasher.hash_key(item[0]))
      chunks = [
        tuple(group[i : i + self.shard_examples]) for i in range(0, len(group), self.shard_examples)
      ]
      if self._beam:
        shards[split] = [build_workers.BeamShard(spec, chunk, self.strict) for chunk in chunks]
      else:
        shards[split] = [functools.partial(self._shard_examples, chunk) for chunk in chunks]
    return shards

  def _download_and_prepare(self, dl_manager, download_config):
    self._manual_dir = download_config.manual_dir
    self._beam = download_config.beam_runner is not None
    # A split whose every image turns out unusable would be written empty. Images are only
    # decoded while a split is written, so the build then starts again without the images
    # found unusable (a split left empty is dropped): at most once per split.
    self._unusable = {}
    for _ in range(len(SPLIT_PERCENT)):
      self._failed: dict[str, list[Skip]] = {}
      with build_workers.Workers(self.workers) as workers:
        self._workers = workers
        super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
      empty = [name for name, split in self.info.splits.items() if not split.num_examples]
      if not empty:
        break
      if self._beam or not self._failed:
        raise DataError(
          f"Split(s) {empty} got no usable image (every one was skipped: {self._reasons()}); "
          "build without Beam to have them left out."
        )
      logging.warning(
        "Building again without the %d unusable images found so far (split(s) %s had no "
        "usable image).",
        len(self._failed),
        empty,
      )
      self._unusable.update(self._failed)
      for path in epath.Path(self.data_path).glob(f"{self.name}-*.array_record*"):
        path.unlink()
    else:
      raise DataError(f"Every split lost all its images to unusable files: {self._reasons()}.")
    self.info.metadata["skipped"] = [str(s) for s in self.skipped]
    manual_dir = self._manual_dir and os.path.abspath(os.path.expanduser(str(self._manual_dir)))
    self.info.metadata["manual_dir"] = self.recorded_manual_dir or manual_dir or ""
    if self.skipped:
      logging.warning("Build summary: %d files skipped (%s).", len(self.skipped), self._reasons())
    else:
      logging.info("Build summary: no files skipped.")

  def _shard_examples(self, items) -> Iterator[tuple[str, dict]]:
    """One shard's examples, read by this build's workers (in order), skips collected."""
    return build_workers.released(self._read_shard(items))

  def _read_shard(self, items) -> Iterator[tuple[str, dict]]:
    for read in self._workers.read(self._spec, self._reader, items):
      for skip in read.skips:
        self._skip(skip, self._reader)
      if read.features is None:
        self._failed[read.image_id] = list(read.skips)
        continue
      yield read.image_id, read.features

  def _skip(self, skip: Skip, reader: registry.Reader) -> None:
    where = reader.where(skip.file)
    message = str(skip).removeprefix(skip.file + ": ")
    if self.strict:
      raise DataError(
        f"{where}: {message}. (strict mode; pass strict=False / --nostrict to "
        "skip such files and count them instead.)"
      )
    logging.warning("Skipping %s: %s", where, message)
    self.skipped.append(skip)

  def _reasons(self) -> str:
    """'duplicate id: 1, unreadable image: 2, ...' for the build summary."""
    counts = collections.Counter(s.kind for s in self.skipped)
    return ", ".join(f"{kind}: {n}" for kind, n in counts.most_common())


def _group(items, key) -> dict[str, list]:
  """Items grouped by split, in SPLIT_PERCENT order; empty splits are left out (logged)."""
  groups = {split: [] for split in SPLIT_PERCENT}
  for item in items:
    groups[key(item)].append(item)
  for split in [s for s, g in groups.items() if not g]:
    logging.warning("Split %r has no examples and is left out.", split)
    del groups[split]
  return groups
