"""predict under load: a folder of 1,000 X-ray-like images of mixed sizes (not run by CI).

    python benchmarks/predict_load.py [--images=1000] [--config=configs/unet.py]

Writes the images into a temporary folder, restores nothing (the config's model with fresh
weights: speed and memory do not depend on the weights), and predicts the folder with
`prediction.predict_files` in chunks, printing images/s and the process's resident memory after
each chunk: flat after the first chunks means no leak.
"""

import argparse
import pathlib
import resource
import sys
import tempfile
import time

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import default  # noqa: E402
from cxr_jax.core import models  # noqa: E402
from cxr_jax.core.inference.inference import Inference  # noqa: E402
from cxr_jax.workflows import prediction  # noqa: E402


def _rss_mib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _write_images(folder: pathlib.Path, count: int, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  for i in range(count):
    height, width = (int(x) for x in rng.integers(256, 1280, 2))
    rows, cols = np.mgrid[:height, :width]
    lungs = np.zeros((height, width), bool)
    for cx in (0.3, 0.7):
      lungs |= ((rows / height - 0.5) / 0.35) ** 2 + ((cols / width - cx) / 0.15) ** 2 <= 1
    image = (40 + 150 * lungs + rng.integers(0, 40, (height, width))).astype(np.uint8)
    suffix = ".jpg" if i % 3 == 0 else ".png"
    Image.fromarray(image).save(folder / f"x{i:04d}{suffix}")


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--images", type=int, default=1000)
  parser.add_argument("--chunks", type=int, default=10)
  parser.add_argument("--batch_size", type=int, default=16)
  args = parser.parse_args()

  from flax import nnx

  config = default.get_config()
  model = models.create_model(config.model, rngs=nnx.Rngs(0))
  model.eval()
  inference = Inference(config, model, batch_size=args.batch_size)
  with tempfile.TemporaryDirectory() as tmp:
    inputs, output = pathlib.Path(tmp) / "in", pathlib.Path(tmp) / "out"
    inputs.mkdir()
    start = time.perf_counter()
    _write_images(inputs, args.images)
    print(
      f"wrote {args.images} images (256-1279 px a side, 2/3 PNG, 1/3 JPEG) in "
      f"{time.perf_counter() - start:.0f} s"
    )
    paths, _ = prediction.list_inputs(inputs)
    prediction.predict_files(
      inference, paths[: args.batch_size], output, show_progress=False
    )  # compile
    print("| images done | images/s (chunk) | resident MiB |\n|---|---|---|")
    chunk = len(paths) // args.chunks
    total_start, done = time.perf_counter(), 0
    for k in range(args.chunks):
      part = paths[k * chunk : (k + 1) * chunk]
      start = time.perf_counter()
      rows, errors = prediction.predict_files(inference, part, output, show_progress=False)
      assert len(rows) == len(part) and not errors, errors
      done += len(part)
      print(f"| {done} | {len(part) / (time.perf_counter() - start):.1f} | {_rss_mib():.0f} |")
    elapsed = time.perf_counter() - total_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
      f"\n{done} images in {elapsed:.0f} s: {done / elapsed:.1f} images/s; peak resident "
      f"memory {peak:.0f} MiB ({config.model.name}, base {config.model.base_features}, "
      f"{config.data.image_size} px, batch {args.batch_size})"
    )


if __name__ == "__main__":
  main()
