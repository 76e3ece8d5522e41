"""Input pipeline throughput beside the train step's (not run by CI).

    python benchmarks/input_pipeline.py [--config=configs/default.py] [--batches=40]

Prints host-pipeline images/s with 0, 1 and 2 grain workers, the jitted augmentation's time
per batch, and a jitted forward+backward (+SGD) of the config's model, with and without augmentation, for
the config's dataset (synthetic unless the real archive is found). Goals: loader >= 3x the
train step's images/s, augmentation < 10% of a step.
"""

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from cxr_jax import models
from cxr_jax.data import augment, input_pipeline, prepare

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config.")
_BATCHES = flags.DEFINE_integer("batches", 40, "Host batches timed per worker setting.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed repeats of each jitted function.")


class _ReopenedSource:
  """The builder's split, reopened by name in each grain worker.

  Workaround: a pickled TFDS data source re-creates its builder from a copy of the
  BuilderConfig, which tfds rejects for the registered 'synthetic' config ("Cannot name a
  custom BuilderConfig the same as an available BuilderConfig"), so workers cannot unpickle
  `builder.as_data_source(...)` itself (reported to the dataset builder's owner).
  """

  def __init__(self, name: str, split: str, **kwargs):
    self._args = (name, split, kwargs)
    self._len = len(self._open())
    self._source = None

  def _open(self):
    name, split, kwargs = self._args
    return prepare.load_builder(name, **kwargs).as_data_source(split)

  def __getstate__(self):
    return {"_args": self._args, "_len": self._len, "_source": None}

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int):
    if self._source is None:
      self._source = self._open()
    return self._source[index]


def _loader_images_per_s(config, source, num_workers: int, batches: int) -> float:
  config = config.copy_and_resolve_references()
  config.data.num_workers = num_workers
  it = input_pipeline.create_train_iterator(config, source)
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


def main(argv):
  del argv
  config = _CONFIG.value
  name, manual_dir = prepare.resolve_name(config.data)
  builder = prepare.load_builder(name, data_dir=config.data.data_dir, manual_dir=manual_dir,
                                 synthetic_examples=config.data.synthetic_examples)
  del builder  # prepared; each process (and worker) reopens it by name
  source = _ReopenedSource(name, "train", data_dir=config.data.data_dir, manual_dir=manual_dir,
                           synthetic_examples=config.data.synthetic_examples)
  batch_size = config.batch_size
  print(f"dataset {name} ({len(source)} train records), image_size "
        f"{config.data.image_size}, batch {batch_size}, examples={config.data.examples}, "
        f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{jax.device_count()} device(s)")

  rows = []
  for workers in (0, 1, 2):
    rate = _loader_images_per_s(config, source, workers, _BATCHES.value)
    rows.append((f"host loader, {workers} workers", f"{rate:.0f} img/s"))
    print(rows[-1])

  host = next(input_pipeline.create_train_iterator(config, source))
  batch = {k: jnp.asarray(v) for k, v in host.items() if k != "id"}
  aug_fn = jax.jit(functools.partial(augment.augment_batch, aug_config=config.aug))
  aug_s = _median_seconds(aug_fn, jax.random.key(0), batch["image"], batch["mask"],
                          repeats=_REPEATS.value)

  # Forward + backward of the config's model with an SGD update (nnx.jit; the BatchNorm
  # statistics update in place). train.make_train_step adds the optimiser and metrics.
  model = models.create_model(config.model, rngs=nnx.Rngs(params=0, dropout=1))

  @nnx.jit
  def fwd_bwd(model, image, mask):
    def loss_fn(model):
      logits = model(image, train=True)["mask_logits"]
      return optax.sigmoid_binary_cross_entropy(logits, mask).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    nnx.update(model, jax.tree.map(lambda p, g: p - 1e-3 * g, nnx.state(model, nnx.Param),
                                   grads))
    return loss

  @nnx.jit
  def aug_fwd_bwd(model, key, image, mask):
    image, mask = augment.augment_batch(key, image, mask, config.aug)
    return fwd_bwd(model, image, mask)

  step_s = _median_seconds(fwd_bwd, model, batch["image"], batch["mask"],
                           repeats=_REPEATS.value)
  aug_step_s = _median_seconds(aug_fwd_bwd, model, jax.random.key(1), batch["image"],
                               batch["mask"], repeats=_REPEATS.value)
  step_rate = batch_size / aug_step_s
  rows += [
      ("augmentation alone (jit)", f"{aug_s * 1e3:.2f} ms/batch "
       f"({100 * aug_s / step_s:.1f}% of a step)"),
      ("model fwd+bwd step", f"{batch_size / step_s:.0f} img/s ({step_s * 1e3:.1f} ms)"),
      ("augmentation + fwd+bwd step", f"{step_rate:.0f} img/s ({aug_step_s * 1e3:.1f} ms)"),
  ]
  best_loader = max(float(r[1].split()[0]) for r in rows[:3])
  rows.append(("loader / train step (best workers)", f"{best_loader / step_rate:.1f}x"))
  print("\n| measurement | value |\n|---|---|")
  for label, value in rows:
    print(f"| {label} | {value} |")


if __name__ == "__main__":
  app.run(main)
