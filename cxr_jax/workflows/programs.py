"""The programs a run compiles: its train, eval and predict steps jitted over a mesh, with
the shapes and shardings of their arguments.

Training builds them here, and so does `cxr_jax.aot`, which compiles the same programs for a
TPU topology this machine does not have: what it reports is what a run would compile.
"""

import dataclasses
import functools
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from cxr_jax.core import models
from cxr_jax.core.inference import inference
from cxr_jax.core.run import platform
from cxr_jax.core.run import sharding
from cxr_jax.core.training import steps
from cxr_jax.data import transforms


@dataclasses.dataclass(frozen=True)
class RunPrograms:
  """A run's jitted programs over `mesh`. Their arguments arrive placed (`state_sharding`,
  `sharding.to_global`), so they name out_shardings only."""

  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef  # of (params, model_state), the TrainState's split
  tx: optax.GradientTransformation
  abstract_state: steps.TrainState  # jax.ShapeDtypeStruct leaves, each with its sharding
  state_sharding: Any  # a TrainState of NamedShardings
  init: Any  # () -> TrainState, fresh from config.seed, placed
  train_step: Any  # (state, batch) -> (state, scalars); donates the state
  eval_step: Any  # (state, batch) -> (metric collections, outputs); EMA weights when kept
  online_step: Any  # eval_step on the trained weights when an EMA is kept, else None


def target_platform(mesh: jax.sharding.Mesh) -> str:
  """'cpu', 'gpu' or 'tpu': what the mesh's devices are, whatever the default backend."""
  return mesh.devices.flat[0].platform


def abstract_model(config: ml_collections.ConfigDict) -> nnx.Module:
  """The model of `config.model` with jax.ShapeDtypeStruct variables (nothing allocated)."""
  return nnx.eval_shape(
    lambda: models.create_model(config.model, rngs=nnx.Rngs(params=0, dropout=0))
  )


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> RunPrograms:
  """The train and eval steps of `config` jitted over `mesh`, with the compiler options of
  the mesh's platform (`platform.compiler_options`)."""
  target = target_platform(mesh)
  tx = steps.create_optimizer(config)
  init_state = functools.partial(steps.create_train_state, config, tx)
  graphdef = nnx.graphdef(abstract_model(config))
  shapes = jax.eval_shape(init_state)
  state_sharding = sharding.state_sharding(shapes, mesh, config.shard_params)
  abstract_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, state_sharding
  )
  image_sharding = sharding.image_sharded(mesh) if sharding.space_size(mesh) > 1 else None
  train_step = platform.jit(
    steps.make_train_step(graphdef, config, tx, image_sharding=image_sharding),
    target=target,
    out_shardings=(state_sharding, sharding.replicated(mesh)),
    donate_argnums=0,
  )
  eval_step = platform.jit(steps.make_eval_step(graphdef, config), target=target)
  online_step = None
  if steps.ema_decay(config):
    online_step = platform.jit(steps.make_eval_step(graphdef, config, online=True), target=target)
  return RunPrograms(
    mesh=mesh,
    graphdef=graphdef,
    tx=tx,
    abstract_state=abstract_state,
    state_sharding=state_sharding,
    init=platform.jit(init_state, target=target, out_shardings=state_sharding),
    train_step=train_step,
    eval_step=eval_step,
    online_step=online_step,
  )


def build_predict(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """(predict_step jitted over `mesh`, its abstract variables): `inference.Inference`'s step
  (TTA as config.tta says), variables replicated, images split by batch and height."""
  graphdef, variables = nnx.split(abstract_model(config))
  replicated = sharding.replicated(mesh)
  predict_step = platform.jit(
    inference.make_predict_step(graphdef, tta=bool(config.tta)),
    target=target_platform(mesh),
    in_shardings=(replicated, sharding.image_sharded(mesh)),
  )
  placed = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), variables
  )
  return predict_step, placed


def abstract_batch(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, batch_size: int
) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch the steps take: the input pipeline's example fields
  (`transforms.padding_example`) that `sharding.to_global` keeps, with `batch_size` rows,
  placed as `sharding.sharding_of` places them (images [B, S, S, 1] by batch and height)."""
  example = transforms.padding_example(int(config.data.image_size))
  batch = {}
  for key, value in example.items():
    value = np.asarray(value)
    if value.dtype.kind in "biuf":
      rows = np.broadcast_to(value, (batch_size, *value.shape))  # a view: nothing allocated
      batch[key] = jax.ShapeDtypeStruct(
        rows.shape, rows.dtype, sharding=sharding.sharding_of(rows, mesh)
      )
  return batch


def abstract_images(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, batch_size: int
) -> jax.ShapeDtypeStruct:
  """The predict step's images [B, S, S, 1] float32, split by batch and height."""
  return abstract_batch(config, mesh, batch_size)["image"]
