"""grain loaders over an in-memory source shaped like the TFDS records."""

import collections

import numpy as np
import pytest

from configs import default
from cxr_jax.data import input_pipeline

SIZE = 32
NUM_EXAMPLES = 24


def _source(n: int = NUM_EXAMPLES) -> list[dict]:
  """Records as the TFDS builder writes them, at varied native sizes."""
  rng = np.random.default_rng(0)
  records = []
  for i in range(n):
    height, width = rng.integers(20, 70, size=2)
    image = rng.integers(0, 256, (height, width, 1), dtype=np.uint8)
    has_mask = i % 4 != 3
    mask = (image > 128).astype(np.uint8) * has_mask
    records.append(
      dict(
        image=image,
        mask=mask,
        has_mask=has_mask,
        label=int(i % 3 == 0),
        source=i % 3,
        id=f"img{i:03d}".encode(),
        sex="",
        age=-1,
        finding="",
      )
    )
  return records


def _config(**data) -> default.ml_collections.ConfigDict:
  config = default.get_config("smoke")
  config.data.image_size = SIZE
  config.data.examples = "all"
  config.batch_size = 4
  config.data.update(data)
  return config


def _ids(batches) -> list[str]:
  return [i for b in batches for i in b["id"].tolist()]


def test_batch_fields_shapes_and_dtypes():
  batch = next(
    input_pipeline.create_train_iterator(_config(), _source(), process_index=0, process_count=1)
  )
  expected = {
    "image": ((4, SIZE, SIZE, 1), np.float32),
    "lung_mask": ((4, SIZE, SIZE, 1), np.float32),
    "has_mask": ((4,), np.float32),
    "label": ((4,), np.int32),
    "source": ((4,), np.int32),
    "weight": ((4,), np.float32),
    "orig_size": ((4, 2), np.int32),
    "scale": ((4,), np.float32),
    "pad": ((4, 2), np.int32),
  }
  assert set(batch) == set(expected) | {"id"}
  for key, (shape, dtype) in expected.items():
    assert batch[key].shape == shape and batch[key].dtype == dtype, key
  assert batch["id"].dtype.kind == "U" and np.all(batch["weight"] == 1)
  assert set(np.unique(batch["lung_mask"])) <= {0.0, 1.0}


