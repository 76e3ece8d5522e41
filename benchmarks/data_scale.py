r"""How the data path's cost grows with the dataset: prepare, load, evaluate and predict on
1k..100k small phantoms (sides 64-128 px), each stage a child process whose time and peak
memory (RSS of the process and of all its workers together, sampled every 0.2 s) are measured.

  python benchmarks/data_scale.py --sizes=1000,10000,100000 --out=/tmp/data_scale  # ~25 min
  python benchmarks/data_scale.py --sizes=100000 --out=/tmp/data_scale --stages=prepare

Writes OUT/results.jsonl (one line per measurement, appended), the README's table's numbers. The model
evaluate and predict run is the smoke U-Net trained once on the default phantoms
(OUT/run; 32 px, base 4): the figures measure the data path, not a model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cxr_jax.data import phantoms
from cxr_jax.data import registry
from cxr_jax.data.records import Example

KIND = "phantoms_small"
SIDES = (64, 128)


class SmallPhantomReader(phantoms.PhantomReader):
  """The synthetic phantoms with sides of 64-128 px, as their own dataset kind."""

  def read(self, index: int, skip) -> Example:
    del skip
    phantom = phantoms.make_phantom(phantoms.SYNTHETIC_SEED, index, sides=SIDES)
    return Example(
      id=phantoms.phantom_id(index),
      image=phantom.image,
      mask=phantom.lungs if phantom.has_mask else None,
      label=phantom.label,
      source=KIND,
    )


if KIND not in registry.KINDS:
  registry.register(
    registry.DatasetKind(
      name=KIND,
      description="Phantoms of 64-128 px (benchmarks/data_scale.py).",
      sources={KIND: "#999999"},
      open_reader=SmallPhantomReader,
      default_size=1000,
      id_of=phantoms.phantom_id,
    )
  )


# ----- stages (each run as `data_scale.py --stage=NAME` in a child process) -----


def stage_prepare(args) -> dict:
  from cxr_jax.data import datasets

  builder = datasets.load_builder(
    KIND, data_dir=args.data_dir, synthetic_examples=args.n, workers=args.workers
  )
  return {"splits": {k: v.num_examples for k, v in builder.info.splits.items()}}


def stage_loader(args) -> dict:
  import ml_collections

  from cxr_jax.data import datasets
  from cxr_jax.data import input_pipeline

  builder = datasets.load_builder(KIND, data_dir=args.data_dir, synthetic_examples=args.n)
  source = datasets.split_source(builder, "train")
  config = ml_collections.ConfigDict(
    {
      "seed": 0,
      "batch_size": 32,
      "data": {
        "image_size": 64,
        "examples": "all",
        "balance_classes": False,
        "num_workers": 0,
        "prefetch": 2,
      },
    }
  )
  iterator = input_pipeline.create_train_iterator(config, source, process_index=0, process_count=1)
  for _ in range(3):
    next(iterator)
  start, batches = time.perf_counter(), 40
  for _ in range(batches):
    next(iterator)
  seconds = time.perf_counter() - start
  return {"images_per_s": batches * 32 / seconds, "train_examples": len(source)}


def stage_evaluate(args) -> dict:
  from cxr_jax import evaluate
  from cxr_jax.core.run import rundir
  from cxr_jax.data import datasets

  builder = datasets.load_builder(KIND, data_dir=args.data_dir, synthetic_examples=args.n)
  source = datasets.split_source(builder, "test")
  config, model, _ = rundir.restore_model(args.run, "latest")
  start = time.perf_counter()
  evaluate.run_model(config, model, args.run, "test", {"test": source}, show_progress=False)
  return {"images": len(source), "seconds_in_run": time.perf_counter() - start}


def stage_write_inputs(args) -> dict:
  """The test split's images as PNG files, predict's input."""
  from PIL import Image

  from cxr_jax.data import datasets

  builder = datasets.load_builder(KIND, data_dir=args.data_dir, synthetic_examples=args.n)
  source = datasets.split_source(builder, "test")
  os.makedirs(args.inputs, exist_ok=True)
  for i in range(len(source)):
    Image.fromarray(source[i]["image"][..., 0]).save(f"{args.inputs}/{i:06d}.png")
  return {"images": len(source)}


STAGES = {
  "prepare": stage_prepare,
  "loader": stage_loader,
  "evaluate": stage_evaluate,
  "write_inputs": stage_write_inputs,
}


# ----- the parent: runs and measures the children -----


def _tree_rss(pid: int) -> tuple[int, int]:
  """(RSS of pid, RSS of pid and all its descendants) in bytes."""
  children: dict[int, list[int]] = {}
  rss: dict[int, int] = {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      children.setdefault(int(fields[1]), []).append(int(entry))
      rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
      continue
  total, stack = 0, [pid]
  while stack:
    p = stack.pop()
    total += rss.get(p, 0)
    stack.extend(children.get(p, []))
  return rss.get(pid, 0), total


def measure(command: list[str], log: str) -> dict:
  """Runs `command`; its wall time and peak memory (own and with its children)."""
  start = time.perf_counter()
  with open(log, "w") as out:
    proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    peak_own = peak_tree = 0
    while proc.poll() is None:
      own, tree = _tree_rss(proc.pid)
      peak_own, peak_tree = max(peak_own, own), max(peak_tree, tree)
      time.sleep(0.2)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}); see {log}")
  return {
    "seconds": time.perf_counter() - start,
    "peak_mb": peak_own / 2**20,
    "peak_tree_mb": peak_tree / 2**20,
  }


def _child(stage: str, **kwargs) -> list[str]:
  return [sys.executable, __file__, f"--stage={stage}", *(f"--{k}={v}" for k, v in kwargs.items())]


def _du(path: str) -> int:
  return sum(
    os.path.getsize(os.path.join(root, name)) for root, _, files in os.walk(path) for name in files
  )


def _train_run(out: str) -> str:
  run = f"{out}/run"
  if not os.path.exists(f"{run}/checkpoints"):
    subprocess.run(
      [sys.executable, "-m", "cxr_jax.main", "--config=configs/unet.py:smoke",
       f"--workdir={run}", f"--config.data.data_dir={out}/tfds_default",
       "--config.num_train_steps=60"],
      cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
  return run


def run_sizes(args) -> None:
  os.makedirs(args.out, exist_ok=True)
  results = f"{args.out}/results.jsonl"
  stages = args.stages.split(",")

  def record(row: dict) -> None:
    print(json.dumps(row), flush=True)
    with open(results, "a") as f:
      f.write(json.dumps(row) + "\n")

  run = _train_run(args.out) if {"evaluate", "predict"} & set(stages) else ""
  for n in [int(s) for s in args.sizes.split(",")]:
    data_dir = f"{args.out}/tfds_{n}"
    if "prepare" in stages:
      for workers in (1, 2):
        shutil.rmtree(data_dir, ignore_errors=True)
        row = measure(
          _child("prepare", n=n, workers=workers, data_dir=data_dir),
          f"{args.out}/prepare_{n}_{workers}.log",
        )
        record(
          {"stage": "prepare", "n": n, "workers": workers, "disk_mb": _du(data_dir) / 2**20, **row}
        )
    if "loader" in stages:
      row = measure(_child("loader", n=n, data_dir=data_dir), f"{args.out}/loader_{n}.log")
      record({"stage": "loader", "n": n, **row, **_last_json(f"{args.out}/loader_{n}.log")})
    if "evaluate" in stages:
      row = measure(
        _child("evaluate", n=n, data_dir=data_dir, run=run), f"{args.out}/evaluate_{n}.log"
      )
      record({"stage": "evaluate", "n": n, **row, **_last_json(f"{args.out}/evaluate_{n}.log")})
    if "predict" in stages:
      inputs, output = f"{args.out}/inputs_{n}", f"{args.out}/predicted_{n}"
      shutil.rmtree(inputs, ignore_errors=True)
      shutil.rmtree(output, ignore_errors=True)
      measure(_child("write_inputs", n=n, data_dir=data_dir, inputs=inputs), f"{args.out}/w.log")
      row = measure(
        [sys.executable, "-m", "cxr_jax.predict", f"--workdir={run}", f"--input={inputs}",
         f"--output={output}"],
        f"{args.out}/predict_{n}.log",
      )  # fmt: skip
      record({"stage": "predict", "n": n, "images": len(os.listdir(inputs)), **row})
      shutil.rmtree(inputs, ignore_errors=True)
      shutil.rmtree(output, ignore_errors=True)


def _last_json(log: str) -> dict:
  with open(log) as f:
    lines = [line for line in f if line.startswith("RESULT ")]
  return json.loads(lines[-1][len("RESULT ") :]) if lines else {}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--stage", default="")
  parser.add_argument("--sizes", default="1000,10000")
  parser.add_argument("--stages", default="prepare,loader,evaluate,predict")
  parser.add_argument("--out", default="/tmp/data_scale")
  parser.add_argument("--n", type=int, default=0)
  parser.add_argument("--workers", type=int, default=1)
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--run", default="")
  parser.add_argument("--inputs", default="")
  args = parser.parse_args()
  if args.stage:
    print("RESULT " + json.dumps(STAGES[args.stage](args)), flush=True)
  else:
    run_sizes(args)


if __name__ == "__main__":
  main()
