"""The trainer's own train step, set up for the benchmarks (not run by CI).

`real_train_step(config)` builds what `cxr_jax.workflows.train.train_and_evaluate` runs: the optimiser
from `steps.create_optimizer`, `steps.create_train_state`, and
`platform.jit(steps.make_train_step(...), donate_argnums=0)`: paired augmentation (when
config.aug.enabled), forward, the loss of every head the model has, and the optax update. Single device, unsharded (the benchmarks time one host).
"""

import pathlib
import sys
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # a checkout, uninstalled
from cxr_jax.core import models  # noqa: E402
from cxr_jax.core.run import platform  # noqa: E402
from cxr_jax.core.training import steps  # noqa: E402


def real_train_step(
  config: ml_collections.ConfigDict,
) -> tuple[nnx.GraphDef, steps.TrainState, Callable]:
  """(graphdef, initial state, jitted `step(state, batch) -> (state, scalars)`), the state
  donated as in training: always pass the state the previous call returned."""
  tx = steps.create_optimizer(config)
  graphdef = nnx.graphdef(
    nnx.eval_shape(lambda: models.create_model(config.model, rngs=nnx.Rngs(params=0, dropout=0)))
  )
  state = platform.jit(lambda: steps.create_train_state(config, tx))()
  step = platform.jit(steps.make_train_step(graphdef, config, tx), donate_argnums=0)
  return graphdef, state, step


def device_batch(host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  """A host batch's numeric fields on the default device (ids stay behind)."""
  return {k: jnp.asarray(v) for k, v in host_batch.items() if np.asarray(v).dtype.kind in "biuf"}


def random_batch(batch_size: int, image_size: int, seed: int = 0) -> dict[str, jax.Array]:
  """A batch shaped like the loader's: every example masked, labelled, weight 1."""
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(batch_size, image_size, image_size, 1)).astype(np.float32)
  return device_batch(
    {
      "image": image,
      "lung_mask": (image > 0).astype(np.float32),
      "has_mask": np.ones(batch_size, np.float32),
      "weight": np.ones(batch_size, np.float32),
      "label": rng.integers(0, 2, batch_size).astype(np.int32),
      "source": np.zeros(batch_size, np.int32),
    }
  )
