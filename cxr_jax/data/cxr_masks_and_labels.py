"""TFDS builder `cxr_masks_and_labels`: chest X-rays with lung masks and normal/abnormal labels.

One builder config per dataset kind of `registry` (`kaggle`, `synthetic`); a generated kind
of another size gets its own config (`synthetic_<n>`) so sizes do not collide in data_dir.
Works without TensorFlow: build with `download_and_prepare`, read with `as_data_source`.

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

from cxr_jax.data import findings as findings_lib
from cxr_jax.data import images
from cxr_jax.data import registry
from cxr_jax.data.records import STRUCTURES
from cxr_jax.data.records import DataError
from cxr_jax.data.records import Example
from cxr_jax.data.records import Skip
from cxr_jax.data.splits import SPLIT_PERCENT
from cxr_jax.data.splits import min_examples_for_all_splits
from cxr_jax.data.splits import split_of


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


class CxrMasksAndLabels(tfds.core.GeneratorBasedBuilder):
  """Chest X-rays at native resolution, binary lung masks, normal/abnormal labels."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {
    "1.0.0": "Kaggle archive and synthetic phantoms.",
    "1.1.0": "Per-image pixel spacing (spacing_mm, spacing_estimated).",
    "1.2.0": "patient, structures (lungs/heart/clavicles bits) + has_structures, findings "
    "(int8 codes; their names in metadata['findings']); the folders, JSRT, COVID-QU-Ex, "
    "CheXmask, ChestX-ray14 and CheXpert kinds.",
  }
  BUILDER_CONFIGS = [config_for(name) for name in registry.names()]
  DEFAULT_CONFIG_NAME = "synthetic"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download the Kaggle dataset 'Chest Xray Masks and Labels' and pass its .zip, or the "
    "folder it unpacks to, as manual_dir."
  )

  def __init__(self, *, strict: bool = False, **kwargs):
    """strict: raise on the first unusable file instead of skipping and counting it."""
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)
    self.strict = strict
    self.skipped: list[Skip] = []
    self._manual_dir = None
    self.recorded_manual_dir = ""  # metadata's manual_dir when the files read are a copy
    self._unusable: dict[str, list[Skip]] = {}  # id -> why, from an earlier build attempt
    self._failed: dict[str, list[Skip]] = {}  # id -> why, in this attempt
    self._findings: tuple[str, ...] = ()  # the reader's finding names

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
          "patient": tfds.features.Text(),
          "structures": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
          "has_structures": tfds.features.Tensor(shape=(len(STRUCTURES),), dtype=np.bool_),
          "findings": tfds.features.Tensor(shape=(None,), dtype=np.int8),
        }
      ),
      metadata=tfds.core.MetadataDict(),
      homepage="https://www.kaggle.com/datasets/nikhilpandey360/chest-xray-masks-and-labels",
      citation="Jaeger et al. 2014, IEEE TMI 33(2):233-45; Candemir et al. 2014, "
      "IEEE TMI 33(2):577-90.",
    )

  def _split_generators(self, dl_manager):
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
    self._findings = tuple(getattr(reader, "findings", ()))
    # A reader that knows patients or official lists assigns splits; others hash the id.
    assign = getattr(reader, "split_of", None) or (lambda image_id, handle: split_of(image_id))
    by_split = _group(items, key=lambda item: assign(*item))
    return {split: self._generate_examples(reader, group) for split, group in by_split.items()}

  def _download_and_prepare(self, dl_manager, download_config):
    self._manual_dir = download_config.manual_dir
    # A split whose every image turns out unusable yields nothing, which TFDS refuses. Images
    # are only decoded while a split is written, so the build then starts again without the
    # images found unusable (a split left empty is dropped): at most once per split.
    self._unusable = {}
    for _ in range(len(SPLIT_PERCENT)):
      self._failed: dict[str, list[Skip]] = {}
      try:
        super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
        break
      except AssertionError as e:
        if "No examples were yielded" not in str(e) or not self._failed:
          raise
        logging.warning(
          "Building again without the %d unusable images found so far (a split "
          "had no usable image: %s).",
          len(self._failed),
          e,
        )
        self._unusable.update(self._failed)
    else:
      raise DataError(f"Every split lost all its images to unusable files: {self._reasons()}.")
    self.info.metadata["skipped"] = [str(s) for s in self.skipped]
    self.info.metadata["findings"] = list(self._findings)
    manual_dir = self._manual_dir and os.path.abspath(os.path.expanduser(str(self._manual_dir)))
    self.info.metadata["manual_dir"] = self.recorded_manual_dir or manual_dir or ""
    if self.skipped:
      logging.warning("Build summary: %d files skipped (%s).", len(self.skipped), self._reasons())
    else:
      logging.info("Build summary: no files skipped.")

  def _generate_examples(self, reader: registry.Reader, items) -> Iterator[tuple[str, dict]]:
    kind = registry.get(self.builder_config.kind)
    source_names = registry.source_names()
    for image_id, handle in items:
      before = len(self.skipped)
      example = reader.read(handle, lambda skip: self._skip(skip, reader))
      if example is None:
        self._failed[image_id] = self.skipped[before:]
        continue
      if example.source not in kind.sources:
        raise DataError(
          f"{image_id}: source {example.source!r} is not one of dataset kind "
          f"{kind.name!r}'s sources {list(kind.sources)}."
        )
      yield image_id, _features(example, source_names.index(example.source), self._findings)

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


def _features(example: Example, source: int, findings: tuple[str, ...]) -> dict:
  """An Example as the builder's features."""
  has_mask = example.mask is not None
  outlined = {"lungs": example.mask, **example.structures} if has_mask else example.structures
  unknown = sorted(set(outlined) - set(STRUCTURES))
  if unknown:
    raise DataError(f"{example.id}: structures {unknown} are not among {list(STRUCTURES)}.")
  bits = np.zeros(example.image.shape[:2], np.uint8)
  for k, name in enumerate(STRUCTURES):
    if name in outlined:
      bits |= (np.asarray(outlined[name]) > 0).astype(np.uint8) << k
  codes = findings_lib.missing(len(findings)) if example.findings is None else example.findings
  if len(codes) != len(findings):
    raise DataError(f"{example.id}: {len(codes)} finding codes for {len(findings)} findings.")
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
    "patient": example.patient,
    "structures": images.encode_png(bits),
    "has_structures": np.array([name in outlined for name in STRUCTURES], np.bool_),
    "findings": np.asarray(codes, np.int8),
  }


def _group(items, key) -> dict[str, list]:
  """Items grouped by split, in SPLIT_PERCENT order; empty splits are left out (logged)."""
  groups = {split: [] for split in SPLIT_PERCENT}
  for item in items:
    groups[key(item)].append(item)
  for split in [s for s, g in groups.items() if not g]:
    logging.warning("Split %r has no examples and is left out.", split)
    del groups[split]
  return groups
