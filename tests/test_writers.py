"""Writers: metrics.jsonl lines and splits, resume, TensorBoard events read back."""

import glob
import json
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from cxr_jax.core.run import writers


def _read_events(workdir: str) -> list[event_pb2.Event]:
  """Every event of the TFRecord event files in `workdir` (records: len, crc, data, crc)."""
  events = []
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset : offset + 8])
      events.append(event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length]))
      offset += 12 + length + 4
  return events


def _read_jsonl(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_jsonl_and_tensorboard(tmp_path):
  workdir = str(tmp_path)
  with writers.create_writer(workdir, just_logging=False) as writer:
    writer.write_hparams({"seed": 0, "model": {"name": "unet", "depth": 4}, "aug": {"on": True}})
    writer.write_scalars(2, {"train/loss": np.float32(0.5), "train/learning_rate": 1e-3})
    writer.write_scalars(
      3,
      {
        "validation/dice": jnp.float32(0.75),
        "validation/loss": np.nan,
        "train/loss": 0.25,
        "grad_norm": 2,
      },
    )
    images = np.zeros((2, 8, 8, 3), np.float32)
    images[..., 0] = 1.0
    writer.write_images(
      3, {"validation/overlays": images, "validation/gray": np.full((1, 8, 8, 1), 128, np.uint8)}
    )
  rows = _read_jsonl(workdir)
  assert rows == [
    {"step": 2, "split": "train", "learning_rate": 1e-3, "loss": 0.5},
    {"step": 3, "split": "validation", "dice": 0.75, "loss": None},
    {"step": 3, "split": "train", "loss": 0.25, "grad_norm": 2.0},
  ]
  events = _read_events(workdir)
  scalars = {
    (e.step, v.tag): v.simple_value
    for e in events
    for v in e.summary.value
    if v.HasField("simple_value")
  }
  assert scalars[(2, "train/loss")] == 0.5
  assert scalars[(3, "validation/dice")] == 0.75
  assert scalars[(3, "grad_norm")] == 2.0
  image_tags = {(e.step, v.tag) for e in events for v in e.summary.value if v.HasField("image")}
  assert image_tags == {(3, "validation/overlays"), (3, "validation/gray")}
  png = next(
    v.image.encoded_image_string
    for e in events
    for v in e.summary.value
    if v.tag == "validation/overlays"
  )
  assert png.startswith(b"\x89PNG")
  assert any(b"model.name" in e.SerializeToString() for e in events)  # hparams


def test_resume_drops_partial_line_and_later_steps(tmp_path):
  workdir = str(tmp_path)
  writer = writers.create_writer(workdir, just_logging=False)
  for step in (1, 2, 3, 4):
    writer.write_scalars(step, {"train/loss": float(step)})
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "spl')  # killed mid-write
  writer = writers.create_writer(workdir, just_logging=False, resume_step=2)
  writer.write_scalars(3, {"train/loss": 30.0})
  writer.close()
  assert [(r["step"], r["loss"]) for r in _read_jsonl(workdir)] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_just_logging_writes_no_files(tmp_path):
  writer = writers.create_writer(str(tmp_path / "w"), just_logging=True)
  writer.write_scalars(1, {"train/loss": 1.0})
  writer.write_images(1, {"x": np.zeros((1, 2, 2, 1), np.uint8)})
  writer.close()
  assert not (tmp_path / "w").exists()


def test_split_name_and_bad_images(tmp_path):
  assert writers.split_name("validation/dice", "train") == ("validation", "dice")
  assert writers.split_name("loss", "train") == ("train", "loss")
  assert writers.split_name("eval/test/dice", "train") == ("eval", "test/dice")
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    with writers.TensorBoardWriter(str(tmp_path)) as writer:
      writer.write_images(0, {"x": np.zeros((8, 8))})


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_metrics_survive_a_deleted_or_replaced_file(tmp_path, how, caplog):
  workdir = str(tmp_path)
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write('{"step": 1, "split": "train", "loss": 1.0}\n')  # an earlier session's line
  writer = writers.create_writer(workdir, just_logging=False, resume_step=1)
  writer.write_scalars(2, {"train/loss": 2.0})
  os.remove(tmp_path / "metrics.jsonl")
  if how == "replaced":
    (tmp_path / "metrics.jsonl").write_text("")
  writer.write_scalars(3, {"train/loss": 3.0, "validation/dice": 0.5})
  writer.close()
  rows = [(r["step"], r["split"]) for r in _read_jsonl(workdir)]
  assert rows == [(1, "train"), (2, "train"), (3, "train"), (3, "validation")]
  assert "deleted or replaced" in caplog.text
