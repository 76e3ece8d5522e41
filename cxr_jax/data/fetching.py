"""A prepared dataset in a bucket, read shard by shard: each host fetches only what it reads."""

import dataclasses
import os
import shutil
import threading
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tensorflow_datasets.core.data_sources import base as tfds_sources


@dataclasses.dataclass
class FetchingSource(Sequence):
  """A prepared split whose shard files lie in a bucket (`remote_dir`): each is copied into
  the local dataset folder the first time a record of it is read, so a host fetches only
  the shards its process reads (`input_pipeline` gives each process whole shards)."""

  source: tfds_sources.BaseDataSource  # over the local folder, shards opened lazily
  remote_dir: str

  def __post_init__(self):
    instructions = self.source.dataset_info.splits[self.source.split].file_instructions
    self._files = [os.fspath(i.filename) for i in instructions]
    self._ends = np.cumsum([i.take for i in instructions])
    self._fetched: set[int] = set()

  def __len__(self) -> int:
    return len(self.source)

  @property
  def dataset_info(self):
    """The prepared dataset's description (its metadata names the findings' codes)."""
    return self.source.dataset_info

  def __getitem__(self, index):
    self._fetch(int(index))
    return self.source[index]

  def __getitems__(self, indices: Sequence[int]) -> Sequence[dict]:
    for index in indices:
      self._fetch(int(index))
    return self.source.__getitems__(indices)

  def skip_decoding(self, features: Sequence[str]) -> "FetchingSource":
    return FetchingSource(skip_decoding(self.source, features), self.remote_dir)

  def _fetch(self, index: int) -> None:
    shard = int(np.searchsorted(self._ends, index, side="right"))
    if shard in self._fetched:
      return
    local = self._files[shard]
    if not os.path.exists(local):
      remote = epath.Path(self.remote_dir) / os.path.basename(local)
      logging.info("Fetching %s.", remote)
      tmp = f"{local}.tmp{os.getpid()}-{threading.get_ident()}"  # reader threads may race
      with remote.open("rb") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
      os.replace(tmp, local)
    self._fetched.add(shard)


def skip_decoding(source: Sequence[dict], features: Sequence[str]) -> Sequence[dict]:
  """A view of `source` whose records leave `features` (e.g. 'image', 'mask') undecoded.

  A TFDS data source gets SkipDecoding decoders; a source with a `skip_decoding(features)`
  method (a wrapper) is asked for its own view; anything else (an in-memory list) is
  returned as it is, decoding being free there.
  """
  if hasattr(source, "skip_decoding"):
    return source.skip_decoding(features)
  if isinstance(source, tfds_sources.BaseDataSource):
    decoders = dict(source.decoders or {})
    decoders.update({name: tfds.decode.SkipDecoding() for name in features})
    return dataclasses.replace(source, decoders=decoders)
  return source
