"""Data at scale: a build in N processes, or on Apache Beam, writes the same dataset as one
process (same ids in the same order per split, every feature's bytes equal)."""

import importlib.util

import numpy as np
import pytest

from cxr_jax.data import datasets

EXAMPLES = 40


def _build(root, **kwargs):
  builder = datasets.load_builder(
    "synthetic", data_dir=str(root), synthetic_examples=EXAMPLES, **kwargs
  )
  records = {}
  for split in builder.info.splits:
    source = datasets.split_source(builder, split, skip_decoding=("image", "mask"))
    records[split] = [source[i] for i in range(len(source))]
  return records, builder


def _assert_same(a, b):
  assert list(a) == list(b)
  for split in a:
    assert [r["id"] for r in a[split]] == [r["id"] for r in b[split]], split
    for x, y in zip(a[split], b[split], strict=True):
      assert x.keys() == y.keys()
      for key in x:
        assert np.array_equal(x[key], y[key]), (split, x["id"], key)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  return _build(tmp_path_factory.mktemp("one"))


def test_two_workers_write_the_dataset_one_process_writes(one_process, tmp_path):
  single, builder = one_process
  parallel, parallel_builder = _build(tmp_path, workers=2)
  _assert_same(single, parallel)
  assert sum(len(v) for v in single.values()) == EXAMPLES
  assert parallel_builder.info.splits["train"].shard_lengths == (
    builder.info.splits["train"].shard_lengths
  )


@pytest.mark.skipif(
  importlib.util.find_spec("apache_beam") is None,
  reason="Apache Beam is not installed (pip install '.[beam]'; not in the test extra: it "
  "pins protobuf < 7 and Pillow < 13 under the rest, and its DirectRunner takes a minute)",
)
def test_a_beam_build_writes_the_dataset_one_process_writes(one_process, tmp_path):
  single, _ = one_process
  options = [
    "--runner=DirectRunner",
    "--direct_num_workers=2",
    "--direct_running_mode=multi_processing",
  ]
  beam, _ = _build(tmp_path, beam_options=options)
  _assert_same(single, beam)
