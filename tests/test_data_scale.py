"""Data at scale: a build in N processes, or on Apache Beam, writes the same dataset as one
process (same ids in the same order per split, every feature's bytes equal)."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cxr_jax.data import datasets
from tests.conftest import REPO_ROOT
from tests.test_gcs import gcs  # noqa: F401  (the GCS emulator fixture)

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


# Each host reads only its part: two "hosts" (processes with their own cache) read a split
# of a dataset in a bucket (a GCS emulator), each its process's share.
HOST = """
import json, os, sys
import ml_collections
from cxr_jax.data import datasets, input_pipeline
index, data_dir = int(sys.argv[1]), sys.argv[2]
builder = datasets.load_builder("synthetic", data_dir=data_dir, synthetic_examples=60)
source = datasets.split_source(builder, "train")
config = ml_collections.ConfigDict({"eval_batch_size": 8, "data": {"image_size": 32,
                                    "num_workers": 0, "prefetch": 2}})
batches = input_pipeline.create_eval_batches(config, source, process_index=index, process_count=2)
ids = [i for batch in batches for i, w in zip(batch["id"], batch["weight"]) if w > 0]
fetched = sorted(f for f in os.listdir(builder.data_dir) if "-train.array_record-" in f)
print(json.dumps({"ids": ids, "fetched": fetched, "batches": len(batches)}))
"""


def test_two_hosts_fetch_disjoint_shards_and_read_every_example_once(gcs, tmp_path, monkeypatch):  # noqa: F811
  import gcsfs

  from tests.test_gcs import BUCKET

  data_dir = f"gs://{BUCKET}/scale"
  monkeypatch.setenv("CXR_JAX_CACHE", str(tmp_path / "host0"))  # prepared here, uploaded
  datasets.load_builder("synthetic", data_dir=data_dir, synthetic_examples=60, shard_examples=4)
  fs = gcsfs.GCSFileSystem(token="anon")
  shards = {p.rsplit("/", 1)[-1] for p in fs.find(f"{BUCKET}/scale") if "-train.array_record-" in p}
  hosts = [
    subprocess.Popen(
      [sys.executable, "-c", HOST, str(i), data_dir], cwd=REPO_ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True,
      env={**os.environ, **gcs, "PYTHONPATH": str(REPO_ROOT),
           "CXR_JAX_CACHE": str(tmp_path / f"host{i + 1}")},
    )
    for i in range(2)
  ]  # fmt: skip
  results = []
  for host in hosts:
    out, err = host.communicate(timeout=300)
    assert host.returncode == 0, err[-3000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  first, second = results
  assert first["batches"] == second["batches"]  # the hosts' evaluation steps stay in lockstep
  assert len(shards) >= 8 and set(first["fetched"]) | set(second["fetched"]) == shards
  assert not set(first["fetched"]) & set(second["fetched"]) and first["fetched"]
  assert len(first["ids"]) + len(second["ids"]) == len(set(first["ids"]) | set(second["ids"]))
  assert len(set(first["ids"]) | set(second["ids"])) == 4 * (len(shards) - 1) + 2  # 50 train
