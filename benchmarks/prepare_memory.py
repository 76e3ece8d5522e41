"""prepare's peak memory (max RSS of the `python -m cxr_jax.data.prepare` process) on the
dataset replicas the tests write, at two sizes each, and what it said it skipped.

    python benchmarks/prepare_memory.py [--scale=4]

Flat memory means the peak does not grow with the number of images (readers list ids and
offsets, and read one image at a time); the README quotes a run of this script.
"""

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import replicas  # noqa: E402  (the replica writers live with the tests)

KINDS = {  # name -> (writer, its size argument)
  "jsrt": (lambda root, n: replicas.write_jsrt(root), None),
  "chexmask": (lambda root, n: replicas.write_chexmask(root, patients=n), 40),
  "chestxray14": (lambda root, n: replicas.write_chestxray14(root, patients=n), 40),
  "chexpert": (lambda root, n: replicas.write_chexpert(root, train_patients=n), 20),
}


def measure(
  name: str, manual_dir: pathlib.Path, data_dir: pathlib.Path
) -> tuple[float, float, str]:
  """(peak RSS MiB, seconds, the skipped-files line) of one prepare run.

  Measured by GNU time around the command: a child forked from this (larger) process would
  start its high-water mark at this process's size (Linux keeps it across fork and exec).
  """
  start = time.perf_counter()
  proc = subprocess.run(
    [
      "/usr/bin/time",
      "-f",
      "maxrss_kb=%M",
      sys.executable,
      "-m",
      "cxr_jax.data.prepare",
      f"--dataset={name}",
      f"--manual_dir={manual_dir}",
      f"--data_dir={data_dir}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  peak_kb = int(proc.stderr.strip().splitlines()[-1].removeprefix("maxrss_kb="))
  skipped = next((ln for ln in proc.stdout.splitlines() if ln.startswith("skipped files")), "?")
  return peak_kb / 1024, time.perf_counter() - start, skipped


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--scale", type=int, default=4, help="the larger size over the smaller")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    print(f"{'dataset':<12} {'size':>6} {'images':>7} {'peak MiB':>9} {'s':>6}  skipped")
    for name, (write, base) in KINDS.items():
      for n in [None] if base is None else [base, base * args.scale]:
        manual_dir = root / f"{name}_{n}"
        count = len(write(manual_dir, n))
        peak, seconds, skipped = measure(name, manual_dir, root / f"tfds_{name}_{n}")
        print(f"{name:<12} {n or '-':>6} {count:>7} {peak:>9.0f} {seconds:>6.1f}  {skipped}")


if __name__ == "__main__":
  main()
