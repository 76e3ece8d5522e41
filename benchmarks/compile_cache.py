"""The persistent compilation cache: time to the first train step, cold and warm (not CI).

    python benchmarks/compile_cache.py [--config=configs/unet.py:smoke]

Runs the same training twice into fresh run directories with one fresh cache directory and
prints how long each took to compile its train step and to reach its first logged step.
"""

import argparse
import pathlib
import re
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(config: str, workdir: pathlib.Path, cache: pathlib.Path, steps: int) -> dict:
  start = time.perf_counter()
  done = subprocess.run(
    [
      sys.executable,
      "-m",
      "cxr_jax.main",
      f"--config={config}",
      f"--workdir={workdir}",
      f"--compilation_cache_dir={cache}",
      f"--config.num_train_steps={steps}",
      "--config.log_every_steps=1",
      f"--config.eval_every_steps={steps}",
      f"--config.checkpoint_every_steps={steps}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
    env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "HOME": str(workdir)},
  )
  wall = time.perf_counter() - start
  compiled = re.search(
    r"Train step compiled in ([\d.]+) s \((compilation cache[^;]*)\);", done.stderr
  )
  return {"wall_s": wall, "compile_s": float(compiled.group(1)), "cache": compiled.group(2)}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default=f"{REPO}/configs/unet.py:smoke")
  parser.add_argument("--steps", type=int, default=2)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    first = _run(args.config, tmp / "first", tmp / "cache", args.steps)
    second = _run(args.config, tmp / "second", tmp / "cache", args.steps)
  print("| run | train step compile s | whole command s | cache |\n|---|---|---|---|")
  for name, r in (("first (cold cache)", first), ("second (warm cache)", second)):
    print(f"| {name} | {r['compile_s']:.1f} | {r['wall_s']:.1f} | {r['cache']} |")


if __name__ == "__main__":
  main()
