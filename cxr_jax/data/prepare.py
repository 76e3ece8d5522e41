r"""Builds `cxr_masks_and_labels` once and prints its split counts.

  python -m cxr_jax.data.prepare --dataset=kaggle --manual_dir=PATH --data_dir=PATH
  python -m cxr_jax.data.prepare --dataset=synthetic --data_dir=PATH [--synthetic_examples=400]
  ... --workers=N                      decode and encode images in N processes
  ... --beam_pipeline_options=runner=DataflowRunner,project=P,...   build on Apache Beam

Run it on one host before a multi-host job, so that the workers only read.
"""

from __future__ import annotations

import collections
import io
import os
from collections.abc import Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import app
from absl import flags
from PIL import Image

from cxr_jax import cli
from cxr_jax.data import cxr_masks_and_labels
from cxr_jax.data import datasets
from cxr_jax.data import registry
from cxr_jax.data.splits import SPLIT_PERCENT

# ----- counts -----


def count_keys(kind: str = "") -> tuple[str, ...]:
  """The table's columns: totals, masks, labels, then the sources of dataset kind `kind`
  (every registered source when '')."""
  sources = registry.get(kind).sources if kind else registry.source_names()
  return ("total", "with_mask", "without_mask", "normal", "abnormal", *sources)


def split_counts(builder: tfds.core.DatasetBuilder) -> dict[str, collections.Counter]:
  """Reads every record back and counts, per split, the keys of `count_keys()`.

  Also counts problems that must be zero: 'mask_not_binary' (values other than 0/1),
  'mask_size_differs' (mask and image shapes differ), 'empty_mask_with_has_mask',
  'mask_without_has_mask'; and image sizes under 'size HxW'.
  """
  counts = {split: collections.Counter() for split in SPLIT_PERCENT}  # empty ones stay 0
  sources = registry.source_names()
  for split in builder.info.splits:
    source = datasets.split_source(builder, split, skip_decoding=("image",))
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
      c[sources[int(ex["source"])]] += 1
      c[f"size {height}x{width}"] += 1
      c["mask_not_binary"] += int(not np.isin(mask, (0, 1)).all())
      c["mask_size_differs"] += int(mask.shape != (height, width, 1))
      c["empty_mask_with_has_mask"] += int(has_mask and not mask.any())
      c["mask_without_has_mask"] += int(not has_mask and mask.any())
      if has_mask:  # the masks' foreground per source: inverted masks (lungs 0) show here
        fraction = float(np.count_nonzero(mask)) / max(mask.size, 1)
        c[f"foreground_sum {sources[int(ex['source'])]}"] += fraction
        c[f"foreground_count {sources[int(ex['source'])]}"] += 1
        c["mask_foreground_outlier"] += int(not LUNG_FRACTION[0] <= fraction <= LUNG_FRACTION[1])
    counts[split] = c
  return counts


# The fraction of a chest X-ray that lung masks cover: 0.25 on average in both archives
# (every one of the 563 masks of the 512 px copy within 0.08-0.43), 0.23 on the phantoms;
# outside this range a mask is suspect (inverted: lungs 0, background 1; or empty).
LUNG_FRACTION = (0.05, 0.6)


def foreground_lines(total: collections.Counter) -> list[str]:
  """Each source's mean mask foreground fraction, and a WARNING for a source outside
  `LUNG_FRACTION` (e.g. inverted masks, which train to a good Dice of the wrong thing)."""
  means = {
    key.split(" ", 1)[1]: total[key] / total[f"foreground_count {key.split(' ', 1)[1]}"]
    for key in sorted(total)
    if key.startswith("foreground_sum ") and total[f"foreground_count {key.split(' ', 1)[1]}"]
  }
  if not means:
    return []
  lines = [
    "mask foreground (mean fraction of the image): "
    + ", ".join(f"{source} {mean:.3f}" for source, mean in means.items())
    + f"; masks outside {LUNG_FRACTION[0]}-{LUNG_FRACTION[1]}: {total['mask_foreground_outlier']}"
  ]
  for source, mean in means.items():
    if not LUNG_FRACTION[0] <= mean <= LUNG_FRACTION[1]:
      lines.append(
        f"WARNING: the {source} masks cover {mean:.0%} of their images on average (lungs "
        f"cover {LUNG_FRACTION[0]:.0%}-{LUNG_FRACTION[1]:.0%}): are they inverted (lungs 0) "
        "or empty? Check a few against their images before training."
      )
  return lines


