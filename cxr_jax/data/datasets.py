"""Prepared datasets: resolve config.data.name, build once, open a split as a data source."""

import contextlib
import fcntl
import os
import shutil
from collections.abc import Sequence

import ml_collections
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tensorflow_datasets.core.data_sources import base as tfds_sources

from cxr_jax.data import cxr_masks_and_labels
from cxr_jax.data import fetching
from cxr_jax.data import paths
from cxr_jax.data import registry
from cxr_jax.data.records import DataError

FetchingSource = fetching.FetchingSource  # re-exported: callers use datasets.*
skip_decoding = fetching.skip_decoding

MANUAL_DIR_ENV = "CXR_MANUAL_DIR"
# Features a split source returns encoded (PNG bytes; `images.decode_structures` reads them).
LAZY_FEATURES = ("structures",)


def load_builder(
  name: str,
  *,
  data_dir: str,
  manual_dir: str = "",
  synthetic_examples: int = 0,
  strict: bool = False,
  workers: int = 1,
  beam_options: Sequence[str] = (),
  shard_examples: int = cxr_masks_and_labels.SHARD_EXAMPLES,
) -> tfds.core.DatasetBuilder:
  """Returns the prepared builder of dataset `name` (a `registry` kind).

  Builds it into `data_dir` first when it is not there yet (a prepared dataset is reused
  as it is, so a changed manual_dir needs a fresh data_dir or a deleted dataset folder).

  Args:
    name: a registered kind ('kaggle', 'synthetic', ...).
    data_dir: TFDS data dir ('~' expanded), or a gs:// URL (see `_load_remote`).
    manual_dir: where a kind on disk reads its files ('' -> $CXR_MANUAL_DIR).
    synthetic_examples: size of a generated kind (0: its default; each size its own config).
    strict: raise on unusable files instead of skipping and counting them.
    workers: processes decoding images while building (1: this one).
    shard_examples: examples per shard file, when building.
    beam_options: Apache Beam pipeline options ('--runner=DataflowRunner', ...): build on
      Beam, one shard per task, instead of in this process (`beam_pipeline`).
  """
  kind = registry.get(name)
  manual_dir = "" if kind.generated else (manual_dir or os.environ.get(MANUAL_DIR_ENV, ""))
  manual_dir = paths.resolve(manual_dir) if manual_dir else ""
  if paths.is_url(data_dir):
    return _load_remote(
      name, data_dir, manual_dir, synthetic_examples, strict, workers, shard_examples
    )
  with _prepare_lock(paths.resolve(data_dir), name):  # runs started together build it once
    builder = _builder(
      name, paths.resolve(data_dir), synthetic_examples, strict, workers, shard_examples
    )
    _remove_incomplete(builder)
    prepared = _is_prepared(builder)
    read_from = manual_dir
    if not kind.generated and not prepared:
      if paths.is_url(manual_dir):  # the archive's readers read files: a local copy first
        logging.info("Copying %s to this host to read it.", manual_dir)
        read_from = paths.download_tree(manual_dir, paths.cache_dir(manual_dir, "archives"))
      kind.find(read_from)  # fails early, saying where it looked
    builder.recorded_manual_dir = manual_dir  # the URL, where a local copy is read
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
        manual_dir=read_from or None, try_download_gcs=False, **beam_pipeline(beam_options)
      )
    )
  if prepared and not kind.generated:
    _warn_if_built_elsewhere(builder, manual_dir)
  return builder


def _remove_incomplete(builder: tfds.core.DatasetBuilder) -> None:
  """Removes the `incomplete.*` folders a killed prepare left beside the dataset's (TFDS
  writes into one and renames it into place when done). Called under `_prepare_lock`, so no
  prepare on this host is writing into them."""
  parent = os.path.dirname(os.fspath(builder.data_dir))
  if not os.path.isdir(parent):
    return
  for name in sorted(os.listdir(parent)):
    path = os.path.join(parent, name)
    if name.startswith("incomplete.") and os.path.isdir(path):
      size = sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
      )
      logging.warning(
        "Removing %s (%.1f MB), left by a prepare that was stopped before it finished.",
        path,
        size / 2**20,
      )
      shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _prepare_lock(data_dir: str, name: str):
  """Holds an exclusive lock on DATA_DIR/.prepare_<name>.lock (two runs started at once,
  e.g. a sweep with --parallel: the second waits and then reads what the first built,
  where both would otherwise build it and the second fail renaming into place)."""
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, f".prepare_{name}.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def beam_pipeline(options: Sequence[str]) -> dict:
  """DownloadConfig's beam_options and beam_runner for pipeline `options` ({} for none)."""
  if not options:
    return {}
  try:
    from apache_beam.options import pipeline_options  # noqa: PLC0415  (optional, heavy)
  except ImportError as e:
    raise DataError(
      f"--beam_pipeline_options needs Apache Beam ({e}): pip install 'cxr_jax[beam]'."
    ) from e
  beam_options = pipeline_options.PipelineOptions(flags=list(options))
  runner = beam_options.view_as(pipeline_options.StandardOptions).runner or "DirectRunner"
  return {"beam_options": beam_options, "beam_runner": runner}


