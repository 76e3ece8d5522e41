"""Which split an image belongs to: a stable hash of its id, so an image keeps its split when
files are added or removed."""

import hashlib
from collections.abc import Callable

SPLIT_PERCENT = {"train": 80, "validation": 10, "test": 10}


def split_of(image_id: str) -> str:
  """The split of an id, from the md5 of the id: 80% train, 10% validation, 10% test."""
  bucket = int(hashlib.md5(image_id.encode("utf-8")).hexdigest()[:8], 16) % 100
  total = 0
  for split, percent in SPLIT_PERCENT.items():
    total += percent
    if bucket < total:
      return split
  raise AssertionError("SPLIT_PERCENT must sum to 100")


def min_examples_for_all_splits(id_of: Callable[[int], str]) -> int:
  """The smallest n such that the ids `id_of(0..n-1)` fall in every split."""
  seen, n = set(), 0
  while len(seen) < len(SPLIT_PERCENT):
    seen.add(split_of(id_of(n)))
    n += 1
  return n


def train_or_validation(group: str) -> str:
  """'train' or 'validation' for a group (a patient, an image) outside an official test set:
  a stable hash, in SPLIT_PERCENT's train:validation proportion."""
  train, validation = SPLIT_PERCENT["train"], SPLIT_PERCENT["validation"]
  bucket = int(hashlib.md5(group.encode("utf-8")).hexdigest()[:8], 16) % (train + validation)
  return "train" if bucket < train else "validation"