def format_counts(counts: dict[str, collections.Counter], kind: str = "") -> str:
  """A table: one row per split plus 'all', one column per `count_keys(kind)` entry."""
  keys = count_keys(kind)
  rows = dict(counts)
  rows["all"] = sum(counts.values(), collections.Counter())
  width = max(len(k) for k in keys) + 1
  lines = ["split      " + "".join(f"{k:>{width}}" for k in keys)]
  for split, c in rows.items():
    lines.append(f"{split:<11}" + "".join(f"{c[k]:>{width}}" for k in keys))
  total = rows["all"]
  sizes = sorted(((n, k[5:]) for k, n in total.items() if k.startswith("size ")), reverse=True)
  lines.append(
    f"image sizes (HxW: count), {len(sizes)} distinct: "
    + ", ".join(f"{s}: {n}" for n, s in sizes[:6])
    + (" ..." if len(sizes) > 6 else "")
  )
  checks = (
    "mask_not_binary",
    "mask_size_differs",
    "empty_mask_with_has_mask",
    "mask_without_has_mask",
  )
  lines.append("checks (must be 0): " + ", ".join(f"{k}={total[k]}" for k in checks))
  lines += foreground_lines(total)
  empty = [split for split, c in counts.items() if not c["total"]]
  if empty:
    lines.append(
      f"EMPTY splits: {', '.join(empty)} (no usable image hashed into them; "
      "training and evaluation on them will fail: see the skipped files below)"
    )
  return "\n".join(lines)


# ----- command line -----


def define_flags() -> None:
  """The command's flags; defined only when run as a command, so importing prepare (as
  train.py does) adds no flags to other programs."""
  flags.DEFINE_enum(
    "dataset",
    "synthetic",
    [*registry.names(), "auto"],
    "Which config of cxr_masks_and_labels to build.",
  )
  flags.DEFINE_string(
    "manual_dir", "", f"Kaggle archive: its folder or .zip ('' -> ${datasets.MANUAL_DIR_ENV})."
  )
  flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data dir.")
  flags.DEFINE_integer(
    "synthetic_examples", 0, "Number of synthetic examples (all splits; 0: the default)."
  )
  flags.DEFINE_bool("strict", False, "Fail on the first unusable file.")
  flags.DEFINE_integer("workers", 1, "Processes decoding and encoding images (1: this one).")
  flags.DEFINE_list(
    "beam_pipeline_options",
    [],
    "Build on Apache Beam with these pipeline options, comma-separated without the leading "
    "'--' (e.g. runner=DirectRunner,direct_num_workers=2,direct_running_mode=multi_processing;"
    " README 'Data at scale' for Dataflow). Empty: build in this process.",
  )
  flags.DEFINE_integer(
    "shard_examples",
    cxr_masks_and_labels.SHARD_EXAMPLES,
    "Examples per shard file (each host of a job reads whole shards).",
  )
  flags.DEFINE_bool("count", True, "Read every record back and print the split counts table.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  name, manual_dir = args.dataset, args.manual_dir
  if name == "auto":
    name, manual_dir = datasets.resolve_name(
      ml_collections.ConfigDict({"name": "auto", "manual_dir": manual_dir})
    )
  builder = datasets.load_builder(
    name,
    data_dir=args.data_dir,
    manual_dir=manual_dir,
    synthetic_examples=args.synthetic_examples,
    strict=args.strict,
    workers=args.workers,
    shard_examples=args.shard_examples,
    beam_options=[f"--{option}" for option in args.beam_pipeline_options],
  )
  print(f"{builder.info.full_name} in {builder.data_dir}")
  source = datasets.built_from(builder)
  if source:
    print(f"built from {source}")
    if datasets.built_elsewhere(builder, manual_dir):
      given = manual_dir or os.environ.get(datasets.MANUAL_DIR_ENV, "")
      print(
        f"WARNING: not rebuilt from --manual_dir={given}: this data_dir already holds the "
        f"dataset built from {source}. Use a fresh --data_dir, or delete {builder.data_dir}."
      )
  if args.count:
    print(format_counts(split_counts(builder), builder.builder_config.kind))
  else:
    print(", ".join(f"{name}: {split.num_examples}" for name, split in builder.info.splits.items()))
  skipped = builder.info.metadata.get("skipped", []) if builder.info.metadata else []
  print(f"skipped files: {len(skipped)}")
  for line in skipped:
    print(f"  {line}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
