r"""Builds `cxr_masks_and_labels` once and prints its split counts.

  python -m cxr_jax.data.prepare --dataset=kaggle --manual_dir=PATH --data_dir=PATH
  python -m cxr_jax.data.prepare --dataset=synthetic --data_dir=PATH [--synthetic_examples=400]

Run it on one host before a multi-host job, so that the workers only read. `load_builder`
and `resolve_name` are what the training, evaluation and prediction code call.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
from collections.abc import Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources import base as tfds_sources

from cxr_jax.data import cxr_masks_and_labels
from cxr_jax.data import kaggle_archive

NAMES = ("kaggle", "synthetic")
MANUAL_DIR_ENV = "CXR_MANUAL_DIR"


def load_builder(
    name: str,
    *,
    data_dir: str,
    manual_dir: str = "",
    synthetic_examples: int = cxr_masks_and_labels.DEFAULT_SYNTHETIC_EXAMPLES,
    strict: bool = False,
) -> tfds.core.DatasetBuilder:
  """Returns the prepared builder of dataset `name` ('kaggle' | 'synthetic').

  Builds it into `data_dir` first when it is not there yet (a prepared dataset is reused
  as it is, so a changed manual_dir needs a fresh data_dir or a deleted dataset folder).

  Args:
    name: 'kaggle' (reads the archive in manual_dir, '' -> $CXR_MANUAL_DIR) or 'synthetic'.
    data_dir: TFDS data dir ('~' expanded).
    manual_dir: the Kaggle archive (folder or .zip); only read when building 'kaggle'.
    synthetic_examples: size of the synthetic set (each size is its own config).
    strict: raise on unusable files instead of skipping and counting them.
  """
  if name == "kaggle":
    config = "kaggle"
    manual_dir = manual_dir or os.environ.get(MANUAL_DIR_ENV, "")
  elif name == "synthetic":
    config = cxr_masks_and_labels.synthetic_config(synthetic_examples)
  else:
    raise ValueError(f"Unknown dataset {name!r}; valid: {', '.join(NAMES)}.")
  data_dir = os.path.expanduser(data_dir)
  builder = cxr_masks_and_labels.CxrMasksAndLabels(
    config=config, data_dir=data_dir, strict=strict)
  if name == "kaggle" and not _is_prepared(builder):
    kaggle_archive.find_archive(manual_dir)  # fails early, saying where it looked
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
    manual_dir=os.path.expanduser(manual_dir) if manual_dir else None,
    try_download_gcs=False))
  return builder


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  return os.path.exists(os.path.join(os.fspath(builder.data_dir), "dataset_info.json"))


def load_builder_multihost(name: str, **kwargs) -> tfds.core.DatasetBuilder:
  """`load_builder` for a multi-process job: process 0 builds, the others then load.

  Every process calling `load_builder` at once would build the same dataset into the same
  data_dir concurrently. Here process 0 prepares it (a no-op when it is there), all
  processes meet (`multihost_utils.broadcast_one_to_all`, which also tells them whether
  process 0 succeeded), and then the others load it. When data_dir is a per-host local
  disk, the others build their own copy after process 0 finished. With one process this is
  `load_builder`. Takes `load_builder`'s arguments.
  """
  import jax  # pylint: disable=g-import-not-at-top  (lazy: the prepare CLI needs no jax)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  if jax.process_count() == 1:
    return load_builder(name, **kwargs)
  builder, error = None, None
  if jax.process_index() == 0:
    try:
      builder = load_builder(name, **kwargs)
    except Exception as e:  # pylint: disable=broad-except  (re-raised after the others know)
      error = e
  ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
  if error is not None:
    raise error
  if not ok:
    raise RuntimeError(
      f"Process 0 failed to prepare dataset {name!r} into {kwargs.get('data_dir')!r}; its log "
      f"says why. Fix that (or build it once with `python -m cxr_jax.data.prepare`) and rerun.")
  return builder if builder is not None else load_builder(name, **kwargs)


def data_source(builder: tfds.core.DatasetBuilder, split: str, *,
                skip_decoding: Sequence[str] = ()) -> Sequence[dict]:
  """`builder`'s `split` as a random-access source (`len`, `[i]`), or a clear error.

  The builder leaves out empty splits, which a small synthetic set can have: asking for one
  raises a ValueError that names it and what to change.

  Args:
    builder: a prepared builder (`load_builder`).
    split: 'train' | 'validation' | 'test'.
    skip_decoding: features returned as their encoded bytes instead of decoded arrays
      (e.g. ('image', 'mask') to read has_mask and label without decoding PNGs).
  """
  splits = list(builder.info.splits)
  if split not in splits:
    config = builder.builder_config
    if getattr(config, "kind", "") == "synthetic":
      fix = (f"the synthetic set has {config.num_examples} examples; set "
             f"--config.data.synthetic_examples to at least "
             f"{cxr_masks_and_labels.min_synthetic_examples()} (default "
             f"{cxr_masks_and_labels.DEFAULT_SYNTHETIC_EXAMPLES}) so every split gets some")
    else:
      fix = ("no image of the archive hashes into it; use a fuller archive in "
             "config.data.manual_dir (and a fresh config.data.data_dir)")
    raise ValueError(
      f"Dataset {builder.info.full_name} in {builder.data_dir} has no {split!r} split (it "
      f"has {', '.join(splits) or 'none'}; empty splits are left out): {fix}.")
  decoders = {name: tfds.decode.SkipDecoding() for name in skip_decoding}
  return builder.as_data_source(split, decoders=decoders or None)


def skip_decoding(source: Sequence[dict], features: Sequence[str]) -> Sequence[dict] | None:
  """A copy of TFDS data source `source` that leaves `features` encoded (bytes), or None
  when `source` is not a TFDS data source (an in-memory list, a wrapper)."""
  if not isinstance(source, tfds_sources.BaseDataSource):
    return None
  decoders = dict(source.decoders or {})
  decoders.update({name: tfds.decode.SkipDecoding() for name in features})
  return dataclasses.replace(source, decoders=decoders)


def resolve_name(data_config: ml_collections.ConfigDict) -> tuple[str, str]:
  """Resolves config.data.name to (dataset name, manual_dir); 'auto' picks one and logs why.

  'auto' is ('kaggle', manual_dir) when config.data.manual_dir (or, when that is '',
  $CXR_MANUAL_DIR) holds the archive, and ('synthetic', '') otherwise.
  """
  name = data_config.name
  manual_dir = data_config.manual_dir or os.environ.get(MANUAL_DIR_ENV, "")
  if name == "kaggle":
    return "kaggle", manual_dir
  if name == "synthetic":
    return "synthetic", ""
  if name != "auto":
    raise ValueError(
      f"Unknown config.data.name {name!r}; valid: 'auto', {', '.join(map(repr, NAMES))}.")
  if not manual_dir:
    logging.warning(
      "data.name='auto': using the SYNTHETIC phantoms (config.data.manual_dir and $%s are "
      "empty; set one to the Kaggle archive to train on real X-rays).", MANUAL_DIR_ENV)
    return "synthetic", ""
  try:
    archive = kaggle_archive.find_archive(manual_dir)
  except kaggle_archive.ArchiveError as e:
    logging.warning("data.name='auto': using the SYNTHETIC phantoms, because: %s", e)
    return "synthetic", ""
  logging.warning("data.name='auto': using the REAL Kaggle archive at %s.", archive.describe())
  return "kaggle", manual_dir


# ----- counts -----

COUNT_KEYS = ("total", "with_mask", "without_mask", "normal", "abnormal",
              "montgomery", "shenzhen", "synthetic")


def split_counts(builder: tfds.core.DatasetBuilder) -> dict[str, collections.Counter]:
  """Reads every record back and counts, per split, the keys of COUNT_KEYS.

  Also counts problems that must be zero: 'mask_not_binary' (values other than 0/1),
  'mask_size_differs' (mask and image shapes differ), 'empty_mask_with_has_mask',
  'mask_without_has_mask'; and image sizes under 'size HxW'.
  """
  counts = {}
  for split in builder.info.splits:
    source = data_source(builder, split, skip_decoding=("image",))
    c = collections.Counter()
    for i in range(len(source)):
      ex = source[i]
      with Image.open(io.BytesIO(ex["image"])) as image:
        width, height = image.size
      mask = ex["mask"]
      has_mask = bool(ex["has_mask"])
      c["total"] += 1
      c["with_mask" if has_mask else "without_mask"] += 1
      c[("normal", "abnormal")[int(ex["label"])]] += 1
      c[kaggle_archive.SOURCES[int(ex["source"])]] += 1
      c[f"size {height}x{width}"] += 1
      c["mask_not_binary"] += int(not np.isin(mask, (0, 1)).all())
      c["mask_size_differs"] += int(mask.shape != (height, width, 1))
      c["empty_mask_with_has_mask"] += int(has_mask and not mask.any())
      c["mask_without_has_mask"] += int(not has_mask and mask.any())
    counts[split] = c
  return counts


def format_counts(counts: dict[str, collections.Counter]) -> str:
  """A table: one row per split plus 'all', one column per COUNT_KEYS entry."""
  rows = dict(counts)
  rows["all"] = sum(counts.values(), collections.Counter())
  width = max(len(k) for k in COUNT_KEYS) + 1
  lines = ["split      " + "".join(f"{k:>{width}}" for k in COUNT_KEYS)]
  for split, c in rows.items():
    lines.append(f"{split:<11}" + "".join(f"{c[k]:>{width}}" for k in COUNT_KEYS))
  total = rows["all"]
  sizes = sorted(((n, k[5:]) for k, n in total.items() if k.startswith("size ")), reverse=True)
  lines.append(f"image sizes (HxW: count), {len(sizes)} distinct: "
               + ", ".join(f"{s}: {n}" for n, s in sizes[:6]) + (" ..." if len(sizes) > 6 else ""))
  checks = ("mask_not_binary", "mask_size_differs", "empty_mask_with_has_mask",
            "mask_without_has_mask")
  lines.append("checks (must be 0): " + ", ".join(f"{k}={total[k]}" for k in checks))
  return "\n".join(lines)


# ----- command line -----

def define_flags() -> None:
  """The command's flags; defined only when run as a command, so importing prepare (as
  train.py does) adds no flags to other programs."""
  flags.DEFINE_enum("dataset", "synthetic", ["kaggle", "synthetic", "auto"],
                    "Which config of cxr_masks_and_labels to build.")
  flags.DEFINE_string(
    "manual_dir", "", f"Kaggle archive: its folder or .zip ('' -> ${MANUAL_DIR_ENV}).")
  flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data dir.")
  flags.DEFINE_integer(
    "synthetic_examples", cxr_masks_and_labels.DEFAULT_SYNTHETIC_EXAMPLES,
    "Number of synthetic examples (all splits).")
  flags.DEFINE_bool("strict", False, "Fail on the first unusable file.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  name, manual_dir = f.dataset, f.manual_dir
  if name == "auto":
    name, manual_dir = resolve_name(ml_collections.ConfigDict(
      {"name": "auto", "manual_dir": manual_dir}))
  builder = load_builder(name, data_dir=f.data_dir, manual_dir=manual_dir,
                         synthetic_examples=f.synthetic_examples, strict=f.strict)
  print(f"{builder.info.full_name} in {builder.data_dir}")
  print(format_counts(split_counts(builder)))
  skipped = builder.info.metadata.get("skipped", []) if builder.info.metadata else []
  print(f"skipped files: {len(skipped)}")
  for line in skipped:
    print(f"  {line}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