def _builder(
  name: str,
  data_dir: str,
  synthetic_examples: int,
  strict: bool,
  workers: int = 1,
  shard_examples: int = cxr_masks_and_labels.SHARD_EXAMPLES,
) -> tfds.core.DatasetBuilder:
  return cxr_masks_and_labels.CxrMasksAndLabels(
    config=cxr_masks_and_labels.config_for(name, synthetic_examples),
    data_dir=data_dir,
    strict=strict,
    workers=workers,
    shard_examples=shard_examples,
  )


def _load_remote(
  name: str,
  data_dir: str,
  manual_dir: str,
  synthetic_examples: int,
  strict: bool,
  workers: int = 1,
  shard_examples: int = cxr_masks_and_labels.SHARD_EXAMPLES,
) -> tfds.core.DatasetBuilder:
  """A dataset prepared in a bucket, opened from this host's local copy.

  TFDS cannot write its array_record files into gs:// (nor can they be read there without
  TensorFlow): the dataset is built on local disk and uploaded once. Another host copies
  its description (dataset_info.json and the like) and fetches each shard file when it
  first reads from it (`FetchingSource`), so a host of a multi-host job fetches only the
  shards its process reads; the copy starts afresh when the bucket's description differs.
  """
  local_root = paths.cache_dir(data_dir, "tfds")
  local = os.fspath(_builder(name, local_root, synthetic_examples, strict).data_dir)
  remote = f"{paths.resolve(data_dir)}/{os.path.relpath(local, local_root)}"
  remote_info = epath.Path(remote) / "dataset_info.json"
  in_bucket = remote_info.exists()
  if in_bucket:
    local_info = epath.Path(local) / "dataset_info.json"
    if not (local_info.exists() and local_info.read_text() == remote_info.read_text()):
      logging.info("Copying the description of the prepared dataset %s to %s.", remote, local)
      shutil.rmtree(local, ignore_errors=True)
      os.makedirs(local)
      for path in epath.Path(remote).iterdir():
        if ".array_record-" not in path.name:  # shards: fetched when read
          (epath.Path(local) / path.name).write_bytes(path.read_bytes())
  # The local copy: read as it is, or built first when the bucket has none yet.
  builder = load_builder(
    name,
    data_dir=local_root,
    manual_dir=manual_dir,
    synthetic_examples=synthetic_examples,
    strict=strict,
    workers=workers,
    shard_examples=shard_examples,
  )
  if not in_bucket:
    count = paths.upload_tree(local, remote)
    logging.info("Uploaded the prepared dataset to %s (%d files).", remote, count)
  builder.remote_dir = remote  # `split_source` fetches the shards it reads from there
  return builder


def _warn_if_built_elsewhere(builder: tfds.core.DatasetBuilder, manual_dir: str) -> None:
  """A prepared dataset is reused as it is: say so when it came from other files."""
  if built_elsewhere(builder, manual_dir):
    given = paths.resolve(manual_dir)
    missing = "" if epath.Path(given).exists() else " (which does not exist)"
    logging.warning(
      "%s was built from %s, not from the manual_dir given, %s%s: the prepared copy is used "
      "as it is. To build from %s, use a fresh data_dir or delete %s.",
      builder.data_dir,
      built_from(builder),
      given,
      missing,
      given,
      builder.data_dir,
    )


def built_from(builder: tfds.core.DatasetBuilder) -> str:
  """The manual_dir a prepared dataset was built from ('' for generated kinds)."""
  return (builder.info.metadata or {}).get("manual_dir", "")


def built_elsewhere(builder: tfds.core.DatasetBuilder, manual_dir: str) -> bool:
  """Whether `manual_dir` ('' -> $CXR_MANUAL_DIR) names other files than the dataset came from."""
  given = manual_dir or os.environ.get(MANUAL_DIR_ENV, "")
  source = built_from(builder)
  return bool(given and source and paths.resolve(given) != source)


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  return os.path.exists(os.path.join(os.fspath(builder.data_dir), "dataset_info.json"))