def test_each_example_once_per_epoch_and_reshuffled():
  it = input_pipeline.create_train_iterator(_config(), _source(), process_index=0, process_count=1)
  ids = _ids(next(it) for _ in range(3 * NUM_EXAMPLES // 4))
  epochs = [ids[e * NUM_EXAMPLES : (e + 1) * NUM_EXAMPLES] for e in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == sorted(f"img{i:03d}" for i in range(NUM_EXAMPLES))
  assert epochs[0] != epochs[1] != epochs[2]
  # Same seed, same order; another seed, another order.
  again = input_pipeline.create_train_iterator(
    _config(), _source(), process_index=0, process_count=1
  )
  assert _ids([next(again)]) == ids[:4]


def test_masked_keeps_only_examples_with_masks():
  source = _source()
  it = input_pipeline.create_train_iterator(
    _config(examples="with_masks"), source, process_index=0, process_count=1
  )
  masked = [r["id"].decode() for r in source if r["has_mask"]]
  ids = _ids(next(it) for _ in range(5))[: len(masked)]  # 18 masked: the first epoch
  assert sorted(ids) == sorted(masked)


def test_labels_reads_every_image_without_masks():
  """'labels' (classification): every image once per epoch, has_mask 0, no mask."""
  it = input_pipeline.create_train_iterator(
    _config(examples="all_without_masks"), _source(), process_index=0, process_count=1
  )
  batches = [next(it) for _ in range(NUM_EXAMPLES // 4)]
  assert sorted(_ids(batches)) == sorted(f"img{i:03d}" for i in range(NUM_EXAMPLES))
  for batch in batches:
    assert np.all(batch["has_mask"] == 0) and np.all(batch["lung_mask"] == 0)
  # 'all' keeps the masks of the same images.
  all_batch = next(
    input_pipeline.create_train_iterator(_config(), _source(), process_index=0, process_count=1)
  )
  assert all_batch["has_mask"].any() and all_batch["lung_mask"].any()


def test_scan_of_a_tfds_source_decodes_no_image(tmp_path, monkeypatch):
  """Selecting 'with_masks' examples reads has_mask and label without decoding a PNG."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from cxr_jax.data import datasets  # pylint: disable=g-import-not-at-top

  builder = datasets.load_builder("synthetic", data_dir=str(tmp_path), synthetic_examples=20)
  source = datasets.split_source(builder, "train")
  expected = [(bool(r["has_mask"]), int(r["label"])) for r in source]

  def no_decoding(*args, **kwargs):
    raise AssertionError("_scan decoded an image")

  monkeypatch.setattr(tfds.features.Image, "decode_example_np", no_decoding)
  has_mask, labels = input_pipeline._scan(source, np.arange(len(source)))
  assert list(zip(has_mask.tolist(), labels.tolist())) == expected
  monkeypatch.undo()
  config = _config(examples="with_masks")
  config.batch_size = 2
  batch = next(
    input_pipeline.create_train_iterator(config, source, process_index=0, process_count=1)
  )
  assert np.all(batch["has_mask"] == 1) and batch["lung_mask"].any()
  config.data.examples = "all_without_masks"  # reads a source that leaves masks encoded
  batch = next(
    input_pipeline.create_train_iterator(config, source, process_index=0, process_count=1)
  )
  assert np.all(batch["has_mask"] == 0) and batch["image"].std() > 0


def test_balanced_sampler_gives_equal_classes_deterministically():
  config = _config(examples="all_without_masks", balance_classes=True)
  source = _source()
  it = input_pipeline.create_train_iterator(config, source, process_index=0, process_count=1)
  # 8 abnormal, 16 normal: an epoch is 16 of each.
  labels = np.concatenate([next(it)["label"] for _ in range(8)])
  assert collections.Counter(labels.tolist()) == {0: 16, 1: 16}
  again = input_pipeline.create_train_iterator(config, source, process_index=0, process_count=1)
  np.testing.assert_array_equal(np.concatenate([next(again)["label"] for _ in range(8)]), labels)


def test_restored_iterator_continues_with_the_same_batches():
  config, source = _config(), _source()
  reference = input_pipeline.create_train_iterator(config, source, process_index=0, process_count=1)
  expected = [next(reference) for _ in range(10)]
  it = input_pipeline.create_train_iterator(config, source, process_index=0, process_count=1)
  for _ in range(4):
    next(it)
  state = it.get_state()
  restored = input_pipeline.create_train_iterator(config, source, process_index=0, process_count=1)
  restored.set_state(state)
  for want in expected[4:]:
    got = next(restored)
    assert got["id"].tolist() == want["id"].tolist()
    np.testing.assert_array_equal(got["image"], want["image"])


def test_worker_processes_give_the_same_batches_and_restore():
  source = _source()
  serial = input_pipeline.create_train_iterator(_config(), source, process_index=0, process_count=1)
  expected = _ids(next(serial) for _ in range(6))
  it = input_pipeline.create_train_iterator(
    _config(num_workers=1), source, process_index=0, process_count=1
  )
  try:
    assert _ids(next(it) for _ in range(3)) == expected[:12]
    state = it.get_state()
  finally:
    it.close()
  restored = input_pipeline.create_train_iterator(
    _config(num_workers=1), source, process_index=0, process_count=1
  )
  try:
    restored.set_state(state)
    assert _ids(next(restored) for _ in range(3)) == expected[12:]
  finally:
    restored.close()


def test_process_slices_are_disjoint_and_cover_the_data():
  config, source = _config(), _source()
  config.batch_size = 6
  seen = []
  for index in range(3):
    it = input_pipeline.create_train_iterator(config, source, process_index=index, process_count=3)
    batches = [next(it) for _ in range(4)]  # 8 examples per process, 2 per batch
    assert all(len(b["id"]) == 2 for b in batches)
    seen.append(set(_ids(batches)))
  assert sum(len(s) for s in seen) == NUM_EXAMPLES
  assert set.union(*seen) == {f"img{i:03d}" for i in range(NUM_EXAMPLES)}


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_every_example_once_with_zero_weight_padding(process_count):
  config, source = _config(), _source(21)
  config.eval_batch_size = 8
  ids, counts = [], set()
  for index in range(process_count):
    batches = input_pipeline.create_eval_batches(
      config, source, process_index=index, process_count=process_count
    )
    first, second = list(batches), list(batches)  # re-iterable, same order
    assert _ids(first) == _ids(second)
    counts.add(len(first))
    for batch in first:
      real = batch["weight"] == 1
      assert np.all(batch["weight"][~real] == 0) and np.all(batch["image"][~real] == 0)
      assert np.all(batch["id"][~real] == "")
      ids += batch["id"][real].tolist()
  assert len(counts) == 1  # every process runs the same number of eval steps
  assert sorted(ids) == sorted(f"img{i:03d}" for i in range(21))


@pytest.mark.parametrize(
  "key,value,message",
  [
    (
      "batch_size",
      5,
      "batch_size=5 must be a positive multiple of 2 (the device count is 1, "
      "the process count 2); set --config.batch_size=4",
    ),
    ("image_size", 8, "image_size=8"),
  ],
)
def test_bad_config_raises_clear_errors(key, value, message):
  config = _config()
  if key == "batch_size":
    config.batch_size = value
  else:
    config.data[key] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    input_pipeline.create_train_iterator(config, _source(), process_index=0, process_count=2)
