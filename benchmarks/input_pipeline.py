"""Input pipeline throughput beside the train step's (not run by CI).

    python benchmarks/input_pipeline.py [--config=configs/default.py] [--batches=40]

Prints host-pipeline images/s with 0, 1 and 2 grain workers, the jitted augmentation's time
per batch, and the trainer's own train step (`steps.make_train_step` under `jax.jit` with the
state donated: augmentation, forward, every head's loss, the config's optimiser), with
augmentation on and off, for the config's dataset (synthetic unless the real archive is
found). Goals: loader >= 3x the train step's images/s, augmentation < 10% of a step.
"""

import functools
import statistics
import time

import jax
import train_step as real_step  # benchmarks/train_step.py (puts the checkout on sys.path)
from absl import app
from absl import flags
from ml_collections import config_flags

from cxr_jax.core.run import platform
from cxr_jax.core.run import run_data
from cxr_jax.core.training import augment
from cxr_jax.data import input_pipeline

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config.")
_BATCHES = flags.DEFINE_integer("batches", 40, "Host batches timed per worker setting.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed repeats of each jitted function.")


def _loader_images_per_s(config, source, num_workers: int, batches: int) -> float:
  config = config.copy_and_resolve_references()
  config.data.num_workers = num_workers
  it = input_pipeline.create_train_iterator(config, source, process_index=0, process_count=1)
  try:
    for _ in range(3):  # start-up: workers spawn, buffers fill
      next(it)
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    elapsed = time.perf_counter() - start
  finally:
    if hasattr(it, "close"):
      it.close()
  return batches * config.batch_size / jax.process_count() / elapsed


def _median_seconds(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _step_seconds(config, batch, repeats: int) -> float:
  """Median seconds of the trainer's jitted step (state donated, so threaded through)."""
  _, state, step = real_step.real_train_step(config)
  state, scalars = step(state, batch)  # compile
  jax.block_until_ready(scalars)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, scalars = step(state, batch)
    jax.block_until_ready(scalars)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  config = _CONFIG.value
  dataset = run_data.open_dataset(config.data)
  source = run_data.load_split(config, "train", dataset)  # pickles to grain workers by reference
  batch_size = config.batch_size
  print(
    f"dataset {dataset.name} ({len(source)} train records), image_size "
    f"{config.data.image_size}, batch {batch_size}, examples={config.data.examples}, "
    f"model {config.model.name}, backend {jax.default_backend()} "
    f"({jax.devices()[0].device_kind}), {jax.device_count()} device(s)"
  )

  rows = []
  for workers in (0, 1, 2):
    rate = _loader_images_per_s(config, source, workers, _BATCHES.value)
    rows.append((f"host loader, {workers} workers", f"{rate:.0f} img/s"))
    print(rows[-1])

  host = next(
    input_pipeline.create_train_iterator(config, source, process_index=0, process_count=1)
  )
  batch = real_step.device_batch(host)
  aug_fn = platform.jit(functools.partial(augment.augment_batch, aug_config=config.aug))
  aug_s = _median_seconds(
    aug_fn, jax.random.key(0), batch["image"], batch["lung_mask"], repeats=_REPEATS.value
  )

  # The trainer's step as train.py runs it, with the config's augmentation, and without.
  aug_step_s = _step_seconds(config, batch, _REPEATS.value)
  no_aug = config.copy_and_resolve_references()
  no_aug.aug.enabled = False
  step_s = _step_seconds(no_aug, batch, _REPEATS.value)
  step_rate = batch_size / aug_step_s
  rows += [
    (
      "augmentation alone (jit)",
      f"{aug_s * 1e3:.2f} ms/batch ({100 * aug_s / aug_step_s:.1f}% of a train step)",
    ),
    (
      "train step, aug off (fwd+bwd+loss+optimiser)",
      f"{batch_size / step_s:.0f} img/s ({step_s * 1e3:.1f} ms)",
    ),
    (
      "train step as trained (aug + fwd+bwd+loss+optimiser)",
      f"{step_rate:.0f} img/s ({aug_step_s * 1e3:.1f} ms)",
    ),
  ]
  best_loader = max(float(r[1].split()[0]) for r in rows[:3])
  rows.append(("loader / train step (best workers)", f"{best_loader / step_rate:.1f}x"))
  print("\n| measurement | value |\n|---|---|")
  for label, value in rows:
    print(f"| {label} | {value} |")


if __name__ == "__main__":
  app.run(main)
