"""TFDS builder `cxr_masks_and_labels`: chest X-rays with lung masks and normal/abnormal labels.

Configs: `kaggle` (the Montgomery + Shenzhen archive, read from manual_dir; see
kaggle_archive.py) and `synthetic` (procedural phantoms, see phantoms.py; `synthetic` has
400 examples, `synthetic_config(n)` makes `synthetic_<n>` for other sizes so that they do
not collide in data_dir). Works without TensorFlow: build with `download_and_prepare`, read
with `as_data_source` (array_record files).

Every file the kaggle build cannot use is logged by name and counted; the summary is logged
at the end of the build and kept in `builder.info.metadata['skipped']` (a list of
"file: reason" strings, also after reloading). `strict=True` raises instead of skipping.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
from collections.abc import Iterator

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from cxr_jax.data import kaggle_archive
from cxr_jax.data import phantoms

SPLIT_PERCENT = {"train": 80, "validation": 10, "test": 10}
SYNTHETIC_SEED = 0
DEFAULT_SYNTHETIC_EXAMPLES = 400


@dataclasses.dataclass(kw_only=True)
class CxrConfig(tfds.core.BuilderConfig):
  """kind: 'kaggle' | 'synthetic'; num_examples and seed apply to 'synthetic'."""
  kind: str = "kaggle"
  num_examples: int = DEFAULT_SYNTHETIC_EXAMPLES
  seed: int = SYNTHETIC_SEED

  def __reduce__(self):
    # Pickle by reference (grain workers unpickle data sources): tfds rejects a *copy* of a
    # config named like a registered one ("Cannot name a custom BuilderConfig the same as an
    # available BuilderConfig").
    return (config_for, (self.kind, self.num_examples))


def config_for(kind: str, num_examples: int = 0) -> "CxrConfig":
  """The one config object of a kind (and, for 'synthetic', a size)."""
  return KAGGLE_CONFIG if kind == "kaggle" else synthetic_config(num_examples)


def synthetic_config(num_examples: int = DEFAULT_SYNTHETIC_EXAMPLES) -> CxrConfig:
  """The synthetic config of a given size ('synthetic' for the default size)."""
  if num_examples < 1:
    raise ValueError(f"synthetic_examples must be >= 1, got {num_examples}.")
  return _synthetic_config(int(num_examples))


@functools.cache  # tfds accepts a config named like a registered one only if it is that object
def _synthetic_config(num_examples: int) -> CxrConfig:
  name = "synthetic" if num_examples == DEFAULT_SYNTHETIC_EXAMPLES else f"synthetic_{num_examples}"
  return CxrConfig(
    name=name, kind="synthetic", num_examples=num_examples,
    description=f"{num_examples} procedural chest X-ray phantoms (seed {SYNTHETIC_SEED}).")


KAGGLE_CONFIG = CxrConfig(
    name="kaggle", kind="kaggle",
    description="Montgomery + Shenzhen sets of the Kaggle archive (manual_dir).")


def split_of(image_id: str) -> str:
  """The split of an id, from the md5 of the id: 80% train, 10% validation, 10% test."""
  bucket = int(hashlib.md5(image_id.encode("utf-8")).hexdigest()[:8], 16) % 100
  total = 0
  for split, percent in SPLIT_PERCENT.items():
    total += percent
    if bucket < total:
      return split
  raise AssertionError("SPLIT_PERCENT must sum to 100")


@functools.cache
def min_synthetic_examples() -> int:
  """The smallest synthetic set size whose ids fall in every split (smaller sets lack one)."""
  seen, n = set(), 0
  while len(seen) < len(SPLIT_PERCENT):
    seen.add(split_of(f"synthetic_{n:05d}"))
    n += 1
  return n


class CxrMasksAndLabels(tfds.core.GeneratorBasedBuilder):
  """Chest X-rays at native resolution, binary lung masks, normal/abnormal labels."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Kaggle archive and synthetic phantoms."}
  BUILDER_CONFIGS = [KAGGLE_CONFIG, synthetic_config()]
  DEFAULT_CONFIG_NAME = "synthetic"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download the Kaggle dataset 'Chest Xray Masks and Labels' and pass its .zip, or the "
    "folder it unpacks to, as manual_dir.")

  def __init__(self, *, strict: bool = False, **kwargs):
    """strict: raise on the first unusable file instead of skipping and counting it."""
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)
    self.strict = strict
    self.skipped: list[kaggle_archive.Skip] = []
    self._manual_dir = None

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        "has_mask": np.bool_,
        "label": tfds.features.ClassLabel(names=["normal", "abnormal"]),
        "source": tfds.features.ClassLabel(names=list(kaggle_archive.SOURCES)),
        "id": tfds.features.Text(),
        "sex": tfds.features.Text(),
        "age": np.int32,
        "finding": tfds.features.Text(),
      }),
      metadata=tfds.core.MetadataDict(),
      homepage="https://www.kaggle.com/datasets/nikhilpandey360/chest-xray-masks-and-labels",
      citation="Jaeger et al. 2014, IEEE TMI 33(2):233-45; Candemir et al. 2014, "
               "IEEE TMI 33(2):577-90.",
    )

  def _split_generators(self, dl_manager):
    self.skipped = []
    if self.builder_config.kind == "synthetic":
      ids = [f"synthetic_{i:05d}" for i in range(self.builder_config.num_examples)]
      by_split = _group(range(len(ids)), key=lambda i: split_of(ids[i]))
      return {split: self._generate_examples(indices) for split, indices in by_split.items()}

    # The DownloadConfig's manual_dir as given: tfds' own `dl_manager.manual_dir` insists on
    # a non-empty folder, and this builder also takes the .zip itself.
    archive = kaggle_archive.find_archive(self._manual_dir or dl_manager.manual_dir)
    logging.info("Reading the archive at %s", archive.describe())
    for ignored in archive.ignored_roots:
      logging.info("Ignoring %s: a copy of the tree read from %s.",
                   archive.tree.describe(ignored), archive.describe())
    records, skipped = kaggle_archive.scan_archive(archive)
    for skip in skipped:
      self._skip(skip, archive)
    if not records:
      raise kaggle_archive.ArchiveError(
        f"No usable images in {archive.describe()}: {len(self.skipped)} files skipped "
        f"({self._reasons()}). Expected {kaggle_archive.EXPECTED}.")
    by_split = _group(records, key=lambda r: split_of(r.id))
    return {split: self._generate_examples(rs, archive) for split, rs in by_split.items()}

  def _download_and_prepare(self, dl_manager, download_config):
    self._manual_dir = download_config.manual_dir
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    self.info.metadata["skipped"] = [str(s) for s in self.skipped]
    if self.skipped:
      logging.warning("Build summary: %d files skipped (%s).", len(self.skipped), self._reasons())
    else:
      logging.info("Build summary: no files skipped.")

  def _generate_examples(self, items, archive=None) -> Iterator[tuple[str, dict]]:
    """Yields (id, example) for kaggle Records (with their archive) or phantom indices."""
    if self.builder_config.kind == "synthetic":
      return self._generate_synthetic(items)
    return self._generate_kaggle(archive, items)

  # ----- kaggle -----

  def _generate_kaggle(self, archive, records) -> Iterator[tuple[str, dict]]:
    for record in records:
      try:
        data = archive.read(record.image)
        grey = kaggle_archive.decode_greyscale(data)
      except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ...
        self._skip(kaggle_archive.Skip(record.image, "unreadable image", str(e)), archive)
        if record.mask:
          self._skip(kaggle_archive.Skip(record.mask, "its image was skipped"), archive)
        continue
      image = data if kaggle_archive.is_grey8_png(data) else kaggle_archive.encode_png(grey)
      mask = self._read_mask(archive, record, grey.shape)
      sex, age, finding = "", -1, ""
      if record.readings:
        text = kaggle_archive.decode_text(archive.read(record.readings))
        sex, age, finding = kaggle_archive.parse_readings(text)
      yield record.id, {
        "image": image,
        "mask": kaggle_archive.encode_png(
          mask if mask is not None else np.zeros(grey.shape, np.uint8)),
        "has_mask": mask is not None,
        "label": record.label,
        "source": record.source,
        "id": record.id,
        "sex": sex,
        "age": age,
        "finding": finding,
      }

  def _read_mask(self, archive, record, shape) -> np.ndarray | None:
    """The 0/1 mask of a record, or None (no mask, or a mask that cannot be used)."""
    if not record.mask:
      return None
    kept = f"{record.id} kept without a mask"
    try:
      mask = kaggle_archive.decode_mask(archive.read(record.mask))
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ...
      skip = kaggle_archive.Skip(record.mask, "unreadable mask", f"{e}; {kept}")
    else:
      if mask.shape != shape:
        skip = kaggle_archive.Skip(record.mask, "mask size differs", (
          f"mask is {mask.shape[0]}x{mask.shape[1]} but its image is {shape[0]}x{shape[1]}; "
          f"{kept}"))
      elif not mask.any():
        skip = kaggle_archive.Skip(record.mask, "empty mask", f"nothing > 127; {kept}")
      else:
        return mask
    self._skip(skip, archive)
    return None

  def _skip(self, skip: kaggle_archive.Skip, archive) -> None:
    where = archive.tree.describe(skip.file)
    message = str(skip).removeprefix(skip.file + ": ")
    if self.strict:
      raise kaggle_archive.ArchiveError(
        f"{where}: {message}. (strict mode; pass strict=False / --nostrict to skip "
        "such files and count them instead.)")
    logging.warning("Skipping %s: %s", where, message)
    self.skipped.append(skip)

  def _reasons(self) -> str:
    """'duplicate id: 1, unreadable image: 2, ...' for the build summary."""
    counts = collections.Counter(s.kind for s in self.skipped)
    return ", ".join(f"{kind}: {n}" for kind, n in counts.most_common())

  # ----- synthetic -----

  def _generate_synthetic(self, indices) -> Iterator[tuple[str, dict]]:
    for index in indices:
      phantom = phantoms.make_phantom(self.builder_config.seed, index)
      mask = phantom.lungs if phantom.has_mask else np.zeros_like(phantom.lungs)
      image_id = f"synthetic_{index:05d}"
      yield image_id, {
        "image": kaggle_archive.encode_png(phantom.image),
        "mask": kaggle_archive.encode_png(mask),
        "has_mask": phantom.has_mask,
        "label": phantom.label,
        "source": kaggle_archive.SOURCES.index("synthetic"),
        "id": image_id,
        "sex": "",
        "age": -1,
        "finding": "",
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