def resolve_name(data_config: ml_collections.ConfigDict) -> tuple[str, str]:
  """Resolves config.data.name to (dataset name, manual_dir); 'auto' picks one and logs why.

  'auto' is the first kind on disk whose files config.data.manual_dir (or, when that is '',
  $CXR_MANUAL_DIR) holds, and `registry.AUTO_FALLBACK` otherwise.
  """
  name = data_config.name
  manual_dir = data_config.manual_dir or os.environ.get(MANUAL_DIR_ENV, "")
  if name != "auto":
    kind = registry.get(name)
    return name, "" if kind.generated else manual_dir
  if manual_dir and not epath.Path(paths.resolve(manual_dir)).exists():
    raise DataError(
      f"config.data.manual_dir={manual_dir!r} does not exist (a typo?). Point it at the "
      "archive, or leave it empty (or set --config.data.name=synthetic) for the phantoms."
    )
  if not manual_dir:
    logging.warning(
      "data.name='auto': using the SYNTHETIC phantoms (config.data.manual_dir and $%s are "
      "empty; set one to the Kaggle archive to train on real X-rays).",
      MANUAL_DIR_ENV,
    )
    return registry.AUTO_FALLBACK, ""
  reasons = []
  for kind in registry.KINDS.values():
    if kind.generated:
      continue
    try:
      where = kind.find(manual_dir)
    except DataError as e:
      reasons.append(str(e))
      continue
    logging.warning("data.name='auto': using the REAL %r data at %s.", kind.name, where)
    return kind.name, manual_dir
  logging.warning("data.name='auto': using the SYNTHETIC phantoms, because: %s", " ".join(reasons))
  return registry.AUTO_FALLBACK, ""


def split_source(
  builder: tfds.core.DatasetBuilder, split: str, *, skip_decoding: Sequence[str] = ()
) -> Sequence[dict]:
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
    kind = registry.get(config.kind)
    if kind.generated:
      minimum = cxr_masks_and_labels.min_examples(kind.name)
      fix = (
        f"the {kind.name} set has {config.num_examples} examples; set "
        f"--config.data.synthetic_examples to at least {minimum} (default "
        f"{kind.default_size}) so every split gets some"
      )
    else:
      fix = (
        "no image of the archive hashes into it; use a fuller archive in "
        "config.data.manual_dir (and a fresh config.data.data_dir)"
      )
    raise ValueError(
      f"Dataset {builder.info.full_name} in {builder.data_dir} has no {split!r} split (it "
      f"has {', '.join(splits) or 'none'}; empty splits are left out): {fix}."
    )
  # The structures' bit plane stays a PNG until a multi-structure task decodes it: most
  # readers of a split never look at it, and decoding it costs as much as the mask.
  undecoded = {*skip_decoding, *LAZY_FEATURES} & set(builder.info.features)
  decoders = {name: tfds.decode.SkipDecoding() for name in sorted(undecoded)}
  source = builder.as_data_source(split, decoders=decoders or None)
  remote = getattr(builder, "remote_dir", "")
  if remote:  # its shards are fetched as read: checking each would fetch them all
    return FetchingSource(source, remote)
  _check_readable(builder, split, source)
  return source


def _check_readable(builder: tfds.core.DatasetBuilder, split: str, source: Sequence[dict]) -> None:
  """Reads the first record of each of the split's files: a truncated or damaged file fails
  here, named, rather than as a bare 'Corrupted Riegeli/records file' inside the loader."""
  info = builder.info.splits[split]
  first = 0
  for filename, length in zip(info.filenames, info.shard_lengths):
    if length:
      try:
        source[first]
      except RuntimeError as e:
        path = os.path.join(os.fspath(builder.data_dir), filename)
        raise DataError(
          f"{path} cannot be read ({' '.join(str(e).split())[:160]}): the prepared dataset "
          f"is damaged (a truncated copy?). Delete {builder.data_dir} and prepare it again "
          "(python -m cxr_jax.data.prepare, or the same training command)."
        ) from e
    first += length


def shard_lengths(source: Sequence[dict]) -> list[int] | None:
  """The examples per shard file of a prepared split's source, in order; None for a source
  that is not one split of a prepared dataset (a list, a protocol's subset)."""
  if isinstance(source, FetchingSource):
    source = source.source
  if isinstance(source, tfds_sources.BaseDataSource):
    return list(source.dataset_info.splits[source.split].shard_lengths)
  return None


def finding_names(source: Sequence[dict]) -> tuple[str, ...]:
  """The names of the `findings` codes of a split source (its dataset's metadata); () for a
  source that is not a prepared dataset (an in-memory list)."""
  if hasattr(source, "finding_names"):  # a mixture: the union of its datasets'
    return tuple(source.finding_names)
  info = getattr(source, "dataset_info", None)
  metadata = getattr(info, "metadata", None) or {}
  return tuple(metadata.get("findings", ()))
